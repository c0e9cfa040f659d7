import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from lmjax import attention, model, positions


def tiny(**overrides):
    cfg = smoke.get_config().model
    cfg.update(vocab_size=64, **overrides)
    return cfg


def logits_of(cfg, tokens):
    return model.Transformer(cfg, nnx.Rngs(0))(tokens)


TOKENS = jnp.array(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)

FAMILIES = {
    "llama": dict(),
    "gpt2": dict(position="learned", norm="layer", mlp="gelu", use_bias=True,
                 tie_embeddings=True, num_kv_heads=4),
    "sinusoidal_qknorm": dict(position="sinusoidal", qk_norm=True, num_kv_heads=1),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
    """Changing token j changes logits at j and later, never before."""
    cfg = tiny(**FAMILIES[family])
    m = model.Transformer(cfg, nnx.Rngs(0))
    j = 7
    changed = TOKENS.at[:, j].set((TOKENS[:, j] + 1) % 64)
    a, b = m(TOKENS), m(changed)
    assert a.shape == (2, 12, 64) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a[:, :j], b[:, :j])
    assert np.abs(a[:, j:] - b[:, j:]).max() > 1e-4


def reference_attention(q, k, v):
    """MHA written independently: repeat KV heads, loop over heads, explicit causal softmax."""
    B, L, N, H = q.shape
    k = np.repeat(np.asarray(k), N // k.shape[2], axis=2)
    v = np.repeat(np.asarray(v), N // v.shape[2], axis=2)
    out = np.zeros((B, L, N, H), np.float64)
    for n in range(N):
        s = np.einsum("bld,bsd->bls", q[:, :, n], k[:, :, n]) / np.sqrt(H)
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, n] = np.einsum("bls,bsd->bld", p, v[:, :, n])
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_reference(kv_heads):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 9, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 9, kv_heads, 8)).astype(np.float32)
    out = attention.attend(jnp.array(q), jnp.array(k), jnp.array(v), impl="xla")
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=1e-5)


def test_unknown_attention_impl():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="model.attention='flash' is not available"):
        attention.attend(x, x, x, impl="flash")


def test_rope_is_relative():
    """<rope(q, m), rope(k, n)> depends on m - n only, and rope keeps norms."""
    rng = np.random.default_rng(2)
    q, k = (jnp.array(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(m, n):
        pm, pn = jnp.full((1, 1), m), jnp.full((1, 1), n)
        return float(jnp.sum(positions.rope(q, pm, 1e4) * positions.rope(k, pn, 1e4)))

    assert score(5, 3) == pytest.approx(score(12, 10), rel=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), rel=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(positions.rope(q, jnp.full((1, 1), 9), 1e4)),
                               jnp.linalg.norm(q), rtol=1e-6)


def test_bf16_compute_keeps_f32_params():
    cfg32, cfg16 = tiny(), tiny(dtype="bfloat16")
    m16 = model.Transformer(cfg16, nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    a, b = logits_of(cfg32, TOKENS), m16(TOKENS)
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max()) + 1e-2
    assert float(jnp.abs(a - b).max()) > 0  # it really computed in bf16


def test_dropout_only_with_rngs():
    cfg = tiny(dropout=0.5)
    m = model.Transformer(cfg, nnx.Rngs(0))
    np.testing.assert_array_equal(m(TOKENS), m(TOKENS))
    a = m(TOKENS, rngs=nnx.Rngs(dropout=0))
    b = m(TOKENS, rngs=nnx.Rngs(dropout=1))
    assert np.abs(a - b).max() > 1e-3


def test_tied_embeddings_have_no_unembedding():
    m = model.Transformer(tiny(tie_embeddings=True), nnx.Rngs(0))
    assert not hasattr(m, "unembed")
    m = model.Transformer(tiny(), nnx.Rngs(0))
    assert m.unembed.kernel.shape == (32, 64)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_same_gradients(remat):
    def grads(cfg):
        m = model.Transformer(cfg, nnx.Rngs(0))
        return nnx.grad(lambda m: m(TOKENS).mean())(m)

    for a, b in zip(jax.tree.leaves(grads(tiny())), jax.tree.leaves(grads(tiny(remat=remat))),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
