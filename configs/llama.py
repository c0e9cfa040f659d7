"""LLaMA-family shapes (RoPE, RMSNorm, SwiGLU, untied, no biases), from a CPU toy to LLaMA-2 7B.

    lmjax train --config=configs/llama.py:tiny --workdir=/tmp/llama_tiny   # ~2 s/step, 2 CPU cores
    lmjax train --config=configs/llama.py:1b --workdir=gs://bucket/llama_1b
    lmjax info --config=configs/llama.py:7b

  tiny  base.py's model with grouped-query attention (2 kv heads) and a LLaMA-sized MLP
  1b    TinyLlama 1.1B (Zhang et al. 2024): 1,100,048,384 params; 2M-token batches, 3T tokens
  3b    OpenLLaMA 3B (Geng & Liu 2023): 3,426,473,600 params; 4M-token batches, 1T tokens
  7b    LLaMA-2 7B (Touvron et al. 2023): 6,738,415,616 params; 4M-token batches, 2T tokens

The large presets shard parameters and optimizer state over every device (mesh.fsdp=-1): a
replicated 7B model with AdamW state needs ~100 GB per device. The data keys keep base.py's
defaults: point data.text / data.tokenizer at your corpus (a tokenizer of at most 32000 pieces),
or use --config.data.source=synthetic to benchmark.
"""

import ml_collections

from configs import base

# name: model overrides, (seq_len, sequences per step), (peak lr, warmup steps), training tokens
PRESETS = {
    "tiny": (dict(num_kv_heads=2, mlp_dim=704, norm_eps=1e-5),
             (256, 32), (3e-3, 100), 1000 * 256 * 32),
    "1b": (dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                head_dim=64, mlp_dim=5632, norm_eps=1e-5, max_len=2048),
           (2048, 1024), (4e-4, 2000), 3 * 10**12),
    "3b": (dict(vocab_size=32000, d_model=3200, num_layers=26, num_heads=32, num_kv_heads=32,
                head_dim=100, mlp_dim=8640, norm_eps=1e-6, max_len=2048),
           (2048, 2048), (3e-4, 2000), 1 * 10**12),
    "7b": (dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                head_dim=128, mlp_dim=11008, norm_eps=1e-5, max_len=4096),
           (4096, 1024), (3e-4, 2000), 2 * 10**12),
}


def get_config(arg: str | None = "tiny") -> ml_collections.ConfigDict:
    c = base.family("llama", PRESETS, arg, mlp="swiglu", norm="rms", position="rope",
                     rope_theta=10_000.0, use_bias=False, tie_embeddings=False)
    c.optim.eps = 1e-5
    if arg != "tiny":
        c.model.dtype = "bfloat16"
    return c
