"""Attention kernels behind one function, so the model never cares which one runs.

Every kernel takes queries with N heads and keys/values with K heads (N % K == 0: grouped-query
attention, Ainslie et al. 2023) and returns [B, L, N, H]. `xla` is the reference formulation that
runs on every backend; faster kernels must equal it on the same inputs.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def attend(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, impl: str = "xla",
           causal: bool = True, segment_ids_BL: jax.Array | None = None,
           mask_BLS: jax.Array | None = None) -> jax.Array:
    """Softmax attention of L queries over S keys; causal aligns the last query to the last key.

    With segment ids (packed rows, L = S), a query sees only keys of its own segment (document),
    so a packed document is attended exactly as if it were alone in the row.
    `mask_BLS` (True: may attend) serves a KV cache, whose slots are not aligned that way: it
    masks empty slots past the filled length and left padding.
    """
    if impl == "xla":
        return xla_attention(q_BLNH, k_BSKH, v_BSKH, causal=causal,
                             segment_ids_BL=segment_ids_BL, mask_BLS=mask_BLS)
    raise ValueError(f"model.attention={impl!r} is not available; choose one of {IMPLEMENTATIONS}.")


def xla_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                  causal: bool, segment_ids_BL: jax.Array | None = None,
                  mask_BLS: jax.Array | None = None) -> jax.Array:
    """Plain einsum attention; scores and softmax in float32 whatever the compute dtype."""
    B, L, N, H = q_BLNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K  # query heads sharing one key/value head
    q_BLKGH = q_BLNH.reshape(B, L, K, G, H)
    scores_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * H**-0.5
    if causal:
        # Query i sits at absolute position S - L + i, so it may see keys 0 .. S - L + i.
        mask_LS = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None] + (S - L)
        scores_BKGLS = jnp.where(mask_LS, scores_BKGLS, jnp.finfo(jnp.float32).min)
    if segment_ids_BL is not None:
        same_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
        scores_BKGLS = jnp.where(same_BLS[:, None, None], scores_BKGLS, jnp.finfo(jnp.float32).min)
    if mask_BLS is not None:
        scores_BKGLS = jnp.where(mask_BLS[:, None, None], scores_BKGLS, jnp.finfo(jnp.float32).min)
    probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(v_BSKH.dtype)
    out_BLKGH = jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS, v_BSKH)
    return out_BLKGH.reshape(B, L, N, H)
