import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe as moe_configs
from lmjax import config, flops, model, moe, sharding, train, validate
from lmjax.scaling import shapes


def moe_cfg(**overrides):
    cfg = moe_configs.get_config("tiny").model
    cfg.moe.update(**overrides)
    return cfg


X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 32)), jnp.float32)


@nnx.jit
def apply(module, *args):
    """One compilation rather than one per operation: faster on a busy CPU."""
    return module(*args)


def test_one_expert_of_top_1_is_the_dense_mlp_exactly():
    cfg = moe_cfg(num_experts=1, top_k=1, expert_mlp_dim=64)
    dense, layer = model.Mlp(cfg, nnx.Rngs(0)), moe.Moe(cfg, nnx.Rngs(1))
    for name in ("up", "gate", "down"):
        getattr(layer, name)[...] = getattr(dense, name).kernel[...][None]
    y, stats = apply(layer, X)
    np.testing.assert_array_equal(y, apply(dense, X))
    assert float(stats["moe_aux_loss"]) == pytest.approx(1.0)  # one expert: balanced
    assert float(stats["moe_dropped_fraction"]) == 0.0


def test_every_expert_under_a_uniform_router_gives_the_mean_of_the_experts():
    cfg = moe_cfg(num_experts=4, top_k=4)
    layer = moe.Moe(cfg, nnx.Rngs(0))
    layer.router[...] = jnp.zeros_like(layer.router[...])
    y, _ = apply(layer, X)
    up, gate, down = (np.asarray(getattr(layer, n)[...]) for n in ("up", "gate", "down"))
    h = jax.nn.silu(np.einsum("bld,edf->eblf", X, gate)) * np.einsum("bld,edf->eblf", X, up)
    want = np.einsum("eblf,efd->bld", h, down) / 4
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_capacity_dispatch_with_room_for_everything_is_dropless(score):
    def run(dispatch):
        cfg = moe_cfg(num_experts=4, top_k=2, score=score, num_shared_experts=1,
                      dispatch=dispatch, capacity_factor=4.0)  # C = every assignment
        return apply(moe.Moe(cfg, nnx.Rngs(0), model.Mlp(cfg, nnx.Rngs(1), width=32)), X)

    (dropless, a), (capacity, b) = run("dropless"), run("capacity")
    np.testing.assert_allclose(capacity, dropless, rtol=1e-5, atol=1e-6)
    assert float(b["moe_dropped_fraction"]) == 0.0
    assert float(a["moe_aux_loss"]) == pytest.approx(float(b["moe_aux_loss"]))


def test_capacity_drops_the_assignments_past_each_experts_capacity():
    """C = 1: each expert keeps its first assignment, first choices before second ones."""
    cfg = moe_cfg(num_experts=4, top_k=2, dispatch="capacity", capacity_factor=4 / 24)
    layer = moe.Moe(cfg, nnx.Rngs(0))
    assert moe.capacity(12, cfg) == 1
    _, experts_TK, _ = moe.route(X.reshape(12, 32) @ layer.router[...], 2, "softmax")
    used = len(set(np.asarray(experts_TK).ravel().tolist()))
    _, stats = apply(layer, X)
    assert float(stats["moe_dropped_fraction"]) == pytest.approx(1 - used / 24)


def test_router_losses_against_numpy():
    logits = np.array([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 3.0, -2.0], [1.0, 1.0, 0.0, 0.0]],
                      np.float32)
    gates, experts, probs = moe.route(jnp.asarray(logits), 2, "softmax")
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_array_equal(experts, [[0, 3], [2, 1], [0, 1]])
    np.testing.assert_allclose(gates[0], p[0, [0, 3]] / p[0, [0, 3]].sum(), rtol=1e-6)
    f = np.array([2, 2, 1, 1]) / 6  # the 6 assignments per expert
    want = 4 * np.sum(f * p.mean(0))
    assert float(moe.balance_loss(probs, experts)) == pytest.approx(want, rel=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(moe.z_loss(jnp.asarray(logits))) == pytest.approx(np.mean(lse**2), rel=1e-6)


def test_sigmoid_scores_pick_the_top_sigmoids_and_normalise_their_gates():
    logits = jnp.array([[3.0, -1.0, 0.5, 2.0]])
    gates, experts, probs = moe.route(logits, 2, "sigmoid")
    s = 1 / (1 + np.exp(-np.asarray(logits[0])))
    np.testing.assert_array_equal(experts, [[0, 3]])
    np.testing.assert_allclose(gates[0], s[[0, 3]] / s[[0, 3]].sum(), rtol=1e-6)
    np.testing.assert_allclose(probs[0], s / s.sum(), rtol=1e-6)


@pytest.mark.parametrize("preset,total,active", [
    ("8x7b", 46_702_792_704, 12_879_925_248),  # Mixtral, published: 46.7B / 12.9B
    ("30b_a3b", 30_532_122_624, 3_353_032_704),  # Qwen3-30B-A3B, published: 30.5B / 3.3B
])
def test_published_counts_and_active_flops(preset, total, active):
    cfg = config.load(f"configs/moe.py:{preset}")
    counts = flops.count_params(cfg.model)
    assert (counts["total"], counts["active"]) == (total, active)
    m = cfg.model
    attention = 6 * m.num_layers * cfg.data.seq_len * m.num_heads * m.head_dim
    assert flops.flops_per_token(m, cfg.data.seq_len) == pytest.approx(
        6 * counts["active_non_embedding"] + attention)


def test_granularity_keeps_total_and_active_params_but_the_routers():
    """Krajewski et al.'s axes: G = 2 halves each expert and doubles experts and top_k; only
    the router (D x experts per layer) grows."""
    cfg = config.load("configs/moe.py:tiny")
    counts, rows = [], []
    for g in (1, 2):
        m = copy.deepcopy(cfg.model)
        m.update_from_flattened_dict(shapes.moe_shape(m.mlp_dim, expansion=4, granularity=g))
        counts.append(flops.count_params(m))
        rows.append(flops.granularity(m))
    assert rows == [1.0, 2.0]
    router_growth = 2 * 32 * (8 - 4)  # 2 layers x D x the 4 more experts
    for key in ("total", "active"):
        assert counts[1][key] - counts[0][key] == router_growth


def test_every_nth_layer_interleaves_and_scan_needs_every_layer():
    cfg = config.load("configs/moe.py:tiny", ["model.num_layers=4", "model.moe.every_nth_layer=2"])
    net = nnx.eval_shape(lambda: model.Transformer(cfg.model, nnx.Rngs(0)))
    assert [isinstance(b.mlp, moe.Moe) for b in net.blocks] == [False, True, False, True]
    counts = flops.count_params(cfg.model)
    assert counts["total"] - counts["active"] == 2 * 2 * 3 * 32 * 32  # 2 idle experts x 2 layers
    cfg.model.scan_layers = True
    with pytest.raises(ValueError, match="model.moe.every_nth_layer=1"):
        validate.validate(cfg, 8)


def test_scanned_layers_give_the_unrolled_logits_and_losses():
    cfg = moe_cfg()
    net = nnx.jit(lambda: model.Transformer(cfg, nnx.Rngs(0)))()
    scanned_cfg = copy.deepcopy(cfg)
    scanned_cfg.scan_layers = True
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model.Transformer(scanned_cfg,
                                                                       nnx.Rngs(1))))
    nnx.replace_by_pure_dict(state, model.stack_layers(nnx.to_pure_dict(nnx.state(net))))
    batch = {"inputs": jnp.arange(24).reshape(2, 12) % 50}
    logits, stats = nnx.jit(model.forward_with_aux)(net, batch)
    scanned_logits, scanned_stats = nnx.jit(model.forward_with_aux)(nnx.merge(graphdef, state),
                                                                    batch)
    np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-5)
    for key in moe.STATS:
        assert float(scanned_stats[key]) == pytest.approx(float(stats[key]), rel=1e-5)


def test_tiny_moe_trains_on_data_x_fsdp_and_eval_has_no_router_loss():
    """20 jitted steps on 8 devices (data 4 x fsdp 2): the loss falls, the router losses are
    logged, and train/loss (cross-entropy) equals the eval loss of the same state and batch."""
    cfg = config.load("configs/moe.py:tiny", ["mesh.data=4", "mesh.fsdp=2", "mesh.rules=fsdp"])
    mesh = sharding.make_mesh(cfg)
    rows = np.random.default_rng(0).integers(0, 64, (8, 33))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        batch = sharding.to_global({"inputs": rows[:, :-1], "targets": rows[:, 1:],
                                    "weights": np.ones((8, 32), np.float32)}, mesh)
        state, losses = fns.init(), []
        for step in range(20):
            evaluated = fns.eval(state, batch) if step == 0 else None
            state, m = fns.step(state, batch)
            losses.append(float(m["train/loss"]))
            if evaluated:
                assert losses[0] == pytest.approx(
                    float(evaluated["loss"] / evaluated["num_tokens"]), rel=1e-5)
    assert losses[-1] < losses[0] - 1.0
    assert {"train/moe_aux_loss", "train/moe_z_loss", "train/moe_dropped_fraction"} <= set(m)
    assert 1.0 <= float(m["train/moe_aux_loss"]) < 4.0


@pytest.mark.parametrize("override,message", [
    ("model.moe.top_k=5", "model.moe.top_k=5 exceeds model.moe.num_experts=4."),
    ("model.moe.every_nth_layer=3", "model.moe.every_nth_layer=3 exceeds model.num_layers=2"),
    ("model.moe.score=relu", "model.moe.score"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor=0.0 must be above 0."),
])
def test_bad_moe_settings_are_one_sentence(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate.validate(config.load("configs/moe.py:tiny", [override]), 8)
