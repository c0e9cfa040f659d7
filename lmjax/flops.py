"""Parameter and FLOP counts: the one convention every MFU, scaling fit and `lmjax info` uses.

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
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lmjax.model import Transformer


def count_params(model_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """{'total', 'embedding', 'non_embedding'} from the abstract model: exact, and free to compute
    (`lmjax info` works for a 7B config on a laptop)."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))

    def size(module: nnx.Module) -> int:
        return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))

    total = size(model)
    embedding = size(model.embed) + (size(model.pos_embed) if hasattr(model, "pos_embed") else 0)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _matmul_params(model_cfg: ml_collections.ConfigDict, non_embedding: int) -> int:
    tied_unembedding = model_cfg.d_model * model_cfg.vocab_size if model_cfg.tie_embeddings else 0
    return non_embedding + tied_unembedding


def _train_flops(model_cfg: ml_collections.ConfigDict, non_embedding: int, seq_len: int) -> float:
    d_attn = model_cfg.num_heads * model_cfg.head_dim
    attention = 6 * model_cfg.num_layers * seq_len * d_attn
    return float(6 * _matmul_params(model_cfg, non_embedding) + attention)


def flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), in the convention of the module docstring."""
    return _train_flops(model_cfg, count_params(model_cfg)["non_embedding"], seq_len)


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
            f"{', tied' if m.tie_embeddings else ''}{', biases' if m.use_bias else ''}")


def report_dict(cfg: ml_collections.ConfigDict) -> dict:
    """Every figure `lmjax info` prints, for a whole run config (model + data + optim + train).

    State bytes are params + AdamW's two moments, all in param_dtype (gradients and activations
    are transient and depend on the mesh; lmjax/plan.py estimates those).
    """
    counts = count_params(cfg.model)
    seq_len, batch = cfg.data.seq_len, cfg.data.global_batch_size
    per_token = _train_flops(cfg.model, counts["non_embedding"], seq_len)
    tokens_per_step = seq_len * batch
    param_bytes = counts["total"] * jnp.dtype(cfg.model.param_dtype).itemsize
    return {
        "architecture": describe(cfg.model),
        "params": counts["total"],
        "params_embedding": counts["embedding"],
        "params_non_embedding": counts["non_embedding"],
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
        ("FLOPs/token (train)", f"{r['flops_per_token']:.4g}  (6N + 6·layers·T·d_attn)"),
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
