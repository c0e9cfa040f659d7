"""Qwen3 shapes (Qwen Team 2025): LLaMA's layout with RMSNorm on each head's queries and keys
before RoPE (model.qk_norm), grouped-query attention, RoPE base 1e6, tied embeddings at small sizes.

    lmjax train --config=configs/qwen3.py:tiny --workdir=/tmp/qwen3_tiny   # a CPU toy
    lmjax info --config=configs/qwen3.py:0.6b
    lmjax convert --from_hf=Qwen3-0.6B/ --workdir=/tmp/qwen3   # the released weights

  tiny  base.py's model as Qwen3: qk_norm, 2 kv heads, tied, a Qwen-sized MLP
  0.6b  Qwen3-0.6B: 596,049,920 params (28 layers, d_model 1024, 16/8 heads of 128, vocab 151936)

The optimizer and batch keys are lmjax's choices for the size (Qwen did not publish theirs):
4M-token batches of 4096 tokens. Qwen3's vocabulary needs its own tokenizer; point data.tokenizer
at it (or use --config.data.source=synthetic to benchmark).
"""

import ml_collections

from configs import base

# name: model overrides, (seq_len, sequences per step), (peak lr, warmup steps), training tokens
PRESETS = {
    "tiny": (dict(num_kv_heads=2, mlp_dim=768), (256, 32), (3e-3, 100), 1000 * 256 * 32),
    "0.6b": (dict(vocab_size=151936, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                  head_dim=128, mlp_dim=3072, max_len=40960, dtype="bfloat16"),
             (4096, 1024), (3e-4, 2000), 10**12),
}


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    return base.family("qwen3", PRESETS, arg, mlp="swiglu", norm="rms", norm_eps=1e-6,
                       position="rope", rope_theta=1_000_000.0, use_bias=False,
                       tie_embeddings=True, qk_norm=True)
