import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from lmjax import optim


def cfg_with(**kw):
    c = base.get_config().optim
    c.update(**{"lr": 1.0, "warmup_steps": 10, "end_lr_fraction": 0.1, **kw})
    return c


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_warmup_is_linear_from_zero(name):
    s = optim.schedule(cfg_with(schedule=name), total_steps=110)
    np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10)], [0.0, 0.5, 1.0], atol=1e-6)


def test_decays_match_their_formulas():
    total, w = 110, 10
    cos = optim.schedule(cfg_with(schedule="cosine"), total)
    for t in (10, 35, 60, 110):
        frac = (t - w) / (total - w)
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(cos(t)) == pytest.approx(want, abs=1e-6)
    lin = optim.schedule(cfg_with(schedule="linear"), total)
    assert float(lin(60)) == pytest.approx(0.55, abs=1e-6)
    assert float(lin(110)) == pytest.approx(0.1, abs=1e-6)
    const = optim.schedule(cfg_with(schedule="constant"), total)
    assert float(const(100)) == 1.0
    rsqrt = optim.schedule(cfg_with(schedule="rsqrt"), total)
    assert float(rsqrt(40)) == pytest.approx(math.sqrt(10 / 40), rel=1e-6)
    wsd = optim.schedule(cfg_with(schedule="wsd", wsd_decay_fraction=0.2), total)
    assert float(wsd(89)) == 1.0  # stable until the last 20 steps
    assert float(wsd(100)) == pytest.approx(0.55, abs=1e-6)
    assert float(wsd(110)) == pytest.approx(0.1, abs=1e-6)


def test_wsd_cooldowns_match_hand_computed_values():
    """Hägele et al. 2024: hold lr, then over the last cooldown_steps decay linearly or as
    1 - sqrt, to end_lr_fraction x lr; no cooldown (fraction 0) is a constant lr."""
    total = 110  # warmup 10, stable to step 90, cooldown 90..110
    lin = optim.schedule(cfg_with(schedule="wsd", cooldown_steps=20, end_lr_fraction=0.0), total)
    sqrt = optim.schedule(cfg_with(schedule="wsd", cooldown_steps=20, cooldown_shape="1-sqrt",
                                   end_lr_fraction=0.0), total)
    sqrt_end = optim.schedule(cfg_with(schedule="wsd", cooldown_steps=20,
                                       cooldown_shape="1-sqrt"), total)
    for t, want_lin, want_sqrt in [(89, 1.0, 1.0), (90, 1.0, 1.0), (95, 0.75, 0.5),
                                   (105, 0.25, 1 - math.sqrt(0.75)), (109, 0.05, 1 - math.sqrt(
                                       0.95)), (110, 0.0, 0.0), (120, 0.0, 0.0)]:
        assert float(lin(t)) == pytest.approx(want_lin, abs=1e-6)
        assert float(sqrt(t)) == pytest.approx(want_sqrt, abs=1e-6)
        assert float(sqrt_end(t)) == pytest.approx(0.1 + 0.9 * want_sqrt, abs=1e-6)
    flat = optim.schedule(cfg_with(schedule="wsd", wsd_decay_fraction=0.0), total)
    assert [float(flat(t)) for t in (5, 10, 110, 10_000)] == [0.5, 1.0, 1.0, 1.0]


def test_first_change_finds_the_first_step_whose_lr_moves():
    """A longer constant or WSD-before-cooldown run keeps every earlier lr; cosine does not."""
    def run(steps, **optim_keys):
        c = base.get_config()
        c.optim.update(lr=1.0, warmup_steps=10, **optim_keys)
        c.train.steps = steps
        return c

    assert optim.first_change(run(100, schedule="constant"), run(400, schedule="constant"),
                              100) is None
    wsd = dict(schedule="wsd", cooldown_steps=20)  # 100 steps: the cooldown starts at 80
    assert optim.first_change(run(100, **wsd), run(400, **wsd), 82) == (
        81, pytest.approx(1 - 0.9 / 20), 1.0)
    assert optim.first_change(run(100, **wsd), run(400, **wsd), 81) is None
    step, before, after = optim.first_change(run(100, schedule="cosine"),
                                             run(200, schedule="cosine"), 100)
    assert step == 11 and before < after  # the first decayed step; warmup is unchanged


def test_unknown_schedule():
    with pytest.raises(ValueError, match="optim.schedule='exp' is unknown"):
        optim.schedule(cfg_with(schedule="exp"), 10)


def test_decay_mask():
    params = {"embed": {"embedding": jnp.ones((4, 2))}, "q": {"kernel": jnp.ones((2, 2)),
              "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}
    mask = optim.decay_mask(params, decay_embeddings=False)
    assert mask == {"embed": {"embedding": False}, "q": {"kernel": True, "bias": False},
                    "norm": {"scale": False}}
    assert optim.decay_mask(params, decay_embeddings=True)["embed"]["embedding"]


def test_decay_mask_is_the_same_for_scanned_layers_and_per_head_biases():
    """Stacked layers add an axis to every leaf and GPT-2's q bias is [N, H]: norms and biases
    must still not decay, and the mask must not depend on model.scan_layers."""
    from flax import nnx

    from lmjax import config, model

    def mask(scan: bool) -> dict:
        cfg = config.load("configs/gpt2.py:small", ["model.num_layers=2",
                                                    f"model.scan_layers={scan}"])
        m = nnx.eval_shape(lambda: model.Transformer(cfg.model, nnx.Rngs(0)))
        params = nnx.state(m, nnx.Param).to_pure_dict()
        flat = jax.tree_util.tree_leaves_with_path(optim.decay_mask(params, False))
        return {jax.tree_util.keystr(p, simple=True, separator="/").replace("blocks/0/", "blocks/")
                : bool(v) for p, v in flat if "blocks/1/" not in jax.tree_util.keystr(
                    p, simple=True, separator="/")}

    unrolled, scanned = mask(False), mask(True)
    assert unrolled == scanned
    assert not scanned["blocks/attn/q/bias"] and not scanned["blocks/attn_norm/scale"]
    assert scanned["blocks/attn/q/kernel"] and scanned["blocks/mlp/up/kernel"]


def test_weight_decay_skips_masked_and_clip_bounds_update():
    c = cfg_with(schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=1.0)
    tx = optim.make(c, 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)))  # decay only
    np.testing.assert_allclose(updates["b"], 0.0)


def test_clipping_happens_before_adam():
    """Two steps where the second gradient is huge: our chain equals AdamW on clipped grads."""
    c = cfg_with(schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    ours, plain = optim.make(c, 10), optax.adamw(1.0, b1=c.b1, b2=c.b2, eps=c.eps,
                                                  weight_decay=0.0)
    params = {"w": jnp.ones((2, 2))}
    grads = [{"w": jnp.full((2, 2), 0.1)}, {"w": jnp.full((2, 2), 1e3)}]
    s_ours, s_plain = ours.init(params), plain.init(params)
    for g in grads:
        u_ours, s_ours = ours.update(g, s_ours, params)
        clipped = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
        u_plain, s_plain = plain.update(clipped, s_plain, params)
        np.testing.assert_allclose(u_ours["w"], u_plain["w"], rtol=1e-6)
    unclipped = optax.adamw(1.0, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=0.0)
    s = unclipped.init(params)
    for g in grads:
        u, s = unclipped.update(g, s, params)
    assert not np.allclose(u["w"], u_ours["w"], rtol=1e-3)


# ------------------------------------------------------------------ optim.name


def small_params() -> dict:
    """One block's worth of the model's leaves, named and shaped as model.py names them."""
    shapes = {"embed/embedding": (64, 32), "unembed/kernel": (32, 64), "final_norm/scale": (32,),
              "blocks/0/attn_norm/scale": (32,), "blocks/0/attn/q/kernel": (32, 4, 8),
              "blocks/0/attn/q/bias": (4, 8),
              "blocks/0/attn/o/kernel": (4, 8, 32), "blocks/0/mlp/up/kernel": (32, 64),
              "blocks/0/mlp/down/kernel": (64, 32)}
    params = {}
    for i, (name, shape) in enumerate(shapes.items()):
        *path, leaf = name.split("/")
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = jax.random.normal(jax.random.key(i), shape)
    return params


def test_muon_orthogonalizes_hidden_matrices_and_leaves_the_rest_to_adamw():
    """Embeddings, the unembedding, norms and biases get exactly AdamW's update; each hidden
    kernel's update is the orthogonalized matrix its layer multiplies by (q [D, N, H] seen as
    D x NH), at Moonlight's matched RMS 0.2 x lr."""
    params = small_params()
    grads = jax.tree.map(lambda p: p[::-1] * 0.1, params)
    c = cfg_with(schedule="constant", warmup_steps=0, lr=0.1, weight_decay=0.0)
    adamw = optim.make(c, 10)
    c.name = "muon"
    muon = optim.make(c, 10)
    got, _ = jax.jit(muon.update)(grads, muon.init(params), params)
    want, _ = jax.jit(adamw.update)(grads, adamw.init(params), params)
    labels = optim.muon_labels(params)
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): (label, g, w) for (p, label), g, w
            in zip(jax.tree_util.tree_leaves_with_path(labels), jax.tree.leaves(got),
                   jax.tree.leaves(want), strict=True)}
    assert {k for k, (label, _, _) in flat.items() if label == "adamw"} == {
        "embed/embedding", "unembed/kernel", "final_norm/scale", "blocks/0/attn_norm/scale",
        "blocks/0/attn/q/bias"}  # [N, H]: a matrix by shape, not one a layer multiplies by
    for name, (label, g, w) in flat.items():
        if label == "adamw":
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            matrix = g.reshape(-1, g.shape[-1]) if name.endswith("o/kernel") else g.reshape(
                g.shape[0], -1)
            singular = np.linalg.svd(matrix / (0.1 * 0.2 * max(matrix.shape) ** 0.5),
                                     compute_uv=False)
            assert 0.5 < singular.min() and singular.max() < 1.5, name
            assert not np.allclose(g, w), name


def test_unknown_optimizer_and_muon_under_mup_are_one_sentence():
    from lmjax import config

    cfg = config.load("configs/smoke.py", ["optim.name=sgd"])
    with pytest.raises(ValueError, match=r"^optim.name='sgd' is not one of \("):
        optim.validate(cfg)
    cfg = config.load("configs/smoke.py", ["optim.name=muon", "model.parametrization=mup"])
    with pytest.raises(ValueError, match="optim.name='muon' cannot run under "
                                         "model.parametrization='mup'"):
        optim.validate(cfg)


@pytest.mark.parametrize("name", ["lion", "adafactor"])
def test_mup_per_role_factors_scale_every_optimizer(name):
    """μP's per-role factor multiplies the whole update of Lion and Adafactor as of AdamW."""
    params = {"q": {"kernel": jnp.ones((4, 4))}, "norm": {"scale": jnp.ones(4)}}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    c = cfg_with(name=name, schedule="constant", warmup_steps=0, weight_decay=0.0)
    labels = lambda tree: {"q": {"kernel": "hidden"}, "norm": {"scale": "vector"}}  # noqa: E731
    plain, scaled = optim.make(c, 10), optim.make(c, 10, {"hidden": 0.25, "vector": 1.0}, labels)
    u, _ = plain.update(grads, plain.init(params), params)
    v, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(v["q"]["kernel"], 0.25 * u["q"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(v["norm"]["scale"], u["norm"]["scale"])


def test_adafactor_statistics_shard_on_an_fsdp_mesh():
    """Factored rows and columns keep the names of the axes they kept (so 'fsdp' splits them
    as it splits the parameter); [1] placeholders are replicated."""
    from flax import nnx

    from configs import smoke
    from lmjax import sharding, train

    cfg = smoke.get_config()
    cfg.mesh.update(data=2, fsdp=4, tensor=1)
    cfg.model.update(d_model=256, mlp_dim=512)  # both >= 128: the MLP kernels are factored
    cfg.optim.name = "adafactor"
    mesh = sharding.make_mesh(cfg, jax.devices())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        abstract = train.compile_fns(cfg, mesh).abstract_state  # shapes only: nothing compiles
    specs = {jax.tree_util.keystr(p, simple=True, separator="/"): (x.shape, x.sharding.spec)
             for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))}
    up = "blocks/0/mlp/up/kernel"
    assert specs[f"0/{up}"] == ((256, 512), jax.P("fsdp", "tensor"))
    # mesh.shard_optimizer (ZeRO-1) adds 'data' to each statistic's first unsplit dimension
    assert specs[f"1/opt_state/1/0/0/v_row/{up}"] == ((256,), jax.P("fsdp"))
    assert specs[f"1/opt_state/1/0/0/v_col/{up}"] == ((512,), jax.P(("tensor", "data")))
    assert specs[f"1/opt_state/1/0/0/v/{up}"] == ((1,), jax.P())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["muon", "lion", "adafactor"])  # adamw: tests/test_train.py
def test_each_optimizer_trains_and_resumes_bitwise(name, tmp_path):
    """Six smoke steps on one device: the loss falls; then the step-6 checkpoint is dropped
    and the run resumed from step 3 redoes steps 4-6 with the same losses and ends in the
    same weights and optimizer state, bit for bit."""
    import os
    import shutil

    from lmjax import train
    from tests.test_reliability import ONE, leaves, losses, restore, smoke_cfg

    cfg = smoke_cfg(mesh={"data": 1, "fsdp": 1, "tensor": 1},
                    optim={"name": name, "warmup_steps": 1},
                    train={"steps": 6, "eval_every": 0, "eval_batches": 0},
                    checkpoint={"every": 3})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.run(cfg, straight, devices=ONE)
    first = losses(straight)
    assert first[6] < first[1] - 0.1
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    train.run(cfg, resumed, devices=ONE)
    assert losses(resumed) == first
    got, want = (leaves(restore(w, cfg, ONE)[0]) for w in (resumed, straight))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
