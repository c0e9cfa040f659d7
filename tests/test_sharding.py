import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import smoke
from lmjax import config, sharding, train


def make_cfg(data, fsdp, tensor, rules="fsdp_tp"):
    cfg = smoke.get_config()
    cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor, rules=rules)
    cfg.model.update(d_model=64, mlp_dim=256, vocab_size=512)  # large enough to be checked
    return cfg


def sharded_state(cfg):
    mesh = sharding.make_mesh(cfg)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        _, abstract = nnx.split(nnx.eval_shape(lambda: train.create(cfg)))
        shardings = nnx.get_named_sharding(abstract, mesh)
        return jax.jit(lambda: nnx.state(train.create(cfg)), out_shardings=shardings)()


@pytest.mark.parametrize("rules,mesh,q_spec,up_spec", [
    ("dp", (8, 1, 1), P(), P()),
    ("fsdp", (1, 8, 1), P("fsdp"), P("fsdp")),
    ("fsdp_tp", (2, 2, 2), P("fsdp", "tensor"), P("fsdp", "tensor")),
])
def test_params_sharded_as_preset_says(rules, mesh, q_spec, up_spec):
    state = sharded_state(make_cfg(*mesh, rules=rules))
    assert sharding.assert_sharded(state, rules, min_size=1024) == []
    model_state, opt_state = state[0], state[1]
    q = model_state["blocks"][0]["attn"]["q"]["kernel"].get_value()
    up = model_state["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    assert q.sharding.spec[:len(q_spec)] == tuple(q_spec)
    assert up.sharding.spec[:len(up_spec)] == tuple(up_spec)
    # Adam moments live where their parameters live.
    mu = jax.tree.leaves(opt_state["opt_state"])
    assert any(leaf.sharding.is_equivalent_to(up.sharding, 2) for leaf in mu
               if leaf.shape == up.shape)


def test_check_reports_a_layout_that_differs_from_the_preset():
    state = sharded_state(make_cfg(2, 2, 2, rules="dp"))
    problems = sharding.assert_sharded(state, "fsdp_tp", min_size=1024)
    assert any("blocks/0/mlp/up/kernel" in p for p in problems)


def test_mesh_fill_and_errors():
    cfg = make_cfg(-1, 2, 2)
    assert sharding.mesh_shape(cfg, 8) == (2, 2, 2)
    cfg.mesh.update(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        sharding.mesh_shape(cfg, 8)
    cfg.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape(cfg, 8)


def test_validate_names_the_cause():
    cfg = make_cfg(1, 1, 8)
    with pytest.raises(ValueError, match=r"model.num_heads=4 is not divisible by the tensor axis"):
        config.validate(cfg, 8)
    cfg = make_cfg(2, 2, 2)
    cfg.model.num_kv_heads = 1
    with pytest.raises(ValueError, match=r"model.num_kv_heads=1 is not divisible"):
        config.validate(cfg, 8)
    cfg = make_cfg(8, 1, 1)
    cfg.data.global_batch_size = 12
    with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
        config.validate(cfg, 8)
    cfg = make_cfg(1, 8, 1)
    cfg.model.d_model = 36
    with pytest.raises(ValueError, match=r"model.d_model=36 is not divisible by the fsdp axis"):
        config.validate(cfg, 8)
