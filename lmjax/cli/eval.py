"""`lmjax eval --workdir=DIR [--split|--text] [--stride=N ...]`: loss, perplexity, bits per byte
and accuracy (± s.e.) of a run's checkpoint; a table, then one JSON line per result."""

import json

from absl import flags

from lmjax import evaluate
from lmjax.cli import common

common.define_workdir()
common.define_step("evaluate")
flags.DEFINE_enum("split", "eval", ["eval", "train", "all"], "which part of the run's text")
flags.DEFINE_string("text", None, "score all of these files (a shipped name, a glob or a "
                    "folder; local or gs://), read as the run's data.source: UTF-8 text, or "
                    "jsonl / parquet / hf records (--config.data.source=... "
                    "--config.data.text_field=... to read another kind)")
flags.DEFINE_integer("batches", 0, "at most this many global batches (0 = all rows)")
flags.DEFINE_multi_integer("stride", [], "slide windows of data.seq_len tokens this many "
                           "at a time (1..seq_len; repeat for a table of perplexity by stride)")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    workdir = common.require_workdir("eval")
    results = [evaluate.evaluate(workdir, split=FLAGS.split, text=FLAGS.text, step=FLAGS.step,
                                 batches=FLAGS.batches, overrides=tuple(overrides), stride=stride)
               for stride in FLAGS.stride or [None]]
    for result in results:
        print(evaluate.report(result))
        print(json.dumps(result))
    if len(results) > 1 and all("eval/stride" in r for r in results):  # not a mixture
        print(evaluate.stride_table(results))
