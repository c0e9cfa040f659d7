"""μP transfer on a 2-core CPU: is the best learning rate at width 32 still the best at 64, 128
and 256, and does the wider μP model do better at it?

    lmjax sweep --sweep=experiments/mup_transfer_cpu/tune.py --root=workdirs/mup_tune --parallel=2
    lmjax sweep --sweep=experiments/mup_transfer_cpu/sweep.py --root=workdirs/mup_sweep \
        --parallel=2
    python experiments/mup_transfer_cpu/analyze.py --root=workdirs/mup_sweep \
        --tune=workdirs/mup_tune --depth=workdirs/mup_depth --out=experiments/mup_transfer_cpu

A 2-layer LLaMA-style model (heads of 16, mlp_dim 2 x d_model) on the offline English corpus
(512-piece BPE, as experiments/isoflop_cpu), 400 steps of 16 x 32 tokens (205k tokens), 40
warmup steps then cosine to 10%, AdamW without gradient clipping (lmjax/mup.py: the global clip
is not width-aware). μP's base width is 32, where μP is SP exactly; tune.py picks its output
multiplier α_out there (μTransfer tunes it at the base width, Tensor Programs V sec. 6), and
OUTPUT_MULT below is that choice. Each width's LR grid is 2x apart; two seeds each.
"""

import os

from configs import base

WIDTHS = (32, 64, 128, 256)
SEEDS = (0, 1)
HEAD_DIM = 16
OUTPUT_MULT = 8.0  # tune.py's choice: the flattest of the best (README)
MUP_LOG2_LRS = (-8, -7, -6, -5, -4)  # around the base width's optimum, 2^-6
SP_LOG2_LRS = (-11, -10, -9, -8, -7)  # SP at the widest: its optimum falls with width
CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "workdirs", "corpus")


def get_config(arg: str | None = None):
    del arg
    c = base.get_config()
    c.model.update(vocab_size=512, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                   head_dim=HEAD_DIM, mlp_dim=64, max_len=32, mup_base_width=32,
                   mup_base_attn_dim=32, mup_base_mlp_dim=64, mup_base_head_dim=HEAD_DIM)
    c.data.update(seq_len=32, global_batch_size=16,
                  text=os.path.abspath(os.path.join(CORPUS, "english", "*.txt")),
                  tokenizer=os.path.abspath(os.path.join(CORPUS, "tok", "english_bpe512.model")))
    c.optim.update(warmup_steps=40, clip_norm=0.0)
    c.train.update(steps=400, log_every=20, eval_every=0, eval_batches=32)
    c.checkpoint.update(every=400)
    return c


def width(d: int) -> dict:
    return {"model.d_model": d, "model.num_heads": d // HEAD_DIM,
            "model.num_kv_heads": d // HEAD_DIM, "model.mlp_dim": 2 * d}


def name(d: int, p: str, log2_lr: int, seed: int) -> str:
    return f"w{d}_{p}_log2lr{log2_lr}_s{seed}"


def get_sweep() -> dict[str, dict]:
    """The widest width first (its runs are the longest), the middle of each grid first."""
    members = {}
    for seed in SEEDS:
        for d in sorted(WIDTHS, reverse=True):
            grids = {"mup": MUP_LOG2_LRS, **({"sp": SP_LOG2_LRS} if d == WIDTHS[-1] else {})}
            for p, grid in grids.items():
                for k in sorted(grid, key=lambda k: abs(k - grid[len(grid) // 2])):
                    members[name(d, p, k, seed)] = {
                        **width(d), "model.parametrization": p, "optim.lr": 2.0**k,
                        "seed": seed, "model.mup_output_mult": OUTPUT_MULT if p == "mup" else 1.0}
    return members
