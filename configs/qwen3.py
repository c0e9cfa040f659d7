"""Qwen3 shapes (Qwen Team 2025): LLaMA's layout with RMSNorm on each head's queries and keys
before RoPE (model.qk_norm), grouped-query attention, RoPE base 1e6, tied embeddings at small sizes.

    lmjax train --config=configs/qwen3.py:tiny --workdir=/tmp/qwen3_tiny   # a CPU toy
    lmjax info --config=configs/qwen3.py:0.6b
    lmjax convert --from_hf=Qwen3-0.6B/ --workdir=/tmp/qwen3   # the released weights

  tiny  base.py's model as Qwen3: qk_norm, 2 kv heads, tied, a Qwen-sized MLP
  0.6b  Qwen3-0.6B: 596,049,920 params (28 layers, d_model 1024, 16/8 heads of 128, vocab 151936)
  1.7b  Qwen3-1.7B: 1,720,574,976 (28 layers, d_model 2048, 16/8 heads, MLP 6144, tied)
  4b    Qwen3-4B: 4,022,468,096 (36 layers, d_model 2560, 32/8 heads, MLP 9728, tied)
  8b    Qwen3-8B: 8,190,735,360 (36 layers, d_model 4096, 32/8 heads, MLP 12288, untied)
  14b   Qwen3-14B: 14,768,307,200 (40 layers, d_model 5120, 40/8 heads, MLP 17408, untied)
  32b   Qwen3-32B: 32,762,123,264 (64 layers, d_model 5120, 64/8 heads, MLP 25600, untied)
(every head of 128; the counts are the released weights', tests/test_families.py)

The optimizer and batch keys are lmjax's choices for the size (Qwen did not publish theirs):
4M-token batches of 4096 tokens. Qwen3's vocabulary needs its own tokenizer; point data.tokenizer
at it (or use --config.data.source=synthetic to benchmark).
"""

import ml_collections

from configs import base


def _size(d_model: int, layers: int, heads: int, mlp: int, tied: bool) -> tuple:
    """A released size: 8 kv heads of 128, vocab 151936, 40,960 positions, bf16 compute."""
    model = dict(vocab_size=151936, d_model=d_model, num_layers=layers, num_heads=heads,
                 num_kv_heads=8, head_dim=128, mlp_dim=mlp, max_len=40960, dtype="bfloat16",
                 tie_embeddings=tied)
    return model, (4096, 1024), (3e-4 if d_model <= 2560 else 1.5e-4, 2000), 10**12


# name: model overrides, (seq_len, sequences per step), (peak lr, warmup steps), training tokens
PRESETS = {
    "tiny": (dict(num_kv_heads=2, mlp_dim=768), (256, 32), (3e-3, 100), 1000 * 256 * 32),
    "0.6b": _size(1024, 28, 16, 3072, tied=True),
    "1.7b": _size(2048, 28, 16, 6144, tied=True),
    "4b": _size(2560, 36, 32, 9728, tied=True),
    "8b": _size(4096, 36, 32, 12288, tied=False),
    "14b": _size(5120, 40, 40, 17408, tied=False),
    "32b": _size(5120, 64, 64, 25600, tied=False),
}


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    return base.family("qwen3", PRESETS, arg, mlp="swiglu", norm="rms", norm_eps=1e-6,
                       position="rope", rope_theta=1_000_000.0, use_bias=False,
                       tie_embeddings=True, qk_norm=True)
