"""IsoFLOP sweep on a 2-core CPU: 3 compute budgets x 5 model sizes (Chinchilla approach 2).

    lmjax sweep --sweep=experiments/isoflop_cpu/sweep.py --root=workdirs/isoflop_cpu --parallel=1
    lmjax fit --root=workdirs/isoflop_cpu --out=experiments/isoflop_cpu/results

NOTE: trains on the shipped Shakespeare text for now. The study is meant to run on the ~60 MB
offline corpus of the data-pipeline issue (Shakespeare's 1.2M tokens would be repeated by the
largest budgets, which biases D); switch `data.text`/`data.tokenizer` below once it lands, and
re-time the budgets (sized for ~45 GFLOP/s, the tiny config's rate on the 2-core CI machine).

Sizes: non-embedding N from 2e5 to 3.2e6 at aspect ratio d_model / layers = 32
(lmjax/scaling/shapes.py), bracketing Chinchilla's ~20 tokens per parameter at every budget.
Each member's length comes from train.flops_budget (steps = budget / FLOPs per step).
"""

import functools

from configs import base
from lmjax.scaling import shapes

BUDGETS = (2e12, 5e12, 1.25e13)  # training FLOPs (lmjax/flops.py convention)
SIZES = (2e5, 4e5, 8e5, 1.6e6, 3.2e6)  # target non-embedding parameters


def get_config(arg: str | None = None):
    c = base.get_config()
    c.model.update(max_len=128)
    c.data.update(seq_len=128, global_batch_size=16)  # 2,048 tokens per step
    c.optim.update(lr=3e-3, warmup_steps=10)
    c.train.update(log_every=10, eval_every=0, eval_batches=8)
    c.checkpoint.update(every=500)
    return c


@functools.cache
def _shape(target: float) -> dict:
    shape = shapes.shape_for_params(target, get_config().model, aspect=32, head_dim=16)
    return {f"model.{k}": v for k, v in shape.items() if k != "params"}


def get_sweep() -> dict[str, dict]:
    return {f"C{c:.3g}_N{n:.2g}": {**_shape(n), "train.flops_budget": c}
            for c in BUDGETS for n in SIZES}
