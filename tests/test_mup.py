"""μP (lmjax/mup.py): the table's roles, per-matrix fan-in multipliers from base shapes, init,
per-group LR and width-independent decay, the tuned multipliers and zero-inits, depth-μP, SP
unchanged, and the coordinate check (activations flat in width under μP, growing under SP)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, smoke
from lmjax import coord_check, mup, optim, train, validate
from lmjax.model import Transformer

# configs/smoke.py, unrolled layers, 3 steps (warmup 1) on one device, trained by the code
# before μP existed (git HEAD 7e35619, on an AVX-512 host): SP must still give these losses.
# Bitwise only on the same CPU: XLA:CPU's matmul kernels for AVX2 and AVX-512 round in a
# different order (6e-8 relative measured on an AVX2 host), so the tolerance is 1e-6.
SP_GOLDEN = [7.62701940536499, 7.635341167449951, 7.585109233856201]


def short_smoke(**model):
    cfg = smoke.get_config()
    cfg.model.update(scan_layers=False, **model)
    cfg.train.update(steps=3, eval_every=0, log_every=1)
    cfg.optim.warmup_steps = 1
    cfg.checkpoint.update(every=3, async_save=False)
    return cfg


def train_losses(cfg, workdir) -> list[float]:
    train.run(cfg, str(workdir), devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["train/loss"] for line in f]


def test_sp_losses_are_unchanged(tmp_path):
    np.testing.assert_allclose(train_losses(short_smoke(parametrization="sp"), tmp_path),
                               SP_GOLDEN, rtol=1e-6)


def test_mup_at_its_base_width_is_sp(tmp_path):
    """m = 1 and H = H0: every μP factor is 1, so the run is SP's to float rounding."""
    cfg = short_smoke(parametrization="mup", mup_base_width=32, mup_base_attn_dim=32,
                      mup_base_mlp_dim=64, mup_base_head_dim=8)
    np.testing.assert_allclose(train_losses(cfg, tmp_path), SP_GOLDEN, rtol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_roles_by_name_in_either_layer_layout(scan_layers):
    cfg = smoke.get_config().model
    cfg.update(scan_layers=scan_layers, parametrization="mup")
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    labels = {jax.tree_util.keystr(p, simple=True, separator="/"): role for p, role in
              jax.tree_util.tree_flatten_with_path(mup.lr_labels(params))[0]}
    hidden = {n for n, r in labels.items() if r.startswith("hidden/")}
    assert len(hidden) == 7 * (1 if scan_layers else cfg.num_layers)  # q k v o up gate down
    assert all(n.split("/")[-3] in mup.HIDDEN and "/kernel" in n for n in hidden)
    assert {labels[n] for n in hidden if n.split("/")[-3] == "o"} == {"hidden/attn"}
    assert {labels[n] for n in hidden if n.split("/")[-3] == "down"} == {"hidden/mlp"}
    assert {labels[n] for n in hidden if n.split("/")[-3] == "q"} == {"hidden/d_model"}
    assert [n for n, r in labels.items() if r == "readout"] == ["unembed/kernel/value"]
    assert [n for n, r in labels.items() if r == "input"] == ["embed/embedding/value"]
    vectors = {n for n, r in labels.items() if r in ("vector", "block_vector")}
    assert vectors and all(n.split("/")[-2] == "scale" for n in vectors)  # norm scales
    assert [n for n, r in labels.items() if r == "vector"] == ["final_norm/scale/value"]


def wide(parametrization="mup", **model):
    """smoke's model at 4x its width (d_model 128), base width 32: m = 4."""
    cfg = smoke.get_config().model
    cfg.update(**{"d_model": 128, "num_heads": 16, "num_kv_heads": 8, "mlp_dim": 256,
                  "scan_layers": False, "parametrization": parametrization,
                  "mup_base_width": 32, "mup_base_attn_dim": 32, "mup_base_mlp_dim": 64,
                  "mup_base_head_dim": 8, "num_layers": 1, **model})
    return cfg


def test_init_scales_with_fan_in():
    sp, mu = (Transformer(wide(p), nnx.Rngs(0)) for p in ("sp", "mup"))
    std = lambda x: float(jnp.std(x[...]))  # noqa: E731
    for get in (lambda m: m.blocks[0].attn.q.kernel, lambda m: m.blocks[0].mlp.up.kernel):
        assert std(get(mu)) == pytest.approx(std(get(sp)) / 2, rel=1e-6)  # 1/sqrt(m), m = 4
        assert std(get(sp)) == pytest.approx(0.02, rel=0.02)
    assert std(mu.blocks[0].mlp.down.kernel) == pytest.approx(0.02 / 2 / 2**0.5, rel=0.02)
    for get in (lambda m: m.embed.embedding, lambda m: m.unembed.kernel):  # not width-scaled
        assert std(get(mu)) == std(get(sp))


def test_logit_multiplier_and_attention_scale():
    """μP logits x m / alpha_out = the logits of SP with the same weights, the embedding table x
    alpha_embed and queries x alpha_attn sqrt(H0/H)."""
    knobs = dict(head_dim=16, num_heads=8, num_kv_heads=4)  # H = 16, H0 = 8
    cfg_mu = wide(**knobs, mup_output_mult=2.0, mup_attn_mult=3.0, mup_embed_mult=0.5)
    mu = Transformer(cfg_mu, nnx.Rngs(0))
    sp = Transformer(wide("sp", **knobs), nnx.Rngs(1))
    nnx.update(sp, nnx.state(mu, nnx.Param))
    sp.blocks[0].attn.q.kernel[...] = mu.blocks[0].attn.q.kernel[...] * 3 * (8 / 16) ** 0.5
    sp.embed.embedding[...] = mu.embed.embedding[...] * 0.5
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg_mu.vocab_size)
    np.testing.assert_allclose(mu(tokens) * 4 / 2, sp(tokens), rtol=1e-4, atol=1e-6)
    assert mup.query_multiplier(cfg_mu) * 16**-0.5 == pytest.approx(3 * 8**0.5 / 16)
    assert mup.output_multiplier(cfg_mu) == 0.5


def test_readout_and_query_zero_init():
    mu = Transformer(wide(mup_readout_init_mult=0.0, mup_zero_query=True), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    assert not np.any(mu(tokens)) and not np.any(mu.blocks[0].attn.q.kernel[...])
    assert np.any(mu.blocks[0].attn.k.kernel[...])


def test_per_matrix_fan_in_multipliers_from_base_shapes():
    """D 128 of 32, heads x head_dim 96 of 32, mlp 512 of 64 (ratios that drift, as LLaMA's
    presets' do): q, o and down each scale with their own fan-in (m = 4, 3, 8)."""
    cfg = wide(num_heads=12, num_kv_heads=12, mlp_dim=512)
    assert mup.lr_scales(cfg) == {"hidden/d_model": 1 / 4, "hidden/attn": 1 / 3,
                                  "hidden/mlp": 1 / 8, "block_vector": 1.0, "vector": 1.0,
                                  "input": 1.0, "readout": 1.0}
    assert [mup.hidden_init_scale(cfg, k) for k in ("q", "o", "down")] == [4**-0.5, 3**-0.5,
                                                                           8**-0.5]
    mu = Transformer(cfg, nnx.Rngs(0))
    std = lambda x: float(jnp.std(x[...]))  # noqa: E731
    attn, mlp = mu.blocks[0].attn, mu.blocks[0].mlp
    assert std(attn.q.kernel) == pytest.approx(0.02 / 2, rel=0.03)
    assert std(attn.o.kernel) == pytest.approx(0.02 / 3**0.5 / 2**0.5, rel=0.03)  # / sqrt(2L)
    assert std(mlp.down.kernel) == pytest.approx(0.02 / 8**0.5 / 2**0.5, rel=0.03)


def test_base_shapes_must_all_move_or_none():
    """A hidden width left at its base while d_model grows makes `up` a readout: refused."""
    cfg = smoke.get_config()
    cfg.model.update(parametrization="mup", d_model=64, mlp_dim=128, num_heads=8,
                     mup_base_width=32, mup_base_attn_dim=32, mup_base_mlp_dim=128)
    with pytest.raises(ValueError, match=r"model.mup_base_mlp_dim=128 equals .* "
                                         r"model.mup_base_width=32 differs"):
        validate.validate(cfg, 8)
    cfg.model.mup_base_mlp_dim = 64
    validate.validate(cfg, 8)
    cfg.model.update(tie_embeddings=True, mup_readout_init_mult=0.0)
    with pytest.raises(ValueError, match="model.mup_readout_init_mult=0.0 needs an untied"):
        validate.validate(cfg, 8)
    cfg.model.update(tie_embeddings=False, mup_decay="none")
    with pytest.raises(ValueError, match="model.mup_decay='none' is not one of"):
        validate.validate(cfg, 8)


OPTIM_PARAMS = {"blocks": {"attn": {"q": {"kernel": jnp.ones((4, 2, 2))}}},
                "unembed": {"kernel": jnp.ones((4, 8))}, "final_norm": {"scale": jnp.ones(4)}}


def one_step(model_cfg, grads_value: float, **overrides):
    """The update of one μP (or SP) optimizer step at lr 1, weight decay 0.5, from p = 1."""
    c = base.get_config().optim
    c.update(lr=1.0, schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=0.0,
             **overrides)
    tx = optim.make(c, 10, mup.lr_scales(model_cfg), mup.lr_labels, mup.decay_scales(model_cfg))
    grads = jax.tree.map(lambda p: jnp.full_like(p, grads_value), OPTIM_PARAMS)
    return tx.update(grads, tx.init(OPTIM_PARAMS), OPTIM_PARAMS)[0]


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_hidden_adam_update_scales_by_one_over_m_but_decay_does_not(name):
    """MuAdamW: the hidden matrix's Adam step is lr/m, its decay lr wd p at any width."""
    q = lambda u: u["blocks"]["attn"]["q"]["kernel"]  # noqa: E731
    base_size = wide(d_model=32, num_heads=4, num_kv_heads=4, mlp_dim=64)  # m = 1
    sp, narrow, mu = (one_step(cfg, 0.3, name=name) for cfg in (wide("sp"), base_size, wide()))
    np.testing.assert_allclose(q(mu), 0.25 * (q(sp) + 0.5) - 0.5, rtol=1e-6)  # -u/4 - wd p
    np.testing.assert_allclose(q(narrow), q(sp), rtol=1e-6)  # m = 1: μP is SP
    for key in ("unembed", "final_norm"):
        np.testing.assert_allclose(jax.tree.leaves(mu[key]), jax.tree.leaves(sp[key]), rtol=1e-6)
    for cfg in (base_size, wide(), wide(d_model=256)):
        decay = one_step(cfg, 0.0, name=name)  # zero gradients: the decay alone
        np.testing.assert_allclose(q(decay), -0.5, rtol=1e-6)  # -lr wd p, whatever the width


def test_scaled_decay_keeps_the_old_coupled_behaviour():
    q = lambda u: u["blocks"]["attn"]["q"]["kernel"]  # noqa: E731
    sp, mu = (one_step(cfg, 0.3) for cfg in (wide("sp"), wide(mup_decay="scaled")))
    np.testing.assert_allclose(q(mu), 0.25 * q(sp), rtol=1e-6)
    assert float(q(one_step(wide(mup_decay="scaled"), 0.0))[0, 0, 0]) == pytest.approx(-0.125)
    assert mup.lr_scales(wide("sp")) is None and mup.decay_scales(wide("sp")) is None


def test_depth_mup_scales_branches_and_block_lr():
    """L = 4 of base 1 at alpha 1/2: every branch x 1/2 (the logits of a model whose o and down
    kernels are halved), residual init by the base depth, block LRs x 1/2, decay untouched."""
    cfg = wide(num_layers=4, mup_base_depth=1)
    deep, plain = Transformer(cfg, nnx.Rngs(0)), Transformer(wide(num_layers=4), nnx.Rngs(1))
    assert mup.branch_multiplier(cfg) == 0.5
    nnx.update(plain, nnx.state(deep, nnx.Param))
    for block in plain.blocks:
        block.attn.o.kernel[...] *= 0.5
        block.mlp.down.kernel[...] *= 0.5
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    np.testing.assert_allclose(deep(tokens), plain(tokens), rtol=1e-4, atol=1e-6)
    o_std = float(jnp.std(deep.blocks[0].attn.o.kernel[...]))
    assert o_std == pytest.approx(0.02 / 2 / 2**0.5, rel=0.05)  # / sqrt(m_A 2 L0), m_A = 4
    scales, decays = mup.lr_scales(cfg), mup.decay_scales(cfg)
    assert scales["hidden/d_model"] == 0.25 * 0.5 and scales["block_vector"] == 0.5
    assert scales["input"] == scales["readout"] == scales["vector"] == 1.0
    assert decays["hidden/d_model"] == 1.0
    complete = wide(num_layers=4, mup_base_depth=1, mup_depth_alpha=1.0)  # CompleteP
    assert mup.branch_multiplier(complete) == 0.25 and mup.lr_scales(complete)["block_vector"] == 1


def test_config_rejects_bad_parametrization():
    cfg = smoke.get_config()
    cfg.model.parametrization = "ntk"
    with pytest.raises(ValueError, match="model.parametrization='ntk' is not one of"):
        validate.validate(cfg, 8)
    cfg.model.update(parametrization="mup", mup_base_width=0)
    with pytest.raises(ValueError, match="model.mup_base_width=0 must be at least 1"):
        validate.validate(cfg, 8)


def test_width_config_scales_heads_and_mlp():
    cfg = smoke.get_config()  # d_model 32, heads 4 / kv 2 of 8, mlp 64
    wide_cfg = coord_check.width_config(cfg, 128, "mup")
    m = wide_cfg.model
    assert (m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim) == (128, 16, 8, 8, 256)
    assert (m.parametrization, wide_cfg.optim.warmup_steps) == ("mup", 0)
    with pytest.raises(ValueError, match="Width 24 gives model.num_kv_heads=1.5"):
        coord_check.width_config(cfg, 24, "sp")


@pytest.fixture(scope="module")
def coords(tmp_path_factory):
    cfg = smoke.get_config()
    cfg.model.update(num_layers=1, num_heads=4, num_kv_heads=4, mlp_dim=128,
                     mup_base_width=32, mup_base_attn_dim=32, mup_base_mlp_dim=128,
                     mup_base_head_dim=8)
    out = str(tmp_path_factory.mktemp("coord"))
    return coord_check.run(cfg, [32, 64, 128], 4, out), out


@pytest.mark.slow
def test_coord_check_flat_under_mup_growing_under_sp(coords):
    results, out = coords
    mu, sp = (coord_check.slope(results[p], "logits", 4) for p in ("mup", "sp"))
    assert abs(mu) < 0.25 and sp > 0.5, (mu, sp)
    for name in ("block0.attn", "block0.mlp"):  # hidden outputs too
        assert abs(coord_check.slope(results["mup"], name, 4)) < 0.4
        assert coord_check.slope(results["sp"], name, 4) > 0.8
    assert sorted(os.listdir(out)) == ["coord_check.json", "coord_check_mup.png",
                                       "coord_check_sp.png"]


def test_hugging_face_export_refuses_mup():
    """HF models have no logit multiplier or 1/H attention: export would change the model."""
    from lmjax.interop import hf

    cfg = smoke.get_config().model
    assert hf.family(cfg) == "llama"
    cfg.parametrization = "mup"
    with pytest.raises(ValueError, match="model.parametrization='mup' has no llama equivalent"):
        hf.family(cfg)
