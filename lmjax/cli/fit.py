"""`lmjax fit --root=DIR | --table=FILE`: fit scaling laws to the runs under DIR or the rows of a
CSV/JSONL table; write results, a table and figures; `--plan_flops=C` plans a budget."""

from absl import flags

from lmjax.scaling import report

flags.DEFINE_string("root", None, "folder or gs:// URL holding one workdir per sweep member")
flags.DEFINE_string("table", None,
                    "instead of --root: a CSV or JSONL of runs (local or gs://), one row per run "
                    "with columns for N (params | params_non_embedding | params_kaplan, as "
                    "--params says, or N | parameters | model_size), D (tokens | D | "
                    "training_tokens) or C (flops | C | compute | training_flop), and loss "
                    "(eval_loss | loss | L); optional flops_budget, flops_per_token, epochs. "
                    "Case, spaces and dashes in names are ignored (lmjax/scaling/table.py)")
flags.DEFINE_string("method", "all", "kaplan_n | kaplan_d | kaplan_c | approach1 | "
                    "approach2 | approach3 (both objectives) | approach3_besiroglu | all")
flags.DEFINE_string("params", "non_embedding", "N is 'non_embedding', 'total' (Chinchilla's "
                    "count) or 'kaplan' (no embedding or unembedding table) params")
flags.DEFINE_integer("bootstrap", 200, "bootstrap resamples for 95% intervals (0 = none); "
                     "approach 3 refits each from its whole start grid and the full data's "
                     "optimum: ~0.1 s (hoffmann) and ~0.4 s (besiroglu) per resample at 80 "
                     "runs")
flags.DEFINE_float("plan_flops", 0.0, "also print N_opt, D_opt (with intervals) for this "
                   "training budget in FLOPs, and the nearest GPT-3 shape")
flags.DEFINE_string("out", "", "output folder or gs:// URL (default <root>/fit, or "
                    "<table folder>/<table name>_fit)")
FLAGS = flags.FLAGS


def run(args: list[str], overrides: list[str]) -> None:
    if not FLAGS.table and not FLAGS.root:
        raise ValueError("Missing --root (a sweep's workdirs) or --table (a CSV or JSONL of runs).")
    results = report.analyze(FLAGS.root or "", FLAGS.method, FLAGS.out, FLAGS.params,
                             FLAGS.bootstrap, FLAGS.table or "")
    print(report.summary(results))
    if FLAGS.plan_flops:
        print(report.plan_text(report.plan(results, FLAGS.plan_flops), FLAGS.params))
