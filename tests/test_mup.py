"""μP (lmjax/mup.py): the table's roles, init, per-layer LR, multipliers, SP unchanged, and the
coordinate check (activations flat in width under μP, growing under SP)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    cfg = short_smoke(parametrization="mup", mup_base_width=32, mup_base_head_dim=8)
    np.testing.assert_allclose(train_losses(cfg, tmp_path), SP_GOLDEN, rtol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_roles_by_name_in_either_layer_layout(scan_layers):
    cfg = smoke.get_config().model
    cfg.update(scan_layers=scan_layers, parametrization="mup")
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    labels = {jax.tree_util.keystr(p, simple=True, separator="/"): role for p, role in
              jax.tree_util.tree_flatten_with_path(mup.lr_labels(params))[0]}
    hidden = {n for n, r in labels.items() if r == "hidden"}
    assert len(hidden) == 7 * (1 if scan_layers else cfg.num_layers)  # q k v o up gate down
    assert all(n.split("/")[-3] in mup.HIDDEN and "/kernel" in n for n in hidden)
    assert [n for n, r in labels.items() if r == "readout"] == ["unembed/kernel/value"]
    assert [n for n, r in labels.items() if r == "input"] == ["embed/embedding/value"]
    vectors = {n for n, r in labels.items() if r == "vector"}
    assert vectors and all(n.split("/")[-2] == "scale" for n in vectors)  # norm scales


def wide(parametrization="mup", **model):
    """smoke's model at 4x its width (d_model 128), base width 32: m = 4."""
    cfg = smoke.get_config().model
    cfg.update(**{"d_model": 128, "num_heads": 16, "num_kv_heads": 8, "mlp_dim": 256,
                  "scan_layers": False, "parametrization": parametrization,
                  "mup_base_width": 32, "mup_base_head_dim": 8, "num_layers": 1, **model})
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
    """μP logits x m = the logits of SP with the same weights and queries x sqrt(H0/H)."""
    cfg_mu = wide(head_dim=16, num_heads=8, num_kv_heads=4)  # H = 16, H0 = 8
    mu = Transformer(cfg_mu, nnx.Rngs(0))
    sp = Transformer(wide("sp", head_dim=16, num_heads=8, num_kv_heads=4), nnx.Rngs(1))
    nnx.update(sp, nnx.state(mu, nnx.Param))
    sp.blocks[0].attn.q.kernel[...] = mu.blocks[0].attn.q.kernel[...] * (8 / 16) ** 0.5
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg_mu.vocab_size)
    np.testing.assert_allclose(mu(tokens) * 4, sp(tokens), rtol=1e-4, atol=1e-6)
    assert mup.query_multiplier(cfg_mu) * 16**-0.5 == pytest.approx(8**0.5 / 16)


def test_hidden_lr_and_decay_scale_by_one_over_m():
    c = base.get_config().optim
    c.update(lr=1.0, schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    params = {"blocks": {"attn": {"q": {"kernel": jnp.ones((4, 2, 2))}}},
              "unembed": {"kernel": jnp.ones((4, 8))}, "final_norm": {"scale": jnp.ones(4)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    scales = mup.lr_scales(wide())
    assert scales["hidden"] == 0.25 and mup.lr_scales(wide("sp")) is None
    sp, mu = optim.make(c, 10), optim.make(c, 10, scales, mup.lr_labels)
    for g in (grads, jax.tree.map(jnp.zeros_like, grads)):  # Adam step; decay alone
        u_sp, _ = sp.update(g, sp.init(params), params)
        u_mu, _ = mu.update(g, mu.init(params), params)
        q = lambda u: u["blocks"]["attn"]["q"]["kernel"]  # noqa: E731
        np.testing.assert_allclose(q(u_mu), 0.25 * q(u_sp), rtol=1e-6)
        np.testing.assert_allclose(u_mu["unembed"]["kernel"], u_sp["unembed"]["kernel"])
        np.testing.assert_allclose(u_mu["final_norm"]["scale"], u_sp["final_norm"]["scale"])
    assert float(q(u_mu)[0, 0, 0]) == pytest.approx(-0.25 * 0.5)  # lr/m x wd x p
    assert isinstance(sp, optax.GradientTransformation)


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
                     mup_base_width=32, mup_base_head_dim=8)
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
