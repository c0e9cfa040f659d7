"""XLA:CPU: the model's dense matmul laid out as XLA:CPU's fastest kernels want it, and the
ragged all-to-all XLA:CPU lacks.

The matmul is picked once per train step (train.compile_fns, through dot_general_for); the
model only ever sees a dot_general with jax.lax.dot_general's signature and numbers. The
ragged all-to-all is picked by model.moe.exchange (moe.resolve_exchange), with
jax.lax.ragged_all_to_all's signature and result. The process-level setting
for XLA:CPU (glibc's malloc) is in cpu_host.py, which must not import JAX.
"""

import jax
import jax.numpy as jnp


# XLA folds the transpose of a weight gradient dW = xᵀ·g into the dot, and XLA:CPU then hands
# that dot to Eigen, as YNNPACK takes no transposed left operand; Eigen runs these 15-45%
# slower (3.4 vs 2.8 ms for the bench MLP's, 26 vs 22 ms for its unembedding's). Behind an
# optimization_barrier the transpose stays a buffer (the barrier itself is gone by the time
# XLA:CPU fuses), so every dot stays on YNNPACK. On [B, L, D] activations XLA:CPU also
# transposes before each weight-gradient dot; as [B*L, D] it does not.
@jax.custom_vjp
def _matmul(x_TD: jax.Array, w_DF: jax.Array) -> jax.Array:
    return x_TD @ w_DF


def _matmul_fwd(x_TD, w_DF):
    return x_TD @ w_DF, (x_TD, w_DF)


def _matmul_bwd(residuals, g_TF):
    x_TD, w_DF = residuals
    return g_TF @ w_DF.T, jax.lax.optimization_barrier(x_TD.T) @ g_TF


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None) -> jax.Array:
    """jax.lax.dot_general for the model's dense layers (x [..., D] @ w [D, F]): the same
    numbers, computed as a [tokens, D] matmul whose weight gradient multiplies a materialised
    xᵀ. Anything else goes to jax.lax.dot_general unchanged."""
    plain = (rhs.ndim == 2 and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
             and precision is None and preferred_element_type is None and out_sharding is None)
    if not plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
    y_TF = _matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y_TF.reshape(*lhs.shape[:-1], rhs.shape[-1])


def dot_general_for(platform: str, weights_sharded: bool):
    """The model's dense-layer matmul (lmjax.model.DotGeneral) for a train step on `platform`.

    XLA:CPU with whole weights on every device: dense_dot_general (measured in
    docs/performance.md). Where FSDP or tensor parallelism splits the weights, XLA would gather
    each weight again for its custom backward instead of keeping the forward's gather
    (all-gather bytes +62% unrolled, +17% scanned: lmjax plan, 4-way FSDP); other backends fuse
    the plain dot well. Both give the same numbers."""
    if platform == "cpu" and not weights_sharded:
        return dense_dot_general
    return jax.lax.dot_general


def padded_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                             send_sizes: jax.Array, output_offsets: jax.Array,
                             recv_sizes: jax.Array, *, axis_name: str) -> jax.Array:
    """jax.lax.ragged_all_to_all's result, from a dense all_to_all of every slice padded to the
    largest it could be, min(operand rows, output rows). XLA:CPU has no ragged-all-to-all
    (UNIMPLEMENTED, jax 0.10-0.12); this sends len(send_sizes) x that many rows where the
    native op sends the slices alone, so it is for CPU runs and tests (moe.resolve_exchange)."""
    n, out_rows = min(operand.shape[0], output.shape[0]), output.shape[0]
    rows_n = jnp.arange(n)
    source_Nn = jnp.clip(input_offsets[:, None] + rows_n, 0, operand.shape[0] - 1)
    sent_Nn = rows_n < send_sizes[:, None]
    chunks = jnp.where(sent_Nn.reshape(*sent_Nn.shape, *(1,) * (operand.ndim - 1)),
                       operand[source_Nn], 0)
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # slice i from i // per-peer
    starts_N = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    target_Nn = jnp.where(rows_n < recv_sizes[:, None], starts_N[:, None] + rows_n, out_rows)
    return output.at[target_Nn.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]),
                                                 mode="drop")
