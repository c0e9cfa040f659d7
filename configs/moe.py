"""Mixture-of-experts shapes (lmjax/moe.py, docs/moe.md): LLaMA layers whose MLP routes each
token to top_k of num_experts expert MLPs.

    lmjax train --config=configs/moe.py:tiny --workdir=/tmp/moe_tiny   # seconds on a CPU
    lmjax info --config=configs/moe.py:8x7b
    lmjax info --config=configs/moe.py:30b_a3b

  tiny  smoke.py's model with 4 experts of width 32, top-2, on the shipped Shakespeare text
  qwen3_tiny  tiny in Qwen3-MoE's shape: q/k RMSNorm, 8 fine-grained experts of 16, top-4;
        168,672 params, 156,384 active (tests/test_hf_moe.py counts them; exports as qwen3_moe)
  8x7b  Mixtral 8x7B (Jiang et al. 2024): 46,702,792,704 params, 12,879,925,248 active per
        token (published: 46.7B / 12.9B); Mistral 7B's layers with 8 experts of 14336, top-2
  30b_a3b  Qwen3-30B-A3B (Qwen team 2025): 30,532,122,624 params, 3,353,032,704 active
        (published: 30.5B / 3.3B); fine-grained: 128 experts of 768, top-8, q/k RMSNorm

The large presets' batch, learning rate and token count are lmjax's choices for the size
(neither release published theirs); their weights are sharded over every device (mesh.fsdp=-1).
8x7b splits its experts over an expert axis of 8 (mesh.expert=8, dropless dispatch by ragged
all-to-all; docs/moe.md), so it needs a multiple of 8 devices; with full remat and 16
micro-batches a step fits v5p-64's HBM.
"""

import ml_collections

from configs import base

# name: model overrides, (seq_len, sequences per step), (peak lr, warmup steps), training tokens
PRESETS = {
    "tiny": (dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_len=32, moe=dict(num_experts=4, top_k=2, expert_mlp_dim=32)),
             (32, 8), (1e-2, 5), 20 * 32 * 8),
    "qwen3_tiny": (dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        mlp_dim=64, qk_norm=True, max_len=32,
                        moe=dict(num_experts=8, top_k=4, expert_mlp_dim=16)),
                   (32, 8), (1e-2, 5), 20 * 32 * 8),
    "8x7b": (dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                  head_dim=128, mlp_dim=14336, norm_eps=1e-5, rope_theta=1e6, max_len=32768,
                  moe=dict(num_experts=8, top_k=2, expert_mlp_dim=14336)),
             (4096, 1024), (3e-4, 2000), 2 * 10**12),
    "30b_a3b": (dict(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                     head_dim=128, mlp_dim=6144, rope_theta=1e6, qk_norm=True, max_len=32768,
                     moe=dict(num_experts=128, top_k=8, expert_mlp_dim=768)),
                (4096, 1024), (3e-4, 2000), 2 * 10**12),
}


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    c = base.family("moe", PRESETS, arg, mlp="swiglu", norm="rms", position="rope",
                    use_bias=False, tie_embeddings=False)
    if arg in ("tiny", "qwen3_tiny"):  # smoke.py's cadences: log every step, eval and save twice
        c.train.update(log_every=1, eval_every=10, eval_batches=2)
        c.checkpoint.update(every=10)
    else:
        c.model.update(dtype="bfloat16", scan_layers=True)
    if arg == "8x7b":  # expert parallelism: one expert per device of 8, weights FSDP over the rest
        c.mesh.update(expert=8)
        # fits v5p-64 (expert 8 x fsdp 4), dropless: 76 GiB peak of 95 per chip by `lmjax plan`
        # (capacity dispatch at factor 1.25: 62 GiB; docs/moe.md)
        c.model.remat = "full"
        c.train.grad_accum = 16
    return c
