"""A decoder-only transformer in Flax NNX that is GPT-2 or LLaMA by configuration.

GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
LLaMA (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU MLP, no biases, untied, grouped-query attention.
Both are pre-norm: x + f(norm(x)), with a final norm before the unembedding.

Parameters carry logical axis names only ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim',
'mlp', 'length'); lmjax/sharding.py maps them onto mesh axes. Activations are constrained with
'activation_*' names so their layout can change without touching the weights (as in MaxText).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lmjax import attention, mup, rope_scaling, sharding

BLD = ("activation_batch", "activation_length", "activation_embed")
BLNH = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BLF = ("activation_batch", "activation_length", "activation_mlp")
BLV = ("activation_batch", "activation_length", "activation_vocab")


def _named(init, names: tuple[str, ...]):
    """Attach logical axis names. Not sharded at creation: train.py initialises under jit with
    explicit out_shardings, so the model can also be built without any mesh (tests, info)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _normal(std: float, names: tuple[str, ...]):
    return _named(nnx.initializers.normal(std), names)


def _dtypes(cfg: ml_collections.ConfigDict) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def make_norm(cfg: ml_collections.ConfigDict, features: int, names: tuple[str, ...],
              rngs: nnx.Rngs, kind: str | None = None) -> nnx.Module:
    scale_init = _named(nnx.initializers.ones, names)
    if (kind or cfg.norm) == "rms":
        return nnx.RMSNorm(features, epsilon=cfg.norm_eps, scale_init=scale_init, rngs=rngs,
                           **_dtypes(cfg))
    bias_init = _named(nnx.initializers.zeros, names)
    return nnx.LayerNorm(features, epsilon=cfg.norm_eps, use_bias=cfg.use_bias,
                         scale_init=scale_init, bias_init=bias_init, rngs=rngs, **_dtypes(cfg))


Rotary = tuple[jax.Array, jax.Array]  # sin and cos of the rotary angles, [B, L, 1, H/2] each


def rope_sin_cos(positions_BL: jax.Array, head_dim: int, theta: float,
                 inv_freq_H2: jax.Array | None = None, scale: float = 1.0) -> Rotary:
    """The rotation angles' sines and cosines (half-split layout: dims i and i + H/2 form a
    pair). A context-extended model passes its own frequencies and scale (rope_scaling.py)."""
    if inv_freq_H2 is None:
        inv_freq_H2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BLH2 = positions_BL[..., None].astype(jnp.float32) * inv_freq_H2
    sin, cos = jnp.sin(angle_BLH2)[:, :, None, :], jnp.cos(angle_BLH2)[:, :, None, :]
    return sin * scale, cos * scale  # YaRN's temperature, on queries and keys alike


def rotate(x_BLNH: jax.Array, sin_BL1H2: jax.Array, cos_BL1H2: jax.Array) -> jax.Array:
    """Rotary embedding (Su et al. 2021) with precomputed angles (rope_sin_cos)."""
    x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BL1H2 - x2 * sin_BL1H2,
                               x2 * cos_BL1H2 + x1 * sin_BL1H2], axis=-1)
    return rotated.astype(x_BLNH.dtype)


def rope(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float,
         inv_freq_H2: jax.Array | None = None, scale: float = 1.0) -> jax.Array:
    """Rotary embedding of x at `positions_BL`: rotate() with rope_sin_cos()'s angles."""
    return rotate(x_BLNH, *rope_sin_cos(positions_BL, x_BLNH.shape[-1], theta, inv_freq_H2,
                                        scale))


def computed_once(fn, x: jax.Array):
    """fn(x) as buffers XLA cannot fuse into their consumers.

    XLA fuses cheap-looking producers into every consumer, evaluated per output element: the
    rotary sines and cosines were recomputed for every head, layer, query and key, forward and
    backward (3.4% of the CPU bench step in libm's sincos, perf). A conditional is never fused;
    its predicate always holds, which XLA cannot know. (optimization_barrier is dropped by
    XLA:CPU before fusion.)"""
    first = x.ravel()[0]
    always = (first >= jnp.iinfo(first.dtype).min if jnp.issubdtype(first.dtype, jnp.integer)
              else jnp.isnan(first) | ~jnp.isnan(first))

    def zeros(y):  # typed as y is: varying over a shard_map's manual axes where y is
        return jax.tree.map(lambda s: jnp.zeros_like(y, s.dtype, s.shape), jax.eval_shape(fn, y))

    return jax.lax.cond(always, fn, zeros, x)


@jax.custom_vjp
def _matmul_transposed_grad(x_TD: jax.Array, w_DF: jax.Array) -> jax.Array:
    return x_TD @ w_DF


def _matmul_fwd(x_TD, w_DF):
    return x_TD @ w_DF, (x_TD, w_DF)


def _matmul_bwd(residuals, g_TF):
    x_TD, w_DF = residuals
    return g_TF @ w_DF.T, jax.lax.optimization_barrier(x_TD.T) @ g_TF


_matmul_transposed_grad.defvjp(_matmul_fwd, _matmul_bwd)


def transposed_grad_dot_general(lhs, rhs, dimension_numbers, precision=None,
                                preferred_element_type=None, out_sharding=None) -> jax.Array:
    """jax.lax.dot_general for nnx.Linear whose weight gradient multiplies a materialised xᵀ.

    XLA folds the transpose of dW = xᵀ·g into the dot; XLA:CPU then hands it to Eigen, as
    YNNPACK takes no transposed left operand, and Eigen runs these 15-45% slower (3.4 vs 2.8 ms
    for the bench MLP's, 26 vs 22 ms for its unembedding's). Behind an optimization_barrier the
    transpose is not folded (the barrier itself is gone by the time XLA:CPU fuses), so every
    dot stays on YNNPACK: the bench step 2-4% faster (docs/performance.md). Anything but a
    plain 2-D matmul goes to lax.dot_general.
    """
    plain = (lhs.ndim == rhs.ndim == 2 and dimension_numbers == (((1,), (0,)), ((), ()))
             and precision is None and preferred_element_type is None and out_sharding is None)
    if not plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
    return _matmul_transposed_grad(lhs, rhs)


WEIGHT_GRADS = ("auto", "transposed", "xla")


def dense_dot_general(cfg: ml_collections.ConfigDict):
    """The dot_general of dense layers for model.weight_grad ('auto': transposed on CPU)."""
    choice = cfg.weight_grad
    if choice == "auto":  # train.with_kernel resolves it for the mesh's devices
        choice = "transposed" if jax.default_backend() == "cpu" else "xla"
    return transposed_grad_dot_general if choice == "transposed" else jax.lax.dot_general


def sinusoidal(positions_BL: jax.Array, d: int) -> jax.Array:
    """Fixed positions of Vaswani et al. 2017: sin on the first half of the width, cos after."""
    inv_freq = 10_000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = positions_BL[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.init_std * mup.hidden_init_scale(cfg)  # 1 under SP
        out_std = std / math.sqrt(2 * cfg.num_layers)  # GPT-2's residual scaling

        def proj(spec, shape, names, bias_shape, bias_names, std):
            return nnx.Einsum(spec, shape, bias_shape if cfg.use_bias else None,
                              kernel_init=_normal(std, names),
                              bias_init=_named(nnx.initializers.zeros, bias_names),
                              rngs=rngs, **_dtypes(cfg))

        self.q = proj("BLD,DNH->BLNH", (D, N, H), ("embed", "heads", "head_dim"), (N, H),
                      ("heads", "head_dim"), std)
        self.k = proj("BLD,DKH->BLKH", (D, K, H), ("embed", "kv_heads", "head_dim"), (K, H),
                      ("kv_heads", "head_dim"), std)
        self.v = proj("BLD,DKH->BLKH", (D, K, H), ("embed", "kv_heads", "head_dim"), (K, H),
                      ("kv_heads", "head_dim"), std)
        self.o = proj("BLNH,NHD->BLD", (N, H, D), ("heads", "head_dim", "embed"), (D,),
                      ("embed",), out_std)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, H, ("head_dim",), rngs, kind="rms")
            self.k_norm = make_norm(cfg, H, ("head_dim",), rngs, kind="rms")
        self.cfg = cfg

    def __call__(self, x_BLD: jax.Array, rotary: Rotary | None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """rotary: rope_sin_cos() of the tokens' positions (model.position='rope'), else None."""
        q_BLNH, k_BLKH, v_BLKH = self.q(x_BLD), self.k(x_BLD), self.v(x_BLD)
        if self.cfg.qk_norm:
            q_BLNH, k_BLKH = self.q_norm(q_BLNH), self.k_norm(k_BLKH)
        if rotary is not None:
            q_BLNH, k_BLKH = rotate(q_BLNH, *rotary), rotate(k_BLKH, *rotary)
        if self.cfg.parametrization == "mup":  # scores q.k sqrt(H0) / H: lmjax/mup.py
            q_BLNH = q_BLNH * mup.query_multiplier(self.cfg)
        q_BLNH = sharding.constrain(q_BLNH, BLNH)
        mask_BLS, window = None, self.cfg.attention_window
        if hasattr(self, "cache_k") and window:  # decoding with a rolling cache of window slots
            k_BLKH, v_BLKH, mask_BLS = self._roll_cache(k_BLKH, v_BLKH)  # [B, R + L, K, H]
        elif hasattr(self, "cache_k"):  # decoding (Transformer.init_cache): attend over the cache
            k_BLKH, v_BLKH, mask_BLS = self._extend_cache(k_BLKH, v_BLKH)  # now [B, S, K, H]
        out_BLNH = attention.attend(q_BLNH, k_BLKH, v_BLKH, impl=self.cfg.attention,
                                    causal=mask_BLS is None, segment_ids_BL=segment_ids_BL,
                                    mask_BLS=mask_BLS, window=0 if mask_BLS is not None else window)
        return self.o(sharding.constrain(out_BLNH, BLNH))

    def _extend_cache(self, k_BLKH: jax.Array, v_BLKH: jax.Array):
        """Write L new keys/values at slot `index` (the same for every row: prompts are
        left-padded); a query may see the filled slots up to its own, from its row's start."""
        index, L = self.cache_index[...], k_BLKH.shape[1]
        self.cache_k[...] = jax.lax.dynamic_update_slice_in_dim(self.cache_k[...], k_BLKH, index, 1)
        self.cache_v[...] = jax.lax.dynamic_update_slice_in_dim(self.cache_v[...], v_BLKH, index, 1)
        self.cache_index[...] = index + L
        slots_S, slots_L = jnp.arange(self.cache_k.shape[1]), index + jnp.arange(L)
        start_B11 = self.cache_start[...][:, None, None]
        mask_BLS = (slots_S[None, None, :] <= slots_L[None, :, None]) & (slots_S >= start_B11)
        return self.cache_k[...], self.cache_v[...], mask_BLS

    def _roll_cache(self, k_BLKH: jax.Array, v_BLKH: jax.Array):
        """Sliding-window decoding in O(window) memory (Mistral's rolling buffer): slot s of R
        holds the newest key at index p = s mod R. The L new queries attend over the R cached
        keys and the L new ones (a prompt may be longer than the window), within the window;
        then the last min(L, R) new keys overwrite their slots."""
        index, L, R = self.cache_index[...], k_BLKH.shape[1], self.cache_k.shape[1]
        slots_R = jnp.arange(R)
        cached_R = index - 1 - (index - 1 - slots_R) % R  # index each slot holds (< 0: empty)
        keys_S = jnp.concatenate([cached_R, index + jnp.arange(L)])  # S = R + L
        queries_L, start_B11 = index + jnp.arange(L), self.cache_start[...][:, None, None]
        seen_LS = (keys_S[None, :] <= queries_L[:, None]) & (
            queries_L[:, None] - keys_S[None, :] < self.cfg.attention_window)
        mask_BLS = seen_LS[None] & (keys_S[None, None, :] >= jnp.maximum(start_B11, 0))
        all_k = jnp.concatenate([self.cache_k[...], k_BLKH], axis=1)
        all_v = jnp.concatenate([self.cache_v[...], v_BLKH], axis=1)
        keep = min(L, R)
        slots = (index + L - keep + jnp.arange(keep)) % R
        self.cache_k[...] = self.cache_k[...].at[:, slots].set(k_BLKH[:, L - keep:])
        self.cache_v[...] = self.cache_v[...].at[:, slots].set(v_BLKH[:, L - keep:])
        self.cache_index[...] = index + L
        return all_k, all_v, mask_BLS


def tokenwise(layer, x_BLD: jax.Array) -> jax.Array:
    """Apply a dense layer to the [B*L, D] matrix: on [B, L, D], XLA:CPU transposes activations
    before each weight-gradient matmul, ~20% of a CPU step of the bench model (lmjax bench)."""
    y = layer(x_BLD.reshape(-1, x_BLD.shape[-1]))
    return y.reshape(*x_BLD.shape[:-1], y.shape[-1])


class Mlp(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_dim
        std = cfg.init_std * mup.hidden_init_scale(cfg)  # 1 under SP
        out_std = std / math.sqrt(2 * cfg.num_layers)

        def dense(d_in, d_out, names, std):
            return nnx.Linear(d_in, d_out, use_bias=cfg.use_bias, kernel_init=_normal(std, names),
                              bias_init=_named(nnx.initializers.zeros, names[1:]),
                              dot_general=dense_dot_general(cfg), rngs=rngs, **_dtypes(cfg))

        self.up = dense(D, F, ("embed", "mlp"), std)
        self.gate = dense(D, F, ("embed", "mlp"), std) if cfg.mlp == "swiglu" else None
        self.down = dense(F, D, ("mlp", "embed"), out_std)
        self.kind = cfg.mlp

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        if self.kind == "swiglu":  # Shazeer 2020: silu(x W_gate) * (x W_up)
            h_BLF = jax.nn.silu(tokenwise(self.gate, x_BLD)) * tokenwise(self.up, x_BLD)
        else:  # GPT-2 uses the tanh approximation of GELU
            h_BLF = jax.nn.gelu(tokenwise(self.up, x_BLD), approximate=True)
        return tokenwise(self.down, sharding.constrain(h_BLF, BLF))


class Block(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, cfg.d_model, ("embed",), rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = make_norm(cfg, cfg.d_model, ("embed",), rngs)
        self.mlp = Mlp(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BLD: jax.Array, rotary: Rotary | None,
                 rngs: nnx.Rngs | None, segment_ids_BL: jax.Array | None = None) -> jax.Array:
        deterministic = rngs is None
        h_BLD = self.attn(self.attn_norm(x_BLD), rotary, segment_ids_BL)
        x_BLD = x_BLD + self.dropout(h_BLD, deterministic=deterministic, rngs=rngs)
        h_BLD = self.mlp(self.mlp_norm(x_BLD))
        x_BLD = x_BLD + self.dropout(h_BLD, deterministic=deterministic, rngs=rngs)
        return sharding.constrain(x_BLD, BLD)


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep the weight matmuls' outputs, in host memory (TPU/GPU pinned_host): HBM for PCIe time
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def call_block(block: "Block", x_BLD: jax.Array, rotary: Rotary | None,
               rngs: nnx.Rngs | None, segment_ids_BL: jax.Array | None, remat: str) -> jax.Array:
    """One block, under `model.remat`'s checkpoint policy ('none': keep every activation)."""
    if remat == "none":
        return block(x_BLD, rotary, rngs, segment_ids_BL)
    if remat == "offload" and jax.default_backend() == "cpu":  # no host transfer is emitted
        warnings.warn("model.remat='offload' on CPU keeps the saved matmul outputs in ordinary "
                      "memory (host and device are one), i.e. it acts as 'dots_saveable'.",
                      stacklevel=2)
    return nnx.remat(lambda b, x, p, r, s: b(x, p, r, s), policy=REMAT_POLICIES[remat])(
        block, x_BLD, rotary, rngs, segment_ids_BL)


def stacked_blocks(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Block:
    """num_layers Blocks as one, each parameter with a leading 'layers' axis, for lax.scan:
    XLA compiles one block instead of num_layers copies (compile time flat in depth)."""
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    make = nnx.vmap(lambda key: Block(cfg, nnx.Rngs(params=key)),
                    transform_metadata={nnx.PARTITION_NAME: "layers"})
    return make(keys)


class Transformer(nnx.Module):
    """tokens [B, L] -> logits [B, L, V] (float32)."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                               embedding_init=_normal(cfg.init_std, ("vocab", "embed")),
                               **_dtypes(cfg))
        if cfg.position == "learned":
            self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs,
                                       embedding_init=_normal(cfg.init_std, ("length", "embed")),
                                       **_dtypes(cfg))
        if cfg.scan_layers:
            self.blocks = stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg, cfg.d_model, ("embed",), rngs)
        if not cfg.tie_embeddings:
            self.unembed = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs,
                                      kernel_init=_normal(cfg.init_std, ("embed", "vocab")),
                                      dot_general=dense_dot_general(cfg), **_dtypes(cfg))
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """rngs=None is deterministic (eval); pass nnx.Rngs(dropout=key) to train with dropout.

        segment_ids_BL (packed rows): tokens attend only within their segment; pass the
        positions within each document too, so each document is computed as if alone."""
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
            attn = self.blocks.attn if self.cfg.scan_layers else self.blocks[0].attn
            if hasattr(attn, "cache_k"):  # decoding: go on from the cached slots
                index, start_B = attn.cache_index[...], attn.cache_start[...]
                if self.cfg.scan_layers:  # every layer's cache is at the same slot
                    index, start_B = index[0], start_B[0]
                positions_BL = positions_BL + index - start_B[:, None]
                positions_BL = jnp.maximum(positions_BL, 0)  # left padding: masked, any position
        # Vocab-parallel under TP: the table is never gathered whole (lmjax/sharding.py).
        x_BLD = sharding.embed_lookup(self.embed.embedding[...], tokens_BL).astype(self.cfg.dtype)
        if self.cfg.position == "learned":
            x_BLD = x_BLD + self.pos_embed(positions_BL)
        elif self.cfg.position == "sinusoidal":
            x_BLD = x_BLD + sinusoidal(positions_BL, self.cfg.d_model).astype(x_BLD.dtype)
        x_BLD = self.dropout(x_BLD, deterministic=rngs is None, rngs=rngs)
        x_BLD = sharding.constrain(x_BLD, BLD)
        rotary = None
        if self.cfg.position == "rope":  # once, for every layer's queries and keys
            inv_freq_H2, scale = rope_scaling.frequencies(self.cfg)
            rotary = computed_once(lambda p: rope_sin_cos(
                p, self.cfg.head_dim, self.cfg.rope_theta, inv_freq_H2, scale), positions_BL)
        if self.cfg.scan_layers:
            x_BLD = self._scan_blocks(x_BLD, rotary, rngs, segment_ids_BL)
        else:
            for block in self.blocks:
                x_BLD = call_block(block, x_BLD, rotary, rngs, segment_ids_BL, self.cfg.remat)
        x_BLD = self.final_norm(x_BLD)
        if self.cfg.tie_embeddings:
            logits_BLV = tokenwise(self.embed.attend, x_BLD)
        else:
            logits_BLV = tokenwise(self.unembed, x_BLD)
        logits_BLV = logits_BLV.astype(jnp.float32)
        if self.cfg.parametrization == "mup":  # readout multiplier 1 / width_mult
            logits_BLV = logits_BLV * mup.output_multiplier(self.cfg)
        return sharding.constrain(logits_BLV, BLV)

    def _scan_blocks(self, x_BLD: jax.Array, rotary: Rotary | None, rngs: nnx.Rngs | None,
                     segment_ids_BL: jax.Array | None) -> jax.Array:
        """lax.scan over the stacked block: layer i's slice of every parameter (and KV cache),
        and its own dropout key. Only the cache comes back out, so weights are never copied."""
        graphdef, state = nnx.split(self.blocks)
        keys = None if rngs is None else jax.random.split(rngs.dropout(), self.cfg.num_layers)

        def body(x_BLD, layer):
            block = nnx.merge(graphdef, layer[0])
            layer_rngs = None if layer[1] is None else nnx.Rngs(dropout=layer[1])
            x_BLD = call_block(block, x_BLD, rotary, layer_rngs, segment_ids_BL, self.cfg.remat)
            return x_BLD, nnx.state(block, nnx.Cache)

        x_BLD, cache = jax.lax.scan(body, x_BLD, (state, keys))
        nnx.update(self.blocks, cache)
        return x_BLD

    def init_cache(self, start_B: jax.Array, length: int) -> None:
        """Switch to decoding (lmjax/sample.py) with an empty KV cache of `length` slots.

        Row b is left-padded: its text starts at slot start_B[b]. Every row then writes the same
        slot, one dynamic_update_slice per layer, and its positions count from its own start.
        The cache is nnx.Cache state: `nnx.split(model, nnx.Cache, ...)` carries it functionally.
        """
        if self.cfg.attention_window:  # a rolling cache (Attention._roll_cache): O(window)
            length = min(length, self.cfg.attention_window)
        shape = (start_B.shape[0], length, self.cfg.num_kv_heads, self.cfg.head_dim)
        scanned = self.cfg.scan_layers  # one stacked block: each cache gains a layers axis
        lead = (self.cfg.num_layers,) if scanned else ()
        for block in [self.blocks] if scanned else self.blocks:
            block.attn.cache_k = nnx.Cache(jnp.zeros(lead + shape, self.cfg.dtype))
            block.attn.cache_v = nnx.Cache(jnp.zeros(lead + shape, self.cfg.dtype))
            block.attn.cache_index = nnx.Cache(jnp.zeros(lead, jnp.int32))
            block.attn.cache_start = nnx.Cache(
                jnp.broadcast_to(jnp.asarray(start_B, jnp.int32), lead + start_B.shape))


def stack_layers(params: dict) -> dict:
    """An unrolled model's pure dict (`blocks/<i>/...`) in the scanned layout (`blocks/...` of
    [layers, ...]): checkpoints and Hugging Face files convert between the two this way."""
    blocks = params["blocks"]
    layers = [blocks[i] for i in sorted(blocks)]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict) -> dict:
    """The inverse of stack_layers."""
    num_layers = jax.tree.leaves(params["blocks"])[0].shape[0]
    return {**params, "blocks": {i: jax.tree.map(lambda x, i=i: x[i], params["blocks"])
                                 for i in range(num_layers)}}
