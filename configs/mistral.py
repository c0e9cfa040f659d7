"""Mistral 7B v0.1 (Jiang et al. 2023): LLaMA's layout with a 4096-token sliding window
(model.attention_window), grouped-query attention (32 query, 8 kv heads) and a 14336-wide MLP.

    lmjax train --config=configs/mistral.py:tiny --workdir=/tmp/mistral_tiny   # a CPU toy
    lmjax info --config=configs/mistral.py:7b
    lmjax convert --from_hf=Mistral-7B-v0.1/ --workdir=/tmp/mistral   # the released weights

  tiny  base.py's model as Mistral: a 64-token window over 256-token rows, 2 kv heads
  7b    Mistral-7B-v0.1: 7,241,732,096 params (32 layers, d_model 4096, vocab 32000, untied)

A query at position i sees keys i - window < j <= i, as Hugging Face's `sliding_window`;
decoding keeps a rolling cache of `window` slots. The optimizer and batch keys are lmjax's
choices for the size (Mistral did not publish theirs); the whole 7B is sharded (mesh.fsdp=-1).
"""

import ml_collections

from configs import base

# name: model overrides, (seq_len, sequences per step), (peak lr, warmup steps), training tokens
PRESETS = {
    "tiny": (dict(num_kv_heads=2, mlp_dim=896, attention_window=64),
             (256, 32), (3e-3, 100), 1000 * 256 * 32),
    "7b": (dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                head_dim=128, mlp_dim=14336, attention_window=4096, max_len=32768,
                dtype="bfloat16"),
           (8192, 512), (3e-4, 2000), 2 * 10**12),
}


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    return base.family("mistral", PRESETS, arg, mlp="swiglu", norm="rms", norm_eps=1e-5,
                       position="rope", rope_theta=10_000.0, use_bias=False,
                       tie_embeddings=False)
