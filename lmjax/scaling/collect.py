"""A sweep's results: one record per member workdir, read from its config.json and
metrics.jsonl (the files every run writes), with N counted from the config by lmjax/flops.py.

Final losses are the last held-out evaluation (`train` always evaluates at its last step);
training curves are the train loss averaged over a trailing window of logged rows, because a
single small batch's loss is too noisy for approach 1's envelope.

A WSD cooldown fork (train.fork_from) is a point like any run, at its total steps, tokens and
FLOPs (its parent's steps included: its metrics count from the fork on); the run it forks, a
constant-LR trunk whose last step never cooled down, is not (Hägele et al. 2024).
"""

import csv
import io
import json

import numpy as np

from lmjax import config as config_lib
from lmjax import flops, paths, resume

TABLE_KEYS = ("name", "params", "params_non_embedding", "params_kaplan", "flops_per_token",
              "steps", "tokens", "flops", "flops_budget", "tokens_budget", "eval_loss",
              "train_loss", "finished", "fork_step", "params_active", "num_experts",
              "granularity",  # these three: MoE runs (Krajewski et al. 2024); dense 0, 0
              "epochs")


def read_rows(workdir: paths.PathLike) -> list[dict]:
    """A run's metrics.jsonl (local or gs://). A torn last line is what a run killed
    mid-write leaves (`train` repairs it on resume): dropped, as the run is unfinished; a bad
    line before it is named."""
    path = paths.resolve(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not a JSON row ({e.msg}).") from None
    return rows


def load_run(workdir: paths.PathLike, window: int = 5) -> dict:
    """One run's record; `curve` holds arrays step, tokens, flops, loss (smoothed train loss)."""
    workdir = paths.resolve(workdir)
    cfg = config_lib.from_workdir(workdir)  # over base.py: runs older than a key still load
    rows = read_rows(workdir)
    if not rows:
        raise ValueError(f"{workdir}/metrics.jsonl has no rows yet.")
    counts = flops.report_dict(cfg)  # one abstract model build for every count
    train = [r for r in rows if "train/loss" in r]
    raw = np.array([r["train/loss"] for r in train])
    smooth = np.array([raw[max(0, i - window + 1):i + 1].mean() for i in range(len(raw))])
    evals = [r for r in rows if "eval/loss" in r]
    last = rows[-1]
    return {
        "name": workdir.name,
        "workdir": str(workdir),
        "params": counts["params"],
        "params_non_embedding": counts["params_non_embedding"],
        "params_kaplan": counts["params_kaplan"],
        "params_active": counts["params_active"],
        "num_experts": cfg.model.moe.num_experts,
        "granularity": counts["granularity"],
        "flops_per_token": counts["flops_per_token"],
        "steps": last["step"],
        "tokens": last["tokens"],
        "flops": last["flops"],
        "flops_budget": cfg.train.flops_budget,
        "tokens_budget": cfg.train.tokens_budget,
        "eval_loss": evals[-1]["eval/loss"] if evals else float("nan"),
        "train_loss": float(smooth[-1]),
        "finished": last["step"] == cfg.train.steps,
        # tokens seen / one pass over the training set, as `train` logs it: nan for runs that
        # could not know their dataset's size (pipeline.Data.train_tokens) or predate the key
        "epochs": float(last.get("epochs", float("nan"))),
        "fork_from": str(paths.resolve(cfg.train.fork_from)) if cfg.train.fork_from else "",
        "fork_step": resume.fork_step(cfg) if cfg.train.fork_from else 0,  # steps not its own
        "curve": {"step": np.array([r["step"] for r in train]),
                  "tokens": np.array([r["tokens"] for r in train], np.float64),
                  "flops": np.array([r["flops"] for r in train], np.float64), "loss": smooth},
    }


def collect(root: paths.PathLike, finished_only: bool = True) -> list[dict]:
    """Every run under `root` (a folder with a config.json and a metrics.jsonl), by name, but
    the trunks that cooldown forks under `root` were taken from."""
    root = paths.resolve(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Sweep root {str(root)!r} does not exist.")
    runs = [load_run(workdir) for workdir in sorted(root.iterdir())
            if all((workdir / f).is_file() for f in ("config.json", "metrics.jsonl"))]
    trunks = {run["fork_from"] for run in runs}
    runs = [run for run in runs if (run["finished"] or not finished_only)
            and run["workdir"] not in trunks]
    if not runs:
        raise ValueError(f"No finished runs under {str(root)!r} (a run is a folder with "
                         "config.json and metrics.jsonl whose last step is train.steps).")
    return runs


def write_table(runs: list[dict], path: paths.PathLike) -> None:
    """runs.csv, written whole in one call (an object on gs:// is)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=TABLE_KEYS)
    writer.writeheader()
    for run in runs:
        writer.writerow({k: run[k] for k in TABLE_KEYS})
    paths.resolve(path).write_text(text.getvalue())
