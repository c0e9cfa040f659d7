"""lmjax/backends: a backend's own matmul gives the numbers and gradients of the plain one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from lmjax import model
from lmjax.backends import cpu, cpu_host

TOKENS = jnp.array(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
FAMILIES = {
    "llama": dict(),
    "gpt2": dict(position="learned", norm="layer", mlp="gelu", use_bias=True,
                 tie_embeddings=False, num_kv_heads=4),
}


@pytest.mark.parametrize("family,dtype,tol", [("llama", "float32", 1e-5),
                                              ("gpt2", "float32", 1e-5),
                                              ("llama", "bfloat16", 2e-2)])
def test_cpu_dense_matmul_gives_the_plain_gradients(family, dtype, tol):
    """The CPU backend's dense matmul only changes how the weight-gradient dot is laid out."""
    cfg = smoke.get_config().model
    cfg.update(vocab_size=64, dtype=dtype, **FAMILIES[family])

    def grads(dot_general):
        m = model.Transformer(cfg, nnx.Rngs(0), dot_general)
        return nnx.grad(lambda m: jnp.sin(m(TOKENS)).mean())(m)

    got, want = grads(cpu.dense_dot_general), grads(jax.lax.dot_general)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype == jnp.float32  # master weights' gradients
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 1e-2)


def _weight_grad_dots(dot_general):
    """The compiled HLO's dots for d/dW of a [B, L, 16] -> 24 dense layer, and its gradients."""
    layer = nnx.Linear(16, 24, dot_general=dot_general, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    loss = lambda layer, x: jnp.sum(jnp.sin(layer(x)))
    grad = jax.jit(nnx.grad(loss, argnums=(0, 1)))
    hlo = grad.lower(layer, x).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line or "dot_general" in line
            and "fusion(" not in line]
    return dots, grad(layer, x)


def test_cpu_weight_grad_dot_has_no_transposed_operand():
    """On XLA:CPU the folded dW = xᵀ·g contracts the left operand's first dimension (Eigen's
    path); through the CPU backend's matmul no dot does, and the gradients are the same."""
    folded, want = _weight_grad_dots(jax.lax.dot_general)
    plain, got = _weight_grad_dots(cpu.dense_dot_general)
    assert any("lhs_contracting_dims={0}" in line for line in folded)
    assert not any("lhs_contracting_dims={0}" in line for line in plain)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_cpu_matmul_is_picked_only_for_whole_weights_on_cpu():
    assert cpu.dot_general_for("cpu", weights_sharded=False) is cpu.dense_dot_general
    assert cpu.dot_general_for("cpu", weights_sharded=True) is jax.lax.dot_general
    assert cpu.dot_general_for("tpu", weights_sharded=False) is jax.lax.dot_general
    assert cpu.dot_general_for("gpu", weights_sharded=False) is jax.lax.dot_general


def test_the_model_reads_no_backend():
    """model.py names no platform: whatever differs per backend is handed to it."""
    source = open(model.__file__).read()
    for word in ("default_backend", '"cpu"', "'cpu'", "platform"):
        assert word not in source


@pytest.mark.parametrize("argv,platforms,devices,execs", [
    (["lmjax", "train"], "", [], True),  # a CPU-only host
    (["lmjax", "train"], "cpu", ["/dev/accel0"], True),  # JAX_PLATFORMS decides
    (["lmjax", "train"], "", ["/dev/accel0"], False),  # a TPU VM
    (["lmjax", "bench"], "", ["/dev/nvidia0"], False),  # a GPU host
    (["lmjax", "train"], "tpu", [], False),
    (["lmjax", "info"], "", [], False),  # runs no step
    (["lmjax"], "", [], False),
])
def test_malloc_re_exec_only_for_steps_on_the_cpu(monkeypatch, argv, platforms, devices, execs):
    calls = []
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LMJAX_HOST_MALLOC", raising=False)
    monkeypatch.setattr(cpu_host.glob, "glob", lambda pattern: [
        d for d in devices if d.startswith(pattern.split("*")[0].split("[")[0])])
    monkeypatch.setattr(cpu_host.os, "execve", lambda *args: calls.append(args))
    cpu_host.prepare(argv)
    assert bool(calls) == execs
    if execs:
        assert calls[0][2]["GLIBC_TUNABLES"] == cpu_host.HOST_MALLOC_TUNABLE
        assert calls[0][1][1:] == ["-m", "lmjax", *argv[1:]]


def test_padded_ragged_all_to_all_gives_the_documented_result():
    """What jax.lax.ragged_all_to_all's docstring says it computes, on 4 devices sending 2
    slices to each peer (random sizes, overlapping input slices, a non-zero output)."""
    ep, per, rows, out_rows = 4, 2, 8, 24
    rng = np.random.default_rng(0)
    operand = rng.normal(size=(ep, rows, 3)).astype(np.float32)
    output = rng.normal(size=(ep, out_rows, 3)).astype(np.float32)
    send = rng.integers(0, 4, (ep, ep * per)).astype(np.int32)  # [sender, slice]
    in_off = rng.integers(0, rows - 3, (ep, ep * per)).astype(np.int32)
    out_off = np.zeros_like(send)  # each receiver's slices laid end to end, senders in order
    for d in range(ep):
        at = 1
        for s in range(ep):
            for k in range(per):
                out_off[s, d * per + k], at = at, at + send[s, d * per + k]
    recv = np.stack([send[:, d * per:(d + 1) * per].reshape(-1) for d in range(ep)])
    want = output.copy()
    for d in range(ep):
        for s in range(ep):
            for k in range(per):
                i = d * per + k
                want[d, out_off[s, i]:out_off[s, i] + send[s, i]] = (
                    operand[s, in_off[s, i]:in_off[s, i] + send[s, i]])

    mesh = jax.make_mesh((ep,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:ep])
    spec = jax.sharding.PartitionSpec("x")
    exchange = jax.jit(jax.shard_map(
        lambda *a: cpu.padded_ragged_all_to_all(*(x[0] for x in a), axis_name="x")[None],
        mesh=mesh, in_specs=spec, out_specs=spec))
    got = exchange(operand, output, in_off, send, out_off, recv)
    np.testing.assert_array_equal(got, want)
