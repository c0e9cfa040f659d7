"""IsoFLOP sweep on a 2-core CPU from WSD cooldowns: 6 budgets over 32x, 5-6 sizes each.

    lmjax data corpus --out=workdirs/corpus/english --cache=workdirs/corpus/cache
    lmjax tokenizer train --input=workdirs/corpus/english/train.txt --vocab_size=512 \
        --out=workdirs/corpus/tok/english_bpe512
    lmjax sweep --sweep=experiments/isoflop_cpu/sweep.py --root=workdirs/isoflop_wsd --parallel=2
    lmjax fit --root=workdirs/isoflop_wsd --out=experiments/isoflop_cpu/results

One constant-LR trunk per size trains to the largest budget that size is in; every (size,
budget) point is a fork of it that cools down over the last 20% of that budget's steps after
warmup (1-sqrt shape; Hägele et al. 2024), so it ends as a WSD run of that length would.
`cosine.py` trains separate cosine runs of two budgets to check the cooldowns against.

Data: the ~55 MB offline English corpus (lmjax/corpora/english.py), read as local text; the
held-out 5% of documents (the tail) is drawn from validation.txt.

Sizes: non-embedding N (lmjax/flops.py: blocks + unembedding) from 6.25e3 to 4e5 in steps of
2x at aspect ratio d_model / layers = 32 with 8-wide heads (lmjax/scaling/shapes.py); a
512-piece vocabulary keeps the tables from being most of N. Each budget takes the sizes within
~4.5x of its expected optimum (from the 2026-11-23 cosine study: N_opt ~ 2.2e4 at 2e11), at
least 5, so that its minimum falls inside its grid rather than at an edge.
"""

import functools
import os

from configs import base
from lmjax.scaling import shapes, sweep

SIZES = (6.25e3, 1.25e4, 2.5e4, 5e4, 1e5, 2e5, 4e5)  # target non-embedding parameters
GRID = {  # training FLOPs (lmjax/flops.py project convention) -> its sizes
    1e11: SIZES[0:5], 2e11: SIZES[0:5], 4e11: SIZES[0:6],
    8e11: SIZES[1:6], 1.6e12: SIZES[1:6], 3.2e12: SIZES[2:7]}
CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "workdirs", "corpus")


def get_config(arg: str | None = None):
    del arg
    c = base.get_config()
    c.model.update(vocab_size=512, max_len=128)
    c.data.update(seq_len=128, global_batch_size=16,  # 2,048 tokens per step
                  text=os.path.abspath(os.path.join(CORPUS, "english", "*.txt")),
                  tokenizer=os.path.abspath(os.path.join(CORPUS, "tok", "english_bpe512.model")))
    c.optim.update(lr=3e-3, warmup_steps=10)
    c.train.update(log_every=50, eval_every=0, eval_batches=32)  # eval: 65k held-out tokens
    c.checkpoint.update(every=2000)
    return c


@functools.cache
def shape(target: float) -> dict:
    found = shapes.shape_for_params(target, get_config().model, aspect=32, head_dim=8)
    return {f"model.{k}": v for k, v in found.items() if k != "params"}


def get_sweep() -> dict[str, dict]:
    members = {}
    for n in SIZES:
        budgets = [c for c, sizes in GRID.items() if n in sizes]
        members.update(sweep.cooldowns(get_config(), {f"N{n:.3g}": shape(n)}, budgets,
                                       key="train.flops_budget", fraction=0.2, shape="1-sqrt"))
    return members
