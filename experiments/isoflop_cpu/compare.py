"""WSD cooldown forks against separate cosine runs of the same size and length, and what the
cooldown design cost against separate runs.

    python experiments/isoflop_cpu/compare.py --wsd=workdirs/isoflop_wsd \
        --cosine=workdirs/isoflop_cosine --out=experiments/isoflop_cpu/results

Cost is counted in training FLOPs (lmjax/flops.py's convention, what the budgets are in): a
trunk's own steps plus each fork's steps after its fork step, against one separate run per
(size, budget) point.
"""

import argparse
import json
import os

from lmjax.scaling import collect


def trained_flops(run: dict) -> float:
    """FLOPs this workdir trained itself: a fork's metrics count from its fork step on."""
    per_step = run["flops"] / run["steps"]
    return per_step * (run["steps"] - run["fork_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wsd", required=True)
    parser.add_argument("--cosine", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    every = [collect.load_run(os.path.join(args.wsd, name)) for name in sorted(os.listdir(args.wsd))
             if os.path.isfile(os.path.join(args.wsd, name, "metrics.jsonl"))]
    forks = {(r["params_non_embedding"], r["flops_budget"]): r for r in every if r["fork_step"]}
    cosine = collect.collect(args.cosine)
    rows = []
    for run in sorted(cosine, key=lambda r: (r["flops_budget"], r["params_non_embedding"])):
        fork = forks[(run["params_non_embedding"], run["flops_budget"])]
        assert fork["steps"] == run["steps"], (fork["name"], run["name"])
        rows.append({"N": run["params_non_embedding"], "C": run["flops_budget"],
                     "steps": run["steps"], "cosine": run["eval_loss"], "wsd": fork["eval_loss"],
                     "wsd_minus_cosine": fork["eval_loss"] - run["eval_loss"]})
    spent = sum(trained_flops(r) for r in every)
    separate = sum(r["flops"] for r in every if r["fork_step"])
    summary = {"points": len(forks), "flops_trained": spent, "flops_separate_runs": separate,
               "cost_ratio": spent / separate, "comparisons": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wsd_vs_cosine.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("| N (non-emb.) | C | steps | cosine | WSD cooldown | WSD - cosine |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['N']:,} | {r['C']:.2g} | {r['steps']:,} | {r['cosine']:.4f} | "
              f"{r['wsd']:.4f} | {r['wsd_minus_cosine']:+.4f} |")
    print(f"\n{len(forks)} fit points; trained {spent:.3g} FLOPs against {separate:.3g} for "
          f"separate runs: cost ratio {spent / separate:.2f}")


if __name__ == "__main__":
    main()
