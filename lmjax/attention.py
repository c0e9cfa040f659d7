"""Attention kernels behind one function, so the model never cares which one runs.

Every kernel takes queries with N heads and keys/values with K heads (N % K == 0: grouped-query
attention, Ainslie et al. 2023) and returns [B, L, N, H]. `xla` is the reference formulation that
runs on every backend; faster kernels must equal it on the same inputs:

  xla     einsum + softmax; everywhere
  cudnn   cuDNN flash attention via jax.nn.dot_product_attention; GPU, bfloat16/float16 only
  splash  Pallas splash attention (block-sparse flash attention); TPU only
  ring    the sequence split over mesh axis 'seq' (context parallelism): no device ever holds
          all L keys
  auto    splash on TPU; cudnn on GPU when model.dtype is bfloat16/float16; xla otherwise
          (ring is never picked: it is a parallelism choice, not a faster kernel)

Decoding (a KV-cache mask, one new query a step) always runs on `xla`: a fused kernel gains
nothing there, and the cache is not split over 'seq'.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from lmjax import config

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "ring", "auto")
RING_AXIS = "seq"  # the mesh axis attend(impl='ring') splits the sequence over
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve(impl: str, platform: str, dtype) -> str:
    """The kernel `impl` means on `platform` ('cpu' | 'gpu' | 'tpu') for compute `dtype`.

    Raises ValueError with the cause when the kernel cannot run there, so a run fails before
    anything is compiled rather than deep inside XLA or Mosaic.
    """
    half = jnp.dtype(dtype) in _HALF_DTYPES
    if impl == "auto":
        return "splash" if platform == "tpu" else "cudnn" if platform == "gpu" and half else "xla"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={impl!r} is not one of {IMPLEMENTATIONS}.")
    needs = {"cudnn": ("gpu", "a GPU"), "splash": ("tpu", "a TPU")}
    if impl in needs and platform != needs[impl][0]:
        raise ValueError(f"model.attention={impl!r} needs {needs[impl][1]}; this run has "
                         f"{platform} devices.")
    if impl == "cudnn" and not half:
        raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16 (cuDNN "
                         f"flash attention); got {jnp.dtype(dtype).name}.")
    return impl


def validate(cfg: ml_collections.ConfigDict) -> None:
    """model.attention and model.attention_window. A window longer than data.seq_len is refused
    rather than ignored: no query could reach past it, so it would silently be full attention
    (a window equal to it is allowed: it takes effect when evaluated at longer contexts)."""
    window, seq_len = cfg.model.attention_window, cfg.data.seq_len
    config.check_choices(cfg, {"model.attention": IMPLEMENTATIONS})
    if window > seq_len:
        raise ValueError(f"model.attention_window={window} is larger than the context "
                         f"data.seq_len={seq_len}, where it would change nothing; use a window "
                         f"<= {seq_len}, or 0 for full attention.")


def attend(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, impl: str = "xla",
           causal: bool = True, segment_ids_BL: jax.Array | None = None,
           mask_BLS: jax.Array | None = None, window: int = 0) -> jax.Array:
    """Softmax attention of L queries over S keys; causal aligns the last query to the last key.

    With segment ids (packed rows, L = S), a query sees only keys of its own segment (document),
    so a packed document is attended exactly as if it were alone in the row.
    `mask_BLS` (True: may attend) serves a KV cache, whose slots are not aligned that way: it
    masks empty slots past the filled length and left padding.
    `window` > 0 (causal only) is sliding-window attention (Mistral): query i sees keys
    i - window < j <= i. It runs on `xla` whatever `impl` says (a banded mask, O(L^2) like full
    attention): correct everywhere; fused local-window kernels are not wired in yet.
    """
    if impl == "auto":  # train.compile_fns resolves it for the mesh; this serves eval / sample
        impl = resolve(impl, jax.default_backend(), q_BLNH.dtype)
    if impl == "xla" or mask_BLS is not None or window:
        return xla_attention(q_BLNH, k_BSKH, v_BSKH, causal=causal,
                             segment_ids_BL=segment_ids_BL, mask_BLS=mask_BLS, window=window)
    if impl == "cudnn":
        return cudnn_attention(q_BLNH, k_BSKH, v_BSKH, causal=causal,
                               segment_ids_BL=segment_ids_BL)
    mesh = jax.sharding.get_abstract_mesh()
    if impl == "splash":
        return splash_attention(q_BLNH, k_BSKH, v_BSKH, causal=causal,
                                segment_ids_BL=segment_ids_BL, mesh=mesh)
    if impl == "ring":
        if mesh.empty or RING_AXIS not in mesh.axis_names:
            raise ValueError(f"model.attention='ring' needs a mesh with a {RING_AXIS!r} axis to "
                             f"split the sequence over; the current mesh has "
                             f"{tuple(mesh.axis_names)}.")
        return ring_attention(q_BLNH, k_BSKH, v_BSKH, mesh=mesh, axis_name=RING_AXIS,
                              causal=causal, segment_ids_BL=segment_ids_BL)
    raise ValueError(f"model.attention={impl!r} is not available; choose one of {IMPLEMENTATIONS}.")


def _same_segment(segment_ids_BL: jax.Array) -> jax.Array:
    return segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]


def cudnn_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, causal: bool,
                    segment_ids_BL: jax.Array | None = None,
                    implementation: str = "cudnn") -> jax.Array:
    """jax.nn.dot_product_attention: cuDNN's fused flash attention (`implementation='xla'` runs
    the same call anywhere, which is how CPU tests check the wiring)."""
    # Packed rows reach cuDNN as a dense [B, 1, L, S] mask: jax.nn.dot_product_attention (jax
    # 0.10 to 0.12) takes no segment ids, and cuDNN's own segment path (q/kv offsets) is only in
    # jax._src.cudnn, which lmjax does not import. The public API missing: segment ids there.
    mask_B1LS = None if segment_ids_BL is None else _same_segment(segment_ids_BL)[:, None]
    return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS,
                                        is_causal=causal, implementation=implementation)


def splash_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, causal: bool,
                     segment_ids_BL: jax.Array | None = None,
                     mesh: jax.sharding.AbstractMesh | None = None,
                     interpret: bool = False) -> jax.Array:
    """Pallas splash attention, run per device under shard_map over the batch and head axes.

    A Pallas kernel is one device's program: it cannot be partitioned by XLA, so (as MaxText
    does) it is wrapped in shard_map with the batch split as the activations are and the heads
    split over 'tensor'; the sequence stays whole on each device. `interpret=True` runs the
    kernel in Pallas's interpreter (any backend; tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if q_BLNH.shape[1] != k_BSKH.shape[1]:
        raise ValueError(f"splash attention needs as many queries as keys; got L="
                         f"{q_BLNH.shape[1]}, S={k_BSKH.shape[1]}.")

    def local(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL):
        B, L, N, H = q_BLNH.shape
        head_mask = sm.CausalMask((L, L)) if causal else sm.FullMask((L, L))
        block = min(512, L)
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([head_mask] * N), head_shards=1, q_seq_shards=1,
            block_sizes=sk.BlockSizes(block, block, block, block, block, block, block, block),
            interpret=interpret)
        q_BNLH = (q_BLNH * H**-0.5).transpose(0, 2, 1, 3)
        k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
        if segment_ids_BL is None:
            out_BNLH = jax.vmap(kernel)(q_BNLH, k_BKSH, v_BKSH)
        else:
            ids = sk.SegmentIds(q=segment_ids_BL, kv=segment_ids_BL)
            out_BNLH = jax.vmap(kernel)(q_BNLH, k_BKSH, v_BKSH, ids)
        return out_BNLH.transpose(0, 2, 1, 3)

    if mesh is None or mesh.empty or not spmd.get_logical_axis_rules():
        return local(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
    batch, _, heads, _ = spmd.apply_rules(
        P("activation_batch", None, "activation_heads", None), None)
    spec_BLNH, spec_BL = P(batch, None, heads, None), P(batch, None)
    if segment_ids_BL is None:
        fn = lambda q, k, v: local(q, k, v, None)
        specs, args = (spec_BLNH,) * 3, (q_BLNH, k_BSKH, v_BSKH)
    else:
        fn, specs, args = local, (spec_BLNH,) * 3 + (spec_BL,), (
            q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec_BLNH,
                         check_vma=False)(*args)


# Causal self-attention at least this long is computed in two query halves (xla_attention).
CAUSAL_SPLIT_MIN_LEN = 256


def xla_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                  causal: bool, segment_ids_BL: jax.Array | None = None,
                  mask_BLS: jax.Array | None = None, window: int = 0) -> jax.Array:
    """Plain einsum attention; scores and softmax in float32 whatever the compute dtype.

    Causal self-attention of CAUSAL_SPLIT_MIN_LEN or more tokens runs as two calls: the first
    half of the queries over the first half of the keys, the second half over all of them. The
    block of scores no query may see (a quarter) is never computed: the bench step 3-5% faster
    on CPU (docs/performance.md), where smaller blocks lose more to their smaller matmuls than
    they save. Not under context parallelism ('seq' > 1), whose split of L this would cut across.
    """
    L, S = q_BLNH.shape[1], k_BSKH.shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    seq_split = not mesh.empty and dict(mesh.shape).get(RING_AXIS, 1) > 1
    if not causal or L != S or L < CAUSAL_SPLIT_MIN_LEN or L % 2 or seq_split:
        return _attention_block(q_BLNH, k_BSKH, v_BSKH, causal=causal,
                                segment_ids_BL=segment_ids_BL, mask_BLS=mask_BLS, window=window)
    allowed_BLS = mask_BLS
    if segment_ids_BL is not None:
        same_BLS = _same_segment(segment_ids_BL)
        allowed_BLS = same_BLS if allowed_BLS is None else allowed_BLS & same_BLS
    half = L // 2
    # Causal masking aligns the last query with the last key, so the second call's queries
    # sit at positions half .. L-1 with no offset to pass.
    first_BLNH = _attention_block(
        q_BLNH[:, :half], k_BSKH[:, :half], v_BSKH[:, :half], causal=True, window=window,
        mask_BLS=None if allowed_BLS is None else allowed_BLS[:, :half, :half])
    second_BLNH = _attention_block(
        q_BLNH[:, half:], k_BSKH, v_BSKH, causal=True, window=window,
        mask_BLS=None if allowed_BLS is None else allowed_BLS[:, half:])
    return jnp.concatenate([first_BLNH, second_BLNH], axis=1)


def _attention_block(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                     causal: bool, segment_ids_BL: jax.Array | None = None,
                     mask_BLS: jax.Array | None = None, window: int = 0) -> jax.Array:
    """Queries attend to keys in one piece; xla_attention without the causal split.

    Two choices make it ~2x faster on XLA:CPU than the textbook einsum + jax.nn.softmax (fwd +
    bwd of the bench model's attention, docs/performance.md), and cost nothing elsewhere: heads
    are moved in front of the sequence once, so both einsums are plain batched matmuls with no
    transposes around them in either pass; and the softmax is normalised after the value
    matmul (flash attention's order): [L, H] divisions instead of [L, S], and no [L, S]
    probabilities kept for the backward pass.
    """
    B, L, N, H = q_BLNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K  # query heads sharing one key/value head
    # The G query heads of a key/value head are stacked along the query axis (M = G·L rows),
    # so grouped-query attention is the same 4-D batched matmul as multi-head attention.
    q_BKMH = (q_BLNH * H**-0.5).reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4).reshape(
        B, K, G * L, H)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    scores_BKMS = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, k_BKSH,
                             preferred_element_type=jnp.float32)
    allowed_B1MS = None  # True: query row m may attend to key s
    if causal:
        # Query i sits at absolute position S - L + i, so it may see keys 0 .. S - L + i.
        mask_LS = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None] + (S - L)
        if window:  # and only the last `window` of them, itself included
            mask_LS &= jnp.arange(S)[None, :] > jnp.arange(L)[:, None] + (S - L) - window
        allowed_B1MS = jnp.tile(mask_LS, (G, 1))[None, None]
    for extra_BLS in (None if segment_ids_BL is None else _same_segment(segment_ids_BL),
                      mask_BLS):
        if extra_BLS is not None:
            extra_B1MS = jnp.tile(extra_BLS, (1, G, 1))[:, None]
            allowed_B1MS = extra_B1MS if allowed_B1MS is None else allowed_B1MS & extra_B1MS
    if allowed_B1MS is not None:
        scores_BKMS = jnp.where(allowed_B1MS, scores_BKMS, jnp.finfo(jnp.float32).min)
    # softmax(s) v = (exp(s - max) v) / sum exp(s - max); the max only guards exp from overflow
    # and cancels, so no gradient flows through it (as in jax.nn.softmax).
    max_BKM1 = jax.lax.stop_gradient(scores_BKMS.max(axis=-1, keepdims=True))
    unnormalised_BKMS = jnp.exp(scores_BKMS - max_BKM1)
    total_BKM1 = unnormalised_BKMS.sum(axis=-1, keepdims=True)
    out_BKMH = jnp.einsum("BKMS,BKSH->BKMH", unnormalised_BKMS.astype(v_BSKH.dtype), v_BKSH,
                          preferred_element_type=jnp.float32) / total_BKM1
    out_BLNH = out_BKMH.reshape(B, K, G, L, H).transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)
    return out_BLNH.astype(v_BSKH.dtype)


def ring_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, axis_name: str,
                   causal: bool = True, segment_ids_BL: jax.Array | None = None) -> jax.Array:
    """Attention with L split into P blocks over `axis_name`; keys/values travel round a ring.

    Ring attention (Liu et al. 2023): device i keeps query block i and, over P steps, sees every
    key/value block as they are passed to the next device with ppermute, folding each into a
    flash-style running max and sum (Dao et al. 2022). Memory per device is O(L / P); the
    communication overlaps the next block's math on hardware that can. Self-attention only
    (L = S); masked blocks are computed and discarded, which costs ~2x FLOPs but keeps every
    step's shape the same. Segment ids (packed rows) travel round the ring with their keys.
    """
    if q_BLNH.shape[1] != k_BSKH.shape[1]:
        raise ValueError(f"ring attention needs as many queries as keys; got L="
                         f"{q_BLNH.shape[1]}, S={k_BSKH.shape[1]}.")
    if q_BLNH.shape[1] % mesh.shape[axis_name]:
        raise ValueError(f"Sequence length {q_BLNH.shape[1]} does not split over mesh axis "
                         f"{axis_name!r} of {mesh.shape[axis_name]} devices.")
    if segment_ids_BL is None:  # one segment: the mask it adds is all True
        segment_ids_BL = jnp.zeros(q_BLNH.shape[:2], jnp.int32)
    spec = P(None, axis_name)
    fn = functools.partial(_ring_block, axis_name=axis_name, causal=causal,
                           ring_size=mesh.shape[axis_name])
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                         axis_names={axis_name}, check_vma=False)(
        q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)


def _ring_block(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, *, axis_name, causal, ring_size):
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
    kv_segment_ids_BS = segment_ids_BL
    for t in range(ring_size):
        src = (me - t) % ring_size  # whose key block this device holds at step t
        scores_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH,
                                  preferred_element_type=jnp.float32) * H**-0.5
        if causal:  # absolute positions: query me*L + i may see key src*L + j when j' <= i'
            mask_LS = (src * L + jnp.arange(L))[None, :] <= (me * L + jnp.arange(L))[:, None]
            scores_BKGLS = jnp.where(mask_LS, scores_BKGLS, neg)
        same_BLS = segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
        scores_BKGLS = jnp.where(same_BLS[:, None, None], scores_BKGLS, neg)
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
            k_BSKH, v_BSKH, kv_segment_ids_BS = jax.lax.ppermute(
                (k_BSKH, v_BSKH, kv_segment_ids_BS), axis_name, perm)
    out_BKGLH = out_BKGLH / sum_BKGL[..., None]
    return out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H).astype(q_BLNH.dtype)
