"""Separate cosine runs (10 warmup steps, cosine to 10% over each run's own length) for two of
sweep.py's budgets, to check its WSD cooldown forks against:

    lmjax sweep --sweep=experiments/isoflop_cpu/cosine.py --root=workdirs/isoflop_cosine \
        --parallel=2
"""

from experiments.isoflop_cpu import sweep

BUDGETS = (4e11, 1.6e12)
get_config = sweep.get_config


def get_sweep() -> dict[str, dict]:
    return {f"N{n:.3g},flops_budget={c:g}": {**sweep.shape(n), "train.flops_budget": c,
                                              "optim.schedule": "cosine"}
            for c in BUDGETS for n in sweep.GRID[c]}
