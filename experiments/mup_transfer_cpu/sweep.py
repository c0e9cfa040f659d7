"""μP transfer on a 2-core CPU: does the best learning rate at width 64 stay best at width 512?

    lmjax sweep --sweep=experiments/mup_transfer_cpu/sweep.py --root=workdirs/mup_transfer_cpu \
        --parallel=2
    python experiments/mup_transfer_cpu/analyze.py --root=workdirs/mup_transfer_cpu \
        --out=experiments/mup_transfer_cpu

A 2-layer LLaMA-style model on the shipped Shakespeare text, 200 steps of 8 x 32 tokens, LR
swept over 2^-13 .. 2^-3 in steps of 4x, at d_model 64 and 512 (heads of 16 and mlp_dim 2 x
d_model at both), under SP and μP (lmjax/mup.py) with base width 64: at width 64 μP is SP
exactly (tests/test_mup.py), so width 64 is trained once and serves both panels.
"""

from configs import base

WIDTHS = (64, 512)
LOG2_LRS = (-13, -11, -9, -7, -5, -3)
HEAD_DIM = 16


def get_config(arg: str | None = None):
    del arg
    c = base.get_config()
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=HEAD_DIM,
                   mlp_dim=128, max_len=32, mup_base_width=64, mup_base_attn_dim=64,
                   mup_base_mlp_dim=128, mup_base_head_dim=HEAD_DIM)
    c.data.update(seq_len=32, global_batch_size=8)
    c.optim.update(warmup_steps=20)  # then cosine to 0.1 x lr; AdamW, wd 0.1, clip 1
    c.train.update(steps=200, log_every=10, eval_every=0, eval_batches=32)
    c.checkpoint.update(every=200)
    return c


def _width(d: int) -> dict:
    return {"model.d_model": d, "model.num_heads": d // HEAD_DIM,
            "model.num_kv_heads": d // HEAD_DIM, "model.mlp_dim": 2 * d}


def get_sweep() -> dict[str, dict]:
    """Width 64 first, then width 512's LRs from the middle of the grid outwards, SP and μP
    alternating, so a sweep cut short still has both parametrizations around their optima."""
    members = {}
    for d in WIDTHS:
        for k in sorted(LOG2_LRS, key=lambda k: abs(k + 8)):
            for p in ("sp", "mup") if d != 64 else ("sp",):
                members[f"w{d}_{p}_log2lr{k}"] = {**_width(d), "model.parametrization": p,
                                                  "optim.lr": 2.0**k}
    return members
