"""Gemma 2B (Gemma Team 2024): GeGLU MLP (model.mlp='geglu'), multi-query attention with
256-wide heads, embeddings times sqrt(d_model) (model.embed_scale), tied, a 256k vocabulary.

    lmjax train --config=configs/gemma.py:tiny --workdir=/tmp/gemma_tiny   # a CPU toy
    lmjax info --config=configs/gemma.py:2b
    lmjax convert --from_hf=gemma-2b/ --workdir=/tmp/gemma   # the released weights

  tiny  base.py's model as Gemma: one kv head, GeGLU, scaled tied embeddings
  2b    Gemma-2B: 2,506,172,416 params (18 layers, d_model 2048, 8 heads of 256, 1 kv head)

Gemma's RMSNorm multiplies by (1 + w); lmjax's by w, so import adds 1 to each norm weight and
export subtracts it (lmjax/interop/hf.py): the same function, no extra switch. The optimizer and
batch keys are lmjax's choices for the size (Gemma trained 2B on 3T tokens of 8192).
"""

import ml_collections

from configs import base

# name: model overrides, (seq_len, sequences per step), (peak lr, warmup steps), training tokens
PRESETS = {
    "tiny": (dict(num_kv_heads=1, mlp_dim=1024), (256, 32), (3e-3, 100), 1000 * 256 * 32),
    "2b": (dict(vocab_size=256000, d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                head_dim=256, mlp_dim=16384, max_len=8192, dtype="bfloat16"),
           (8192, 512), (3e-4, 2000), 3 * 10**12),
}


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    return base.family("gemma", PRESETS, arg, mlp="geglu", norm="rms", norm_eps=1e-6,
                       position="rope", rope_theta=10_000.0, use_bias=False,
                       tie_embeddings=True, embed_scale=True)
