"""Expert parallelism (mesh axis 'expert', lmjax/moe.py), capacity and dropless: the same
numbers as one expert group, an all-to-all in the program, and the meshes it cannot hold
refused."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from lmjax import config, loss, model, sharding, train, validate

# C = T: none dropped. ZeRO-1 off: its manual 'data' region (expert=1 only) would take the
# balance loss per replica, not over the batch as expert parallelism does.
ROOM = ["model.moe.dispatch=capacity", "model.moe.capacity_factor=2.0",
        "mesh.shard_optimizer=False"]
ROWS = np.random.default_rng(0).integers(0, 64, (8, 33))


def two_steps(overrides, room=ROOM):
    """(per-step metrics, gradients at init, parameters after 2 steps, the step's HLO)."""
    cfg = config.load("configs/moe.py:tiny", room + overrides)
    validate.validate(cfg, 8)
    mesh = sharding.make_mesh(cfg)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        batch = sharding.to_global({"inputs": ROWS[:, :-1], "targets": ROWS[:, 1:],
                                    "weights": np.ones((8, 32), np.float32)}, mesh)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: train.create(cfg)))

        @jax.jit
        def grads(state, batch):
            def total(net):
                logits, router = model.forward_with_aux(net, batch)
                ce, _ = loss.cross_entropy(logits, batch["targets"], batch["weights"])
                return ce + loss.router_loss(router, cfg.model.moe)
            return nnx.state(nnx.grad(total)(nnx.merge(graphdef, state)[0]))

        state = fns.init()
        step = fns.step.lower(fns.abstract_state, batch).compile()  # compiled once, here
        hlo = step.as_text()
        g = jax.device_get(nnx.to_pure_dict(grads(state, batch)))
        rows = []
        for _ in range(2):
            state, m = step(state, batch)
            rows.append({k: float(v) for k, v in m.items()})
        params = jax.device_get(nnx.to_pure_dict(nnx.state(state, nnx.Param)))
    return rows, g, params, hlo


def assert_close(a, b, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol), a, b)


@pytest.fixture(scope="module")
def one_group():
    return two_steps([])


# With tensor=2 the experts' outputs are summed in another order: gradients agree to 1e-5, but
# Adam's first steps (update ~ lr * g / |g|) move a weight whose gradient is ~eps by 1e-5 more.
@pytest.mark.parametrize("mesh,params_atol", [
    (["mesh.expert=4", "mesh.data=2"], 1e-5),
    (["mesh.expert=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"], 5e-5)])
def test_expert_parallel_gives_the_losses_grads_and_params_of_expert_1(one_group, mesh,
                                                                       params_atol):
    rows, grads, params, hlo = one_group
    ep_rows, ep_grads, ep_params, ep_hlo = two_steps(mesh)
    for row, ep_row in zip(rows, ep_rows, strict=True):
        assert ep_row.keys() == row.keys()
        for key in row:
            assert ep_row[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), key
    assert_close(ep_grads, grads)
    assert_close(ep_params, params, params_atol)
    assert "all-to-all" in ep_hlo and "all-to-all" not in hlo


# Dropless: each device's assignments go by a ragged all-to-all (here padded: XLA:CPU has no
# ragged-all-to-all) to its experts' devices, and none is ever dropped, at any mesh.
DROPLESS = ["mesh.shard_optimizer=False"]


@pytest.fixture(scope="module")
def one_group_dropless():
    return two_steps([], DROPLESS)


@pytest.mark.parametrize("mesh", [["mesh.expert=4", "mesh.data=2"],
                                  ["mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"]])
def test_dropless_expert_parallel_gives_the_numbers_of_expert_1(one_group_dropless, mesh):
    rows, grads, params, hlo = one_group_dropless
    ep_rows, ep_grads, ep_params, ep_hlo = two_steps(mesh, DROPLESS)
    for row, ep_row in zip(rows, ep_rows, strict=True):
        assert ep_row == pytest.approx(row, rel=1e-5, abs=1e-6)
        assert ep_row["train/moe_dropped_fraction"] == 0
    assert_close(ep_grads, grads)
    assert_close(ep_params, params, 5e-5)
    assert "all-to-all" in ep_hlo and "all-to-all" not in hlo


@pytest.mark.parametrize("overrides,message", [
    (["mesh.expert=8", "model.moe.dispatch=capacity"],
     "model.moe.num_experts=4 is not divisible by the expert axis (mesh.expert x "
     "mesh.dcn_expert = 8)."),
    (["mesh.expert=2", "model.moe.num_experts=0"], "mesh.expert x mesh.dcn_expert = 2 splits "
     "experts, but the model has none (model.moe.num_experts=0); split the batch with mesh.data."),
])
def test_meshes_expert_parallelism_cannot_hold_are_one_sentence(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate.validate(config.load("configs/moe.py:tiny", overrides), 8)


def test_a_ragged_exchange_on_cpu_is_one_sentence():
    cfg = config.load("configs/moe.py:tiny", ["model.moe.exchange=ragged"])
    assert train.with_kernel(cfg, "tpu").model.moe.exchange == "ragged"
    assert train.with_kernel(config.load("configs/moe.py:tiny"), "cpu").model.moe.exchange == (
        "padded")
    with pytest.raises(ValueError, match=re.escape(
            "model.moe.exchange='ragged' needs a TPU or GPU: XLA:CPU has no ragged all-to-all; "
            "use 'padded' or 'auto'.")):
        train.with_kernel(cfg, "cpu")
