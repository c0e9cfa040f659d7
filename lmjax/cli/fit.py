"""`lmjax fit --root=DIR`: fit scaling laws to the runs under DIR; write results, a table and
figures."""

from absl import flags

from lmjax.cli import common
from lmjax.scaling import report

flags.DEFINE_string("root", None, "folder or gs:// URL holding one workdir per sweep member")
flags.DEFINE_string("method", "all", "kaplan_n | kaplan_d | kaplan_c | approach1 | "
                    "approach2 | approach3 | all")
flags.DEFINE_string("params", "non_embedding", "N is 'non_embedding', 'total' or "
                    "'kaplan' (no embedding or unembedding table) params")
flags.DEFINE_integer("bootstrap", 200, "bootstrap resamples for 95% intervals (0 = none)")
flags.DEFINE_string("out", "", "output folder or gs:// URL (default <root>/fit)")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    common.need("root")
    print(report.summary(report.analyze(FLAGS.root, FLAGS.method, FLAGS.out, FLAGS.params,
                                        FLAGS.bootstrap)))
