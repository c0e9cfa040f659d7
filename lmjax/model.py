"""A decoder-only transformer in Flax NNX that is GPT-2, LLaMA, Mistral, Qwen3 or Gemma by
configuration (configs/*.py; lmjax/interop/hf.py maps each to its Hugging Face class).

GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
LLaMA (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU MLP, no biases, untied, grouped-query attention.
Mistral: LLaMA with a sliding window (model.attention_window). Qwen3: LLaMA with RMSNorm on each
head's queries and keys (model.qk_norm). Gemma: GeGLU MLP (model.mlp='geglu'), embeddings times
sqrt(d_model) (model.embed_scale), tied.
All are pre-norm: x + f(norm(x)), with a final norm before the unembedding.

Parameters carry logical axis names only ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim',
'mlp', 'length'); lmjax/sharding.py maps them onto mesh axes. Activations are constrained with
'activation_*' names so their layout can change without touching the weights (as in MaxText).
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lmjax import attention, config, moe, mup, positions, rope_scaling, sharding

BLD = ("activation_batch", "activation_length", "activation_embed")
BLNH = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BLF = ("activation_batch", "activation_length", "activation_mlp")
BLV = ("activation_batch", "activation_length", "activation_vocab")

# The dense layers' matmul (MLP and untied unembedding): jax.lax.dot_general, or a backend's
# own with the same signature and the same result (lmjax/backends: picked once, by the train
# step's builder). The model itself never asks which backend it runs on.
DotGeneral = Callable[..., jax.Array]


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


class Attention(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.init_std * mup.hidden_init_scale(cfg)  # 1 under SP
        out_std = cfg.init_std * mup.hidden_init_scale(cfg, "o") / mup.residual_divisor(cfg)

        def proj(spec, shape, names, bias_shape, bias_names, std):
            return nnx.Einsum(spec, shape, bias_shape if cfg.use_bias else None,
                              kernel_init=_normal(std, names),
                              bias_init=_named(nnx.initializers.zeros, bias_names),
                              rngs=rngs, **_dtypes(cfg))

        self.q = proj("BLD,DNH->BLNH", (D, N, H), ("embed", "heads", "head_dim"), (N, H),
                      ("heads", "head_dim"), std * mup.query_init_scale(cfg))
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

    def __call__(self, x_BLD: jax.Array, rotary: positions.Rotary | None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """rotary: positions.rope_sin_cos() of the tokens' positions under model.position='rope',
        else None."""
        q_BLNH, k_BLKH, v_BLKH = self.q(x_BLD), self.k(x_BLD), self.v(x_BLD)
        if self.cfg.qk_norm:
            q_BLNH, k_BLKH = self.q_norm(q_BLNH), self.k_norm(k_BLKH)
        if rotary is not None:
            q_BLNH = positions.rotate(q_BLNH, *rotary)
            k_BLKH = positions.rotate(k_BLKH, *rotary)
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


class Mlp(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
                 dot_general: DotGeneral = jax.lax.dot_general, width: int = 0):
        D, F = cfg.d_model, width or cfg.mlp_dim  # width: MoE's shared experts (lmjax/moe.py)
        std = cfg.init_std * mup.hidden_init_scale(cfg)  # 1 under SP
        out_std = cfg.init_std * mup.hidden_init_scale(cfg, "down") / mup.residual_divisor(cfg)

        def dense(d_in, d_out, names, std):
            return nnx.Linear(d_in, d_out, use_bias=cfg.use_bias, kernel_init=_normal(std, names),
                              bias_init=_named(nnx.initializers.zeros, names[1:]),
                              dot_general=dot_general, rngs=rngs, **_dtypes(cfg))

        self.up = dense(D, F, ("embed", "mlp"), std)
        self.gate = dense(D, F, ("embed", "mlp"), std) if cfg.mlp in GATED else None
        self.down = dense(F, D, ("mlp", "embed"), out_std)
        self.kind = cfg.mlp

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        gate_BLF = None if self.gate is None else self.gate(x_BLD)
        h_BLF = moe.activate(self.kind, self.up(x_BLD), gate_BLF)  # SwiGLU, GeGLU or GELU
        return self.down(sharding.constrain(h_BLF, BLF))


class Block(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
                 dot_general: DotGeneral = jax.lax.dot_general, index: int = 0):
        self.attn_norm = make_norm(cfg, cfg.d_model, ("embed",), rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = make_norm(cfg, cfg.d_model, ("embed",), rngs)
        if moe.is_moe_layer(cfg, index):  # layer `index` (from 0) routes to experts
            shared = cfg.moe.num_shared_experts * cfg.moe.expert_mlp_dim
            self.mlp = moe.Moe(cfg, rngs, Mlp(cfg, rngs, dot_general, shared) if shared else None)
        else:
            self.mlp = Mlp(cfg, rngs, dot_general)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BLD: jax.Array, rotary: positions.Rotary | None,
                 rngs: nnx.Rngs | None, segment_ids_BL: jax.Array | None = None) -> tuple:
        deterministic, branch = rngs is None, mup.branch_multiplier(self.attn.cfg)  # depth-μP
        h_BLD = self.attn(self.attn_norm(x_BLD), rotary, segment_ids_BL)
        x_BLD = x_BLD + self.dropout(branch * h_BLD, deterministic=deterministic, rngs=rngs)
        h_BLD, stats = self.mlp(self.mlp_norm(x_BLD)), {}  # stats: moe.STATS of an MoE layer
        if isinstance(self.mlp, moe.Moe):
            h_BLD, stats = h_BLD
        x_BLD = x_BLD + self.dropout(branch * h_BLD, deterministic=deterministic, rngs=rngs)
        return sharding.constrain(x_BLD, BLD), stats


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep the weight matmuls' outputs, in host memory (TPU/GPU pinned_host): HBM for PCIe time
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def call_block(block: "Block", x_BLD: jax.Array, rotary: positions.Rotary | None,
               rngs: nnx.Rngs | None, segment_ids_BL: jax.Array | None, remat: str) -> tuple:
    """One block -> (x_BLD, router stats), under model.remat's policy ('none': keep all)."""
    if remat == "none":
        return block(x_BLD, rotary, rngs, segment_ids_BL)
    return nnx.remat(lambda b, x, p, r, s: b(x, p, r, s), policy=REMAT_POLICIES[remat])(
        block, x_BLD, rotary, rngs, segment_ids_BL)


def stacked_blocks(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
                   dot_general: DotGeneral = jax.lax.dot_general) -> Block:
    """num_layers Blocks as one, each parameter with a leading 'layers' axis, for lax.scan:
    XLA compiles one block instead of num_layers copies (compile time flat in depth)."""
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    make = nnx.vmap(lambda key: Block(cfg, nnx.Rngs(params=key), dot_general),
                    transform_metadata={nnx.PARTITION_NAME: "layers"})
    return make(keys)


class Transformer(nnx.Module):
    """tokens [B, L] -> logits [B, L, V] (float32)."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
                 dot_general: DotGeneral = jax.lax.dot_general):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                               embedding_init=_normal(cfg.init_std, ("vocab", "embed")),
                               **_dtypes(cfg))
        if cfg.position == "learned":
            self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs,
                                       embedding_init=_normal(cfg.init_std, ("length", "embed")),
                                       **_dtypes(cfg))
        if cfg.scan_layers:
            self.blocks = stacked_blocks(cfg, rngs, dot_general)
        else:
            self.blocks = nnx.List([Block(cfg, rngs, dot_general, i)
                                    for i in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg, cfg.d_model, ("embed",), rngs)
        if not cfg.tie_embeddings:
            self.unembed = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs,
                                      kernel_init=_normal(mup.readout_std(cfg), ("embed", "vocab")),
                                      dot_general=dot_general, **_dtypes(cfg))
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """rngs=None is deterministic (eval); pass nnx.Rngs(dropout=key) to train with dropout.

        segment_ids_BL (packed rows): tokens attend only within their segment; pass the
        positions within each document too, so each document is computed as if alone."""
        return self.logits_and_aux(tokens_BL, positions_BL, rngs, segment_ids_BL)[0]

    def logits_and_aux(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
                       rngs: nnx.Rngs | None = None, segment_ids_BL: jax.Array | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits_BLV, the MoE layers' mean router losses, moe.mean_stats; {} if dense)."""
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
        if self.cfg.embed_scale:  # Gemma: sqrt(D) rounded to the compute dtype first, as HF does
            x_BLD = x_BLD * jnp.asarray(math.sqrt(self.cfg.d_model), x_BLD.dtype)
        if self.cfg.position == "learned":
            x_BLD = x_BLD + self.pos_embed(positions_BL)
        elif self.cfg.position == "sinusoidal":
            sinusoids_BLD = positions.sinusoidal(positions_BL, self.cfg.d_model)
            x_BLD = x_BLD + sinusoids_BLD.astype(x_BLD.dtype)
        x_BLD = self.dropout(x_BLD, deterministic=rngs is None, rngs=rngs)
        x_BLD = sharding.constrain(x_BLD * mup.embed_multiplier(self.cfg), BLD)  # μP: alpha_embed
        rotary = None
        if self.cfg.position == "rope":  # once, for every layer's queries and keys
            inv_freq_H2, scale = rope_scaling.frequencies(self.cfg)
            # kept as buffers, not fused again into every consumer (7B on v5p-64: 80 MiB less
            # temporary memory per chip, lmjax plan)
            rotary = jax.lax.optimization_barrier(positions.rope_sin_cos(
                positions_BL, self.cfg.head_dim, self.cfg.rope_theta, inv_freq_H2, scale))
        stats = []
        if self.cfg.scan_layers:
            x_BLD, stats = self._scan_blocks(x_BLD, rotary, rngs, segment_ids_BL)
        else:
            for block in self.blocks:
                x_BLD, layer_stats = call_block(block, x_BLD, rotary, rngs, segment_ids_BL,
                                                self.cfg.remat)
                stats.append(layer_stats)
        x_BLD = self.final_norm(x_BLD)
        if self.cfg.tie_embeddings:
            logits_BLV = self.embed.attend(x_BLD)
        else:
            logits_BLV = self.unembed(x_BLD)
        logits_BLV = logits_BLV.astype(jnp.float32)
        if self.cfg.parametrization == "mup":  # readout multiplier alpha_out / width_mult
            logits_BLV = logits_BLV * mup.output_multiplier(self.cfg)
        return sharding.constrain(logits_BLV, BLV), moe.mean_stats(stats)

    def _scan_blocks(self, x_BLD: jax.Array, rotary: positions.Rotary | None,
                     rngs: nnx.Rngs | None, segment_ids_BL: jax.Array | None) -> tuple:
        """lax.scan over the stacked block: layer i's slice of every parameter (and KV cache),
        and its own dropout key. Only caches and router stats come out: weights are not copied."""
        graphdef, state = nnx.split(self.blocks)
        keys = None if rngs is None else jax.random.split(rngs.dropout(), self.cfg.num_layers)

        def body(x_BLD, layer):
            block = nnx.merge(graphdef, layer[0])
            layer_rngs = None if layer[1] is None else nnx.Rngs(dropout=layer[1])
            x_BLD, stats = call_block(block, x_BLD, rotary, layer_rngs, segment_ids_BL,
                                      self.cfg.remat)
            return x_BLD, (nnx.state(block, nnx.Cache), stats)

        x_BLD, (cache, stats) = jax.lax.scan(body, x_BLD, (state, keys))
        nnx.update(self.blocks, cache)
        return x_BLD, [{k: v.mean() for k, v in stats.items()}]  # every layer alike

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


def forward(model: Transformer, batch: dict, rngs: nnx.Rngs | None = None) -> jax.Array:
    """logits_BLV of `batch` ('inputs', and 'positions' and 'segment_ids' when packed): train,
    eval and sample all apply the model through this one call, so a batch key the model reads
    is added in one place. rngs=None is deterministic (eval)."""
    return forward_with_aux(model, batch, rngs)[0]


def forward_with_aux(model: Transformer, batch: dict, rngs: nnx.Rngs | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits_BLV, moe.STATS averaged over MoE layers; {} if dense): for training only."""
    return model.logits_and_aux(batch["inputs"], batch.get("positions"), rngs,
                                batch.get("segment_ids"))


# What model.mlp, model.norm, model.position and model.parametrization may be; model.remat is
# 'none' or a REMAT_POLICIES key, model.attention and model.rope_scaling their modules' own.
MLPS = ("swiglu", "geglu", "gelu")
GATED = ("swiglu", "geglu")  # MLPs with a gate matrix beside up and down
NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned", "sinusoidal", "none")
PARAMETRIZATIONS = ("sp", "mup")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first model.* setting no Transformer can be built with; the
    whole config, as positions are checked against data.seq_len."""
    m = cfg.model
    config.check_choices(cfg, {"model.mlp": MLPS, "model.norm": NORMS, "model.position": POSITIONS,
                               "model.remat": ("none", *REMAT_POLICIES),
                               "model.parametrization": PARAMETRIZATIONS})
    for key in ("param_dtype", "dtype"):
        try:
            jnp.dtype(m[key])
        except TypeError:
            raise ValueError(f"model.{key}={m[key]!r} is not a dtype.") from None
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"model.num_heads={m.num_heads} is not divisible by "
                         f"model.num_kv_heads={m.num_kv_heads}.")
    if m.position == "rope" and m.head_dim % 2:
        raise ValueError(f"model.head_dim={m.head_dim} must be even for rotary positions.")
    if m.position in ("learned", "sinusoidal") and cfg.data.seq_len > m.max_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={m.max_len}.")
    attention.validate(cfg)
    rope_scaling.validate(cfg)
    moe.validate(cfg)
