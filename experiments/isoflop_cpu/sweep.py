"""IsoFLOP sweep on a 2-core CPU: 3 compute budgets x 5 model sizes (Chinchilla approach 2).

    lmjax data corpus --out=workdirs/corpus/english --cache=workdirs/corpus/cache
    lmjax tokenizer train --input=workdirs/corpus/english/train.txt --vocab_size=512 \
        --out=workdirs/corpus/tok/english_bpe512
    lmjax sweep --sweep=experiments/isoflop_cpu/sweep.py --root=workdirs/isoflop_cpu --parallel=1
    lmjax fit --root=workdirs/isoflop_cpu --out=experiments/isoflop_cpu/results

Data: the ~55 MB offline English corpus (lmjax/corpora/english.py), read as local text. The glob
takes train.txt then validation.txt, so the held-out 5% of documents (the tail) is drawn from
validation.txt, whose documents the corpus chose by hash across every source.

Sizes: non-embedding N (lmjax/flops.py: blocks + unembedding) from 1.25e4 to 2e5 in steps of
2x, at aspect ratio d_model / layers = 32 with 8-wide heads (lmjax/scaling/shapes.py). A
512-piece vocabulary keeps the tables from being most of N at these sizes (with 2,048 pieces the
smallest model would be 85% unembedding). Budgets 2.5x apart, sized so the study trains in
about 20 minutes on an idle 2-core machine and each budget's loss minimum falls inside its sizes
(checked on the first budget before the rest; see README).
Each member's length comes from train.flops_budget (steps = budget / FLOPs per step).
"""

import functools
import os

from configs import base
from lmjax.scaling import shapes

BUDGETS = (1e11, 2e11, 4e11)  # training FLOPs (lmjax/flops.py project convention)
SIZES = (1.25e4, 2.5e4, 5e4, 1e5, 2e5)  # target non-embedding parameters
CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "workdirs", "corpus")


def get_config(arg: str | None = None):
    del arg
    c = base.get_config()
    c.model.update(vocab_size=512, max_len=128)
    c.data.update(seq_len=128, global_batch_size=16,  # 2,048 tokens per step
                  text=os.path.abspath(os.path.join(CORPUS, "english", "*.txt")),
                  tokenizer=os.path.abspath(os.path.join(CORPUS, "tok", "english_bpe512.model")))
    c.optim.update(lr=3e-3, warmup_steps=10)  # the shortest member trains 37 steps
    c.train.update(log_every=10, eval_every=0, eval_batches=32)  # eval: 65k held-out tokens
    c.checkpoint.update(every=200)
    return c


@functools.cache
def _shape(target: float) -> dict:
    shape = shapes.shape_for_params(target, get_config().model, aspect=32, head_dim=8)
    return {f"model.{k}": v for k, v in shape.items() if k != "params"}


def get_sweep() -> dict[str, dict]:
    return {f"C{c:.3g}_N{n:.2g}": {**_shape(n), "train.flops_budget": c}
            for c in BUDGETS for n in SIZES}
