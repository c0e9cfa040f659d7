"""GPT-2 (Radford et al. 2019) at its four published sizes, trained as in nanoGPT / build-nanogpt.

    lmjax train --config=configs/gpt2.py:small --workdir=/tmp/gpt2_small
    lmjax info --config=configs/gpt2.py:xl

small | medium | large | xl = 124,439,808 | 354,823,168 | 774,030,080 | 1,557,611,200 params
(vocab 50257, tied embeddings, learned positions, biases on every dense layer and LayerNorm,
none on the tied lm head). The optimizer follows GPT-3's table 2.1 for the same sizes (lr, a
0.5M-token batch, 1M for xl, warmup over 375M tokens); every size sees 10B tokens, the FineWeb-10B
budget of Karpathy's GPT-2 124M reproduction; raise --config.train.steps for more.
The data keys keep base.py's defaults: point data.text / data.tokenizer at your corpus (a
tokenizer of at most 50257 pieces), or use --config.data.source=synthetic to benchmark.
"""

import ml_collections

from configs import base

# name: (d_model, num_layers, num_heads, peak lr, sequences per step)
SIZES = {
    "small": (768, 12, 12, 6e-4, 512),
    "medium": (1024, 24, 16, 3e-4, 512),
    "large": (1280, 36, 20, 2.5e-4, 512),
    "xl": (1600, 48, 25, 2e-4, 1024),
}
TOKENS = 10_000_000_000
WARMUP_TOKENS = 375_000_000


def get_config(arg: str | None = "small") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/gpt2.py:{arg} is unknown; choose one of {list(SIZES)}.")
    d_model, num_layers, num_heads, lr, batch = SIZES[arg]
    c = base.get_config()
    c.model.update(
        vocab_size=50257, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_heads, head_dim=d_model // num_heads, mlp_dim=4 * d_model, mlp="gelu",
        norm="layer", norm_eps=1e-5, position="learned", max_len=1024, use_bias=True,
        tie_embeddings=True, dtype="bfloat16")
    c.data.update(seq_len=1024, global_batch_size=batch)
    tokens_per_step = 1024 * batch
    c.optim.update(lr=lr, warmup_steps=WARMUP_TOKENS // tokens_per_step)
    c.train.steps = TOKENS // tokens_per_step
    return c
