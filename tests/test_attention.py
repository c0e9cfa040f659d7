"""The attention switch: which kernel each choice means where, and that each equals the reference.

cuDNN and splash cannot run on CPU, but their wiring can: jax.nn.dot_product_attention with
implementation='xla' is the cudnn path's call, and the splash kernel runs in Pallas's
interpreter, inside the same shard_map over batch and heads that a TPU run uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from lmjax import attention, sharding, train

B, L, N, K, H = 4, 128, 4, 2, 32  # GQA: two query heads per key/value head


@pytest.fixture(scope="module")
def qkv():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (B, L, N, H)) * 2.0, jax.random.normal(kk, (B, L, K, H)),
            jax.random.normal(kv, (B, L, K, H)))


@pytest.fixture(scope="module")
def segments():
    """Three documents per row, cut at different places in each row."""
    cuts = np.array([[10, 70], [64, 65], [1, 127], [50, 100]])
    idx = np.arange(L)
    return jnp.asarray(1 + (idx >= cuts[:, :1]) + (idx >= cuts[:, 1:]), jnp.int32)


@pytest.mark.parametrize("impl,platform,dtype,want", [
    ("auto", "cpu", "float32", "xla"),
    ("auto", "cpu", "bfloat16", "xla"),
    ("auto", "gpu", "bfloat16", "cudnn"),
    ("auto", "gpu", "float16", "cudnn"),
    ("auto", "gpu", "float32", "xla"),  # cuDNN flash attention has no float32 kernel
    ("auto", "tpu", "float32", "splash"),
    ("ring", "cpu", "float32", "ring"),
    ("xla", "tpu", "bfloat16", "xla"),
])
def test_resolve_picks_by_platform_and_dtype(impl, platform, dtype, want):
    assert attention.resolve(impl, platform, dtype) == want


@pytest.mark.parametrize("impl,platform,dtype,message", [
    ("cudnn", "cpu", "bfloat16", "model.attention='cudnn' needs a GPU; this run has cpu devices."),
    ("splash", "cpu", "float32", "model.attention='splash' needs a TPU; this run has cpu devices."),
    ("splash", "gpu", "bfloat16", "needs a TPU; this run has gpu devices."),
    ("cudnn", "gpu", "float32", "needs model.dtype bfloat16 or float16 (cuDNN flash attention); "
                                "got float32."),
])
def test_unavailable_kernels_are_one_sentence(impl, platform, dtype, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attention.resolve(impl, platform, dtype)


def test_compile_fns_refuses_before_compiling_and_resolves_auto():
    cfg = smoke.get_config()
    cfg.mesh.data = 1
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    cfg.model.attention = "cudnn"
    with pytest.raises(ValueError, match="needs a GPU; this run has cpu devices"):
        train.compile_fns(cfg, mesh)
    cfg.model.attention = "auto"
    assert train.with_kernel(cfg, "cpu").model.attention == "xla"
    assert train.with_kernel(cfg, "tpu").model.attention == "splash"
    assert cfg.model.attention == "auto"  # the caller's config is left as it was


@pytest.mark.parametrize("with_segments", [False, True])
def test_dot_product_attention_call_equals_reference(qkv, segments, with_segments):
    seg = segments if with_segments else None
    got = attention.cudnn_attention(*qkv, causal=True, segment_ids_BL=seg, implementation="xla")
    want = attention.xla_attention(*qkv, causal=True, segment_ids_BL=seg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_splash_kernel_equals_reference_inside_its_shard_map(qkv, segments):
    """batch over data (2) and heads over tensor (2), as fsdp_tp lays activations out."""
    cfg = smoke.get_config()
    cfg.mesh.update(data=2, fsdp=1, tensor=2)
    mesh = sharding.make_mesh(cfg, jax.devices()[:4])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules("fsdp_tp")):
        fn = jax.jit(lambda q, k, v, s: attention.splash_attention(
            q, k, v, causal=True, segment_ids_BL=s, mesh=jax.sharding.get_abstract_mesh(),
            interpret=True))
        got = fn(*qkv, segments)
        hlo = fn.lower(*qkv, segments).as_text()
    want = attention.xla_attention(*qkv, causal=True, segment_ids_BL=segments)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert "sdy.manual_computation" in hlo or "shard_map" in hlo  # per-device kernel


def test_ring_with_segments_equals_reference(qkv, segments):
    ring_mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                              devices=jax.devices()[:4])
    got = jax.jit(lambda q, k, v, s: attention.ring_attention(
        q, k, v, mesh=ring_mesh, axis_name="seq", segment_ids_BL=s))(*qkv, segments)
    want = attention.xla_attention(*qkv, causal=True, segment_ids_BL=segments)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Row 2 has a one-token first document: its query sees only itself.
    np.testing.assert_allclose(got[2, 0, :2], qkv[2][2, 0, :1].repeat(2, 0), atol=1e-6)


def _count_dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.fixture(scope="module")
def long_qkv():
    """Long enough for xla_attention's causal split; GQA with two query heads per KV head."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    Ls = attention.CAUSAL_SPLIT_MIN_LEN
    return (jax.random.normal(kq, (2, Ls, 4, 16)) * 2.0, jax.random.normal(kk, (2, Ls, 2, 16)),
            jax.random.normal(kv, (2, Ls, 2, 16)))


@pytest.mark.parametrize("kind", ["plain", "segments", "window", "mask"])
def test_causal_split_equals_one_block(long_qkv, kind):
    """The two-halves path gives the one-block formula's outputs and gradients, and is taken:
    four score/value matmuls instead of two."""
    Ls = long_qkv[0].shape[1]
    idx = np.arange(Ls)
    kwargs, valid_BL11 = {}, jnp.ones((2, Ls, 1, 1))
    if kind == "segments":  # documents that cross the halves' boundary, and one inside each
        cuts = np.array([[40, Ls // 2 + 9], [Ls // 2 - 1, Ls // 2]])
        kwargs["segment_ids_BL"] = jnp.asarray(1 + (idx >= cuts[:, :1]) + (idx >= cuts[:, 1:]))
    elif kind == "window":
        kwargs["window"] = 50
    elif kind == "mask":  # as a left-padded cache would give: row 1 starts at slot 30
        start = np.array([0, 30])[:, None, None]
        kwargs["mask_BLS"] = jnp.asarray(np.broadcast_to(idx >= start, (2, Ls, Ls)))
        # queries before the start see no key at all: their outputs are padding, never read
        valid_BL11 = jnp.asarray(idx[None, :] >= start[:, 0], jnp.float32)[..., None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, causal=True, **kwargs)) * valid_BL11)

    split, whole = attention.xla_attention, attention._attention_block
    np.testing.assert_allclose(split(*long_qkv, causal=True, **kwargs) * valid_BL11,
                               whole(*long_qkv, causal=True, **kwargs) * valid_BL11,
                               rtol=1e-5, atol=1e-5)
    for g_split, g_whole in zip(jax.grad(loss(split), argnums=(0, 1, 2))(*long_qkv),
                                jax.grad(loss(whole), argnums=(0, 1, 2))(*long_qkv),
                                strict=True):
        np.testing.assert_allclose(g_split, g_whole, rtol=1e-4, atol=1e-5)
    assert _count_dots(lambda *a: split(*a, causal=True, **kwargs), *long_qkv) == 4
    assert _count_dots(lambda *a: whole(*a, causal=True, **kwargs), *long_qkv) == 2


def test_causal_split_equals_independent_reference(long_qkv):
    from tests.test_model import reference_attention
    got = attention.attend(*long_qkv, impl="xla")
    np.testing.assert_allclose(got, reference_attention(*map(np.asarray, long_qkv)), atol=1e-4)


def test_no_causal_split_where_it_does_not_apply(long_qkv):
    """Not causal, odd or short lengths, and a sequence split over 'seq' run in one block."""
    q, k, v = long_qkv
    assert _count_dots(lambda *a: attention.xla_attention(*a, causal=False), q, k, v) == 2
    assert _count_dots(lambda *a: attention.xla_attention(*a, causal=True),
                       q[:, 1:], k[:, 1:], v[:, 1:]) == 2
    assert _count_dots(lambda *a: attention.xla_attention(*a, causal=True),
                       q[:, :64], k[:, :64], v[:, :64]) == 2
    seq_mesh = jax.make_mesh((2,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:2])
    with jax.set_mesh(seq_mesh):
        assert _count_dots(lambda *a: attention.xla_attention(*a, causal=True), q, k, v) == 2
