"""Attention kernels behind one function, so the model never cares which one runs.

Every kernel takes queries with N heads and keys/values with K heads (N % K == 0: grouped-query
attention, Ainslie et al. 2023) and returns [B, L, N, H]. `xla` is the reference formulation that
runs on every backend; faster kernels must equal it on the same inputs. `ring` splits the
sequence over a mesh axis (context parallelism) so no device ever holds all L keys.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "ring")
RING_AXIS = "seq"  # the mesh axis attend(impl='ring') splits the sequence over


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
    if impl == "ring":
        if segment_ids_BL is not None or mask_BLS is not None:
            raise ValueError("model.attention='ring' supports neither packed segments nor a KV "
                             "cache mask; use model.attention='xla' for those.")
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or RING_AXIS not in mesh.axis_names:
            raise ValueError(f"model.attention='ring' needs a mesh with a {RING_AXIS!r} axis to "
                             f"split the sequence over; the current mesh has "
                             f"{tuple(mesh.axis_names)}.")
        return ring_attention(q_BLNH, k_BSKH, v_BSKH, mesh=mesh, axis_name=RING_AXIS,
                              causal=causal)
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


def ring_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, axis_name: str,
                   causal: bool = True) -> jax.Array:
    """Attention with L split into P blocks over `axis_name`; keys/values travel round a ring.

    Ring attention (Liu et al. 2023): device i keeps query block i and, over P steps, sees every
    key/value block as they are passed to the next device with ppermute, folding each into a
    flash-style running max and sum (Dao et al. 2022). Memory per device is O(L / P); the
    communication overlaps the next block's math on hardware that can. Self-attention only
    (L = S); masked blocks are computed and discarded, which costs ~2x FLOPs but keeps every
    step's shape the same.
    """
    if q_BLNH.shape[1] != k_BSKH.shape[1]:
        raise ValueError(f"ring attention needs as many queries as keys; got L="
                         f"{q_BLNH.shape[1]}, S={k_BSKH.shape[1]}.")
    if q_BLNH.shape[1] % mesh.shape[axis_name]:
        raise ValueError(f"Sequence length {q_BLNH.shape[1]} does not split over mesh axis "
                         f"{axis_name!r} of {mesh.shape[axis_name]} devices.")
    spec = P(None, axis_name)
    fn = functools.partial(_ring_block, axis_name=axis_name, causal=causal,
                           ring_size=mesh.shape[axis_name])
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         axis_names={axis_name}, check_vma=False)(q_BLNH, k_BSKH, v_BSKH)


def _ring_block(q_BLNH, k_BSKH, v_BSKH, *, axis_name, causal, ring_size):
    """One device's share: its query block against all P key blocks, starting with its own."""
    B, L, N, H = q_BLNH.shape  # L = S = the local block length
    K = k_BSKH.shape[2]
    q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)
    me = jax.lax.axis_index(axis_name)
    perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]
    neg = jnp.finfo(jnp.float32).min
    max_BKGL = jnp.full((B, K, N // K, L), neg, jnp.float32)
    sum_BKGL = jnp.zeros((B, K, N // K, L), jnp.float32)
    out_BKGLH = jnp.zeros((B, K, N // K, L, H), jnp.float32)
    for t in range(ring_size):
        src = (me - t) % ring_size  # whose key block this device holds at step t
        scores_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH,
                                  preferred_element_type=jnp.float32) * H**-0.5
        if causal:  # absolute positions: query me*L + i may see key src*L + j when j' <= i'
            mask_LS = (src * L + jnp.arange(L))[None, :] <= (me * L + jnp.arange(L))[:, None]
            scores_BKGLS = jnp.where(mask_LS, scores_BKGLS, neg)
        # Step 0 is the diagonal block, where every query sees itself: the max is finite after
        # it, so a fully masked later block adds exp(neg - max) = 0 and never a NaN.
        new_max_BKGL = jnp.maximum(max_BKGL, scores_BKGLS.max(-1))
        probs_BKGLS = jnp.exp(scores_BKGLS - new_max_BKGL[..., None])
        scale_BKGL = jnp.exp(max_BKGL - new_max_BKGL)
        sum_BKGL = sum_BKGL * scale_BKGL + probs_BKGLS.sum(-1)
        out_BKGLH = out_BKGLH * scale_BKGL[..., None] + jnp.einsum(
            "BKGLS,BSKH->BKGLH", probs_BKGLS.astype(v_BSKH.dtype), v_BSKH,
            preferred_element_type=jnp.float32)
        max_BKGL = new_max_BKGL
        if t + 1 < ring_size:
            k_BSKH, v_BSKH = jax.lax.ppermute((k_BSKH, v_BSKH), axis_name, perm)
    out_BKGLH = out_BKGLH / sum_BKGL[..., None]
    return out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H).astype(q_BLNH.dtype)
