"""A run's config checked whole before anything is compiled, and its token or FLOP budget.

Each module checks its own keys next to the code that reads them: model.validate (shapes,
dtypes, positions, with attention's and rope_scaling's own), pipeline.validate (data),
optim.validate, sharding.validate (the mesh, and what each axis splits). This module runs them
in that order and adds the run's own keys (lengths, cadences, profiling, spike detection). The
budget lives here too: turning FLOPs into steps counts the model (flops.py), which config.py,
the bottom layer, cannot import.
"""

import ml_collections

from lmjax import config, flops, model, optim, sharding
from lmjax.data import pipeline

ON_NONFINITE = ("stop", "skip")  # what train.py does with a step whose loss or norm is not finite


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """config.load, with train.steps set from the token or FLOP budget: what every command
    that takes a run's config calls."""
    cfg = config.load(spec, overrides)
    apply_budget(cfg)
    return cfg


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Raise ValueError naming the first impossible setting; return the mesh shape."""
    model.validate(cfg)
    pipeline.validate(cfg)
    _validate_run(cfg)
    optim.validate(cfg)
    return sharding.validate(cfg, num_devices)


def _validate_run(cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    config.check_choices(cfg, {"train.on_nonfinite": ON_NONFINITE,
                               "train.flops_convention": flops.CONVENTIONS})
    config.check_at_least_one(cfg, ("train.steps", "train.grad_accum", "train.log_every",
                                    "checkpoint.every"))
    if cfg.profile.start_step < 1 or cfg.profile.num_steps < 0:
        raise ValueError(f"profile.start_step={cfg.profile.start_step} must be at least 1 and "
                         f"profile.num_steps={cfg.profile.num_steps} at least 0 (0 = off).")
    if t.spike_factor and t.spike_factor <= 1.0:
        raise ValueError(f"train.spike_factor={t.spike_factor} must be above 1 (or 0 = off).")
    steps = budget_steps(cfg)
    if steps is not None and steps != t.steps:
        raise ValueError(f"train.steps={t.steps} disagrees with the budget, which gives {steps} "
                         "steps; call validate.apply_budget(cfg) (validate.load does).")


def budget_steps(cfg: ml_collections.ConfigDict) -> int | None:
    """Steps that spend train.tokens_budget or train.flops_budget (None when both are 0): a
    scaling study holds tokens or FLOPs fixed, not steps. Rounded to the nearest step, so the
    spend is within half a step of the budget; FLOPs in train.flops_convention (lmjax/flops.py)."""
    t, d = cfg.train, cfg.data
    if t.tokens_budget and t.flops_budget:
        raise ValueError("Set train.tokens_budget or train.flops_budget, not both.")
    if t.tokens_budget < 0 or t.flops_budget < 0:
        raise ValueError("train.tokens_budget and train.flops_budget must be >= 0 (0 = off).")
    tokens_per_step = d.global_batch_size * d.seq_len
    if t.tokens_budget:
        return max(1, round(t.tokens_budget / tokens_per_step))
    if t.flops_budget:
        per_step = flops.flops_per_token(cfg.model, d.seq_len, t.flops_convention)
        return max(1, round(t.flops_budget / (per_step * tokens_per_step)))
    return None


def apply_budget(cfg: ml_collections.ConfigDict) -> None:
    """Set train.steps from a token or FLOP budget, if one is set (`load` calls this)."""
    steps = budget_steps(cfg)
    if steps is not None:
        cfg.train.steps = steps
