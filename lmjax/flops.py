"""Parameter and FLOP counts: one documented convention for every MFU, budget and fit, plus
Kaplan's and Chinchilla's conventions for budgets and fits that must match a paper.

Parameters are counted from the real model's shapes (`nnx.eval_shape`, nothing allocated), so a
count can never drift from what model.py builds:

  embedding      token table V·D + learned position table (if any): lookups, not matmuls
  non_embedding  everything else: blocks, final norm, and the unembedding D·V when untied

FLOPs per token, training (forward + backward = 3 x forward, Kaplan et al. 2020, eq. 2.1):

  6 · N_matmul  +  6 · n_layers · T · d_attn

  N_matmul  = non_embedding params, plus V·D when the embeddings are tied (the unembedding is a
              matmul either way; untied it is already a non-embedding parameter, so it is
              counted exactly once). Norm scales and biases are included, as in "non-embedding
              params"; they are < 0.1% of N for any real model.
  T         = training sequence length (data.seq_len); d_attn = num_heads · head_dim.
  attention = per layer, Q·K^T and A·V each cost 2·T·d_attn per token over all T keys, i.e.
              12·n_layers·T·d_attn for training; a causal mask halves the useful work, so we
              count 6·n_layers·T·d_attn (Kaplan's 2·n_layer·n_ctx·d_attn forward). PaLM and
              Chinchilla count the full 12; our MFU is therefore the lower, honest figure.
  forward only (eval, sampling) = one third of training.

Elementwise work (softmax, norms, activations, RoPE) and the embedding lookup are not counted.

Mixture of experts (model.moe, lmjax/moe.py): FLOPs count ACTIVE parameters, those one token
goes through: each expert weight counts top_k / num_experts of its size; the router (D·E per
MoE layer) and shared experts count whole. So a budget, an MFU or a fitted law compares MoE and
dense models at equal work per token; 'capacity' dispatch's padding and dropped tokens are not
counted (the useful work, as with the causal mask). `count_params` gives total and active.

Two published conventions can be selected instead (`train.flops_convention`), so a budget or a
fitted law can be compared with the paper that used it:

  kaplan      C = 6·N per token (Kaplan et al. 2020, sec. 2.1), N = non-embedding parameters
              in Kaplan's sense: no token, position or unembedding table (their models tie the
              unembedding, so it was never in N); attention's context term is dropped.
  chinchilla  Hoffmann et al. 2022, Appendix F, forward x 3: embeddings 2·V·D and logits 2·D·V
              both counted as matmuls, full (non-causal) attention 4·T·d_attn per layer plus
              softmax 3·heads·T, QKV and output projections, the MLP's matrices (3 for SwiGLU).
              Their Table A4 ratios are reproduced by this count without the embedding and
              logit terms (tests/test_flops_conventions.py): the table left those out.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lmjax import moe
from lmjax.model import Transformer


def count_params(model_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """{'total', 'embedding', 'non_embedding', 'active', 'active_non_embedding'} from the
    abstract model: exact, and free to compute (`lmjax info` works for a 7B config on a laptop).
    Active = what one token uses (module docstring); the same as total for a dense model.
    Remembered per model config: a sweep's runs share a few shapes, and tracing the model takes
    a good part of a second."""
    return dict(_count_params(model_cfg.to_json(sort_keys=True)))


@functools.lru_cache(maxsize=256)
def _count_params(model_json: str) -> dict[str, int]:
    model_cfg = ml_collections.ConfigDict(json.loads(model_json))
    # the same parameters, stacked: one layer traced, not all (unless layers differ)
    model_cfg.scan_layers = moe.num_moe_layers(model_cfg) in (0, model_cfg.num_layers)
    model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
    e = model_cfg.moe

    def size(module: nnx.Module, active: bool = False) -> int:
        variables = jax.tree.leaves(nnx.state(module, nnx.Param),
                                    is_leaf=lambda x: isinstance(x, nnx.Variable))
        return sum(math.prod(v.shape) // e.num_experts * e.top_k
                   if active and "expert" in (v.get_metadata().get("out_sharding") or ())
                   else math.prod(v.shape) for v in variables)

    total, active = size(model), size(model, active=True)
    embedding = size(model.embed) + (size(model.pos_embed) if hasattr(model, "pos_embed") else 0)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "active": active, "active_non_embedding": active - embedding}


def _matmul_params(model_cfg: ml_collections.ConfigDict, non_embedding: int) -> int:
    tied_unembedding = model_cfg.d_model * model_cfg.vocab_size if model_cfg.tie_embeddings else 0
    return non_embedding + tied_unembedding


def _train_flops(model_cfg: ml_collections.ConfigDict, non_embedding: int, seq_len: int) -> float:
    d_attn = model_cfg.num_heads * model_cfg.head_dim
    attention = 6 * model_cfg.num_layers * seq_len * d_attn
    return float(6 * _matmul_params(model_cfg, non_embedding) + attention)


CONVENTIONS = ("project", "kaplan", "chinchilla")
FORMULAS = {"project": "6N + 6·layers·T·d_attn", "kaplan": "6N, N without embedding tables",
            "chinchilla": "Hoffmann et al. 2022 App. F x 3"}


def kaplan_params(model_cfg: ml_collections.ConfigDict, non_embedding: int) -> int:
    """Kaplan's N: the project's non-embedding count less the untied unembedding table."""
    return non_embedding - (0 if model_cfg.tie_embeddings else model_cfg.d_model *
                            model_cfg.vocab_size)


def chinchilla_terms(model_cfg: ml_collections.ConfigDict, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by the terms of Hoffmann et al. 2022, Appendix F (their
    per-sequence counts over seq_len). GQA shrinks the K and V projections; MHA is the paper's."""
    m = model_cfg
    d_attn, d_kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    per_layer_attention = (2 * m.d_model * (d_attn + 2 * d_kv)  # Q, K, V projections
                           + 2 * seq_len * d_attn  # logits Q·K^T, every key
                           + 3 * m.num_heads * seq_len  # softmax
                           + 2 * seq_len * d_attn  # softmax @ V
                           + 2 * d_attn * m.d_model)  # output projection
    mlp_matrices = 3 if m.mlp in ("swiglu", "geglu") else 2
    e, moe_layers = m.moe, moe.num_moe_layers(m)  # an MoE layer: its router and active experts
    mlp_widths = ((m.num_layers - moe_layers) * m.mlp_dim
                  + moe_layers * (e.top_k + e.num_shared_experts) * e.expert_mlp_dim)
    return {"embeddings": float(2 * m.vocab_size * m.d_model),
            "attention": float(m.num_layers * per_layer_attention),
            "dense": float(2 * mlp_matrices * m.d_model * mlp_widths
                           + moe_layers * 2 * m.d_model * e.num_experts),
            "logits": float(2 * m.d_model * m.vocab_size)}


def _convention_flops(model_cfg: ml_collections.ConfigDict, non_embedding: int, seq_len: int,
                      convention: str) -> float:
    if convention == "project":
        return _train_flops(model_cfg, non_embedding, seq_len)
    if convention == "kaplan":
        return float(6 * kaplan_params(model_cfg, non_embedding))
    if convention == "chinchilla":
        return 3 * sum(chinchilla_terms(model_cfg, seq_len).values())
    raise ValueError(f"train.flops_convention={convention!r} is not one of {CONVENTIONS}.")


def flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int,
                    convention: str = "project") -> float:
    """Training FLOPs per token (forward + backward) in `convention` (module docstring)."""
    return _convention_flops(model_cfg, count_params(model_cfg)["active_non_embedding"], seq_len,
                             convention)


def forward_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Forward-only FLOPs per token (evaluation, sampling): one third of training."""
    return flops_per_token(model_cfg, seq_len) / 3


def describe(model_cfg: ml_collections.ConfigDict) -> str:
    """The architecture in one line, e.g. for a log header."""
    m = model_cfg
    heads = f"{m.num_heads} heads" + (f" / {m.num_kv_heads} kv" if m.num_kv_heads != m.num_heads
                                      else "")
    return (f"{m.num_layers} layers x d_model {m.d_model}, {heads} x {m.head_dim}, "
            f"{m.mlp} mlp {m.mlp_dim}, {m.norm} norm, {m.position} positions, vocab {m.vocab_size}"
            f"{', tied' if m.tie_embeddings else ''}{', biases' if m.use_bias else ''}"
            f"{_describe_moe(m) if m.moe.num_experts else ''}")


def _describe_moe(m: ml_collections.ConfigDict) -> str:
    e, every = m.moe, m.moe.every_nth_layer
    return (f", MoE {e.num_experts} x {e.expert_mlp_dim} top-{e.top_k}"
            f"{f' + {e.num_shared_experts} shared' if e.num_shared_experts else ''}"
            f"{f' every {every} layers' if every > 1 else ''} ({e.score}, {e.dispatch})")


def granularity(model_cfg: ml_collections.ConfigDict) -> float:
    """Krajewski et al. 2024's G = mlp_dim / expert_mlp_dim (mlp_dim: the dense twin's MLP);
    0 for a dense model."""
    e = model_cfg.moe
    return model_cfg.mlp_dim / e.expert_mlp_dim if e.num_experts else 0.0


def report_dict(cfg: ml_collections.ConfigDict) -> dict:
    """Every figure `lmjax info` prints, for a whole run config (model + data + optim + train).

    State bytes are params + AdamW's two moments, all in param_dtype (gradients and activations
    are transient and depend on the mesh; lmjax/plan.py estimates those).
    """
    counts = count_params(cfg.model)
    seq_len, batch = cfg.data.seq_len, cfg.data.global_batch_size
    per_token = _convention_flops(cfg.model, counts["active_non_embedding"], seq_len,
                                  cfg.train.flops_convention)
    tokens_per_step = seq_len * batch
    param_bytes = counts["total"] * jnp.dtype(cfg.model.param_dtype).itemsize
    return {
        "architecture": describe(cfg.model),
        "params": counts["total"],
        "params_embedding": counts["embedding"],
        "params_non_embedding": counts["non_embedding"],
        "params_active": counts["active"],
        "params_active_non_embedding": counts["active_non_embedding"],
        "params_kaplan": kaplan_params(cfg.model, counts["active_non_embedding"]),
        "granularity": granularity(cfg.model),
        "flops_convention": cfg.train.flops_convention,
        "flops_per_token": per_token,
        "forward_flops_per_token": per_token / 3,
        "tokens_per_step": tokens_per_step,
        "flops_per_step": per_token * tokens_per_step,
        "tokens_total": tokens_per_step * cfg.train.steps,
        "flops_total": per_token * tokens_per_step * cfg.train.steps,
        "param_bytes": param_bytes,
        "param_and_adamw_bytes": 3 * param_bytes,
    }


def report(cfg: ml_collections.ConfigDict) -> str:
    """`report_dict` as a short table a person reads before booking accelerators."""
    r = report_dict(cfg)
    gib = 2**30
    dtype = cfg.model.param_dtype
    rows = [
        ("architecture", r["architecture"]),
        ("params", f"{r['params']:,}"),
        ("  embedding", f"{r['params_embedding']:,}"),
        ("  non-embedding", f"{r['params_non_embedding']:,}"),
        *([("active params", f"{r['params_active']:,}  (per token: top_k of num_experts)"),
           ("  non-embedding", f"{r['params_active_non_embedding']:,}")]
          if cfg.model.moe.num_experts else []),
        ("FLOPs/token (train)", f"{r['flops_per_token']:.4g}  ({r['flops_convention']}: "
                                f"{FORMULAS[r['flops_convention']]})"),
        ("tokens/step", f"{r['tokens_per_step']:,}  (seq_len {cfg.data.seq_len} x batch "
                        f"{cfg.data.global_batch_size})"),
        ("FLOPs/step", f"{r['flops_per_step']:.4g}"),
        ("run", f"{cfg.train.steps:,} steps = {r['tokens_total']:.4g} tokens = "
                f"{r['flops_total']:.4g} FLOPs"),
        ("params + AdamW", f"{r['param_and_adamw_bytes'] / gib:,.2f} GiB in {dtype} "
                           f"(params {r['param_bytes'] / gib:,.2f} GiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
