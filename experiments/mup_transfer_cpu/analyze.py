"""Collect the μP transfer sweep (sweep.py) and its base-width tuning (tune.py): held-out loss per
(width, parametrization, LR, seed), the seed mean, each curve's best LR, results.csv, table.md
and mup_transfer.png.

    python experiments/mup_transfer_cpu/analyze.py --root=workdirs/mup_sweep \
        --tune=workdirs/mup_tune --depth=workdirs/mup_depth --out=experiments/mup_transfer_cpu

A run that stopped on a NaN/Inf loss (lmjax stops it) counts as diverged: no loss, not plotted.
"""

import argparse
import csv
import json
import math
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE))]  # the repository: configs/, experiments/
from experiments.mup_transfer_cpu import depth, sweep, tune  # noqa: E402

LABELS = {"sp": "SP", "mup": "μP"}


def final_loss(workdir: str) -> float:
    """eval/loss after the last step; NaN if the run never got there (diverged, not trained)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return math.nan
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    last = rows[-1] if rows else {}
    if last.get("step") != sweep.get_config().train.steps or "eval/loss" not in last:
        return math.nan
    return last["eval/loss"]


def collect(root: str) -> list[dict]:
    rows = []
    for d in sweep.WIDTHS:
        for p, grid in (("mup", sweep.MUP_LOG2_LRS), ("sp", sweep.SP_LOG2_LRS)):
            if p == "sp" and d != sweep.WIDTHS[-1]:
                continue
            for k in grid:
                losses = [final_loss(os.path.join(root, sweep.name(d, p, k, s)))
                          for s in sweep.SEEDS]
                rows.append({"width": d, "parametrization": p, "log2_lr": k,
                             **{f"loss_seed{s}": x for s, x in zip(sweep.SEEDS, losses,
                                                                   strict=True)},
                             "mean": float(np.mean(losses)),
                             "spread": float(np.max(losses) - np.min(losses))})
    return rows


def best(rows: list[dict], d: int, p: str) -> dict | None:
    done = [r for r in rows if (r["width"], r["parametrization"]) == (d, p)
            and not math.isnan(r["mean"])]
    return min(done, key=lambda r: r["mean"]) if done else None


def table(rows: list[dict]) -> str:
    grid = sorted({r["log2_lr"] for r in rows})
    lines = ["| width | param | " + " | ".join(f"2^{k}" for k in grid) + " | best LR | best loss |",
             "|" + "---|" * (len(grid) + 4)]
    for d in sweep.WIDTHS:
        for p, label in LABELS.items():
            cells = {r["log2_lr"]: r for r in rows if (r["width"], r["parametrization"]) == (d, p)}
            if not cells:
                continue
            text = [("—" if k not in cells else "div." if math.isnan(cells[k]["mean"]) else
                     f"{cells[k]['mean']:.3f} ±{cells[k]['spread'] / 2:.3f}") for k in grid]
            b = best(rows, d, p)
            lines.append(f"| {d} | {label} | " + " | ".join(text) + " | " +
                         (f"2^{b['log2_lr']} | {b['mean']:.3f}" if b else "— | —") + " |")
    return "\n".join(lines)


def tune_table(root: str) -> str:
    lines = ["| α_out | " + " | ".join(f"2^{k}" for k in tune.LOG2_LRS) + " |",
             "|" + "---|" * (len(tune.LOG2_LRS) + 1)]
    for a in tune.OUTPUT_MULTS:
        losses = [final_loss(os.path.join(root, f"w32_out{a:g}_log2lr{k}"))
                  for k in tune.LOG2_LRS]
        lines.append(f"| {a:g} | " + " | ".join("div." if math.isnan(x) else f"{x:.3f}"
                                                for x in losses) + " |")
    return "\n".join(lines)


def depth_table(root: str) -> str:
    """Loss per (depth, kind, LR) of depth.py's one seed, and each row's best LR."""
    lines = ["| layers | | " + " | ".join(f"2^{k}" for k in depth.LOG2_LRS) + " | best LR |",
             "|" + "---|" * (len(depth.LOG2_LRS) + 3)]
    kinds = {"depth_mup": "μP + Depth-μP", "mup": "μP"}
    for d in depth.DEPTHS:
        for kind, label in kinds.items():
            if kind == "mup" and d == depth.DEPTHS[0]:
                continue
            losses = [final_loss(os.path.join(root, depth.name(d, kind, k, s)))
                      for k in depth.LOG2_LRS for s in depth.SEEDS]
            finite = [(x, k) for x, k in zip(losses, depth.LOG2_LRS, strict=True)
                      if not math.isnan(x)]
            lines.append(f"| {d} | {label} | " + " | ".join(
                "div." if math.isnan(x) else f"{x:.3f}" for x in losses) + " | " +
                (f"2^{min(finite)[1]}" if finite else "—") + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(sweep.WIDTHS)))
    widest = sweep.WIDTHS[-1]
    panels = {"μP, every width": [(d, "mup") for d in sweep.WIDTHS],
              f"width {widest}: SP and μP": [(widest, "sp"), (widest, "mup")]}
    for ax, (title, curves) in zip(axes, panels.items(), strict=True):
        for i, (d, p) in enumerate(curves):
            color = colors[sweep.WIDTHS.index(d)] if title.startswith("μP") else f"C{i}"
            cells = [r for r in rows if (r["width"], r["parametrization"]) == (d, p)
                     and not math.isnan(r["mean"])]
            x = [r["log2_lr"] for r in cells]
            for s in sweep.SEEDS:
                ax.plot(x, [r[f"loss_seed{s}"] for r in cells], ".", color=color, alpha=0.5)
            ax.plot(x, [r["mean"] for r in cells], "-", color=color,
                    label=f"{LABELS[p]} d_model {d}")
            b = best(rows, d, p)
            if b:
                ax.plot([b["log2_lr"]], [b["mean"]], "*", color=color, markersize=14)
        ax.set(title=title, xlabel="log2 learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"held-out loss after {sweep.get_config().train.steps} steps (nats)")
    fig.suptitle("Held-out loss vs LR (dots: seeds; line: their mean; star: best mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--tune", required=True)
    parser.add_argument("--depth", default="", help="depth.py's sweep root, if run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = collect(args.root)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = f"Base width 32, one seed:\n\n{tune_table(args.tune)}\n\nTransfer:\n\n{table(rows)}\n"
    if args.depth:
        text += f"\nDepth, width {depth.WIDTH}, one seed:\n\n{depth_table(args.depth)}\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.out, "mup_transfer.png"))
    print(text)


if __name__ == "__main__":
    main()
