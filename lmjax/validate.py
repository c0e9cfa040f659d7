"""A run's config checked whole before anything is compiled, and its token or FLOP budget.

First every number's type and range, from one table (RANGES: key -> Range), so that no module
checks a single key by hand and each message reads the same: `optim.lr=-0.1 must be above 0.`
Then each module checks how its keys fit together, next to the code that reads them:
model.validate (shapes, dtypes, positions, with attention's and rope_scaling's own),
pipeline.validate (data), optim.validate, sharding.validate (the mesh, and what each axis
splits); this module adds the run's own choices. The budget lives here too: turning FLOPs into
steps counts the model (flops.py), which config.py, the bottom layer, cannot import.
"""

import dataclasses
import math

import ml_collections

from lmjax import checkpoint, config, flops, metrics, model, moe, mup, optim, resume, sharding
from lmjax.data import pipeline

ON_NONFINITE = ("stop", "skip")  # what train.py does with a step whose loss or norm is not finite


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a key may hold: from `low` to `high` (an end excluded where `*_open`), plus
    the `also` values outside that mean something (0 = off, -1 = the rest), said in `note`. A
    bound may name another key ('train.steps'), which RANGES then lists earlier."""

    low: float | str = -math.inf
    high: float | str = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    also: tuple[int, ...] = ()
    note: str = ""

    def bounds(self, cfg: ml_collections.ConfigDict) -> tuple[float, float]:
        return _value(cfg, self.low), _value(cfg, self.high)

    def holds(self, value, cfg: ml_collections.ConfigDict) -> bool:
        if value in self.also:
            return True
        low, high = self.bounds(cfg)
        return ((low < value if self.low_open else low <= value)
                and (value < high if self.high_open else value <= high))

    def describe(self, cfg: ml_collections.ConfigDict) -> str:
        low, high = (_named(cfg, b) for b in (self.low, self.high))
        if self.high == math.inf:
            text = f"above {low}" if self.low_open else f"at least {low}"
        else:
            text = (f"in {'(' if self.low_open else '['}{low}, "
                    f"{high}{')' if self.high_open else ']'}")
        if self.note:
            text += f" ({'or ' if self.also else ''}{self.note})"
        return text


def count(low: int = 1, **kw) -> Range:
    return Range(low, integer=True, **kw)


def above(low: float, **kw) -> Range:
    return Range(low, low_open=True, **kw)


FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SHARE = Range(0, 1)  # [0, 1]
AXIS = count(1, also=(-1,), note="-1 = the devices the other axes leave")

# Every numeric key of configs/base.py (tests/test_config.py checks that none is missing). Only
# single-key ranges live here; how keys fit together (heads and kv heads, a window within the
# context, the mesh and the devices) is checked by the module that reads them.
RANGES = {
    "seed": count(0),
    **{f"model.{k}": count(1) for k in ("vocab_size", "d_model", "num_layers", "num_heads",
                                        "num_kv_heads", "head_dim", "mlp_dim", "max_len",
                                        "mup_base_width", "mup_base_attn_dim",
                                        "mup_base_mlp_dim", "mup_base_head_dim")},
    "model.norm_eps": above(0),
    "model.rope_theta": above(1),
    "model.rope_scaling_factor": Range(1),
    "model.rope_original_max_len": count(0),
    "model.rope_yarn_alpha": above(0),
    "model.rope_yarn_beta": above(0),
    "model.attention_window": count(0, note="0 = full attention"),
    "model.dropout": FRACTION,
    "model.init_std": above(0),
    "model.mup_base_depth": count(0, note="0 = no depth-μP"),
    "model.mup_depth_alpha": Range(0.5, 1),
    **{f"model.mup_{k}": above(0) for k in ("output_mult", "attn_mult", "embed_mult",
                                             "lr_embed", "lr_hidden", "lr_readout")},
    "model.mup_readout_init_mult": Range(0, note="0 = zero-init"),
    "model.moe.num_experts": count(0, note="0 = dense"),
    "model.moe.top_k": count(1),
    "model.moe.num_shared_experts": count(0),
    "model.moe.expert_mlp_dim": count(1),
    "model.moe.every_nth_layer": count(1),
    "model.moe.aux_loss_weight": Range(0),
    "model.moe.z_loss_weight": Range(0),
    "model.moe.capacity_factor": above(0),
    "data.seq_len": count(1),
    "data.global_batch_size": count(1),
    "data.eval_fraction": FRACTION,
    "data.eval_stride": count(0, note="0 = data.seq_len"),
    "data.read_threads": count(0),
    "data.prefetch": count(0),
    "data.worker_count": count(0, note="0 = in the training process"),
    **{f"mesh.{a}": AXIS for a in ("data", "fsdp", "seq", "tensor", "expert")},
    **{f"mesh.dcn_{a}": count(1) for a in ("data", "fsdp", "seq", "tensor", "expert")},
    # train before optim: optim.warmup_steps is bounded by train.steps
    "train.steps": count(1),
    "train.tokens_budget": Range(0, note="0 = off"),
    "train.flops_budget": Range(0, note="0 = off"),
    "train.grad_accum": count(1),
    "train.log_every": count(1),
    "train.eval_every": count(0, note="0 = only at the end"),
    "train.eval_batches": count(0),
    "train.spike_factor": above(1, also=(0,), note="0 = off"),
    "train.lease_timeout": above(0),
    "train.fork_step": Range(0, "train.steps", high_open=True, integer=True,
                             note="0 = where the WSD cooldown begins"),
    "optim.lr": above(0),
    "optim.warmup_steps": Range(0, "train.steps", high_open=True, integer=True),
    "optim.end_lr_fraction": SHARE,
    "optim.wsd_decay_fraction": SHARE,
    "optim.cooldown_steps": count(0, note="0 = optim.wsd_decay_fraction's"),
    "optim.b1": FRACTION,
    "optim.b2": FRACTION,
    "optim.eps": above(0),
    "optim.muon_momentum": FRACTION,
    "optim.weight_decay": Range(0),
    "optim.clip_norm": Range(0, note="0 = off"),
    "optim.z_loss": Range(0),
    "profile.start_step": count(1),
    "profile.num_steps": count(0, note="0 = off"),
    "checkpoint.every": count(1),
    "checkpoint.max_to_keep": count(1),
}


def check_ranges(cfg: ml_collections.ConfigDict, keys=RANGES) -> None:
    """Raise ValueError naming the first of `keys` (all of RANGES by default) whose value is not
    a number of its kind (a bool, None, NaN or inf included) or lies outside its range."""
    for key in keys:
        rule, value = RANGES[key], _value(cfg, key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or rule.integer and not isinstance(value, int):
            kind = "an integer" if rule.integer else "a finite number"
            raise ValueError(f"{key}={value!r} must be {kind}, {rule.describe(cfg)}.")
        if not rule.holds(value, cfg):
            raise ValueError(f"{key}={value!r} must be {rule.describe(cfg)}.")


def _value(cfg: ml_collections.ConfigDict, key_or_number):
    if not isinstance(key_or_number, str):
        return key_or_number
    node = cfg
    for part in key_or_number.split("."):
        node = node[part]
    return node


def _named(cfg: ml_collections.ConfigDict, bound) -> str:
    """A bound as the message shows it: `train.steps=20` for a key, `0` for a number."""
    return f"{bound}={_value(cfg, bound)}" if isinstance(bound, str) else f"{bound:g}"


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """config.load, with train.steps set from the token or FLOP budget: what every command
    that takes a run's config calls."""
    cfg = config.load(spec, overrides)
    apply_budget(cfg)
    return cfg


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Raise ValueError naming the first impossible setting; return the mesh shape."""
    check_ranges(cfg)
    model.validate(cfg)
    mup.validate(cfg)
    pipeline.validate(cfg)
    _validate_run(cfg)
    optim.validate(cfg)
    shape = sharding.validate(cfg, num_devices)
    moe.validate_expert_axis(cfg.model, shape[sharding.AXES.index("expert")])
    return shape


def _validate_run(cfg: ml_collections.ConfigDict) -> None:
    config.check_choices(cfg, {"train.on_nonfinite": ON_NONFINITE,
                               "train.flops_convention": flops.CONVENTIONS})
    metrics.loggers(cfg.train.loggers)
    checkpoint.keep_steps(cfg.checkpoint)
    resume.validate(cfg)
    steps = budget_steps(cfg)
    if steps is not None and steps != cfg.train.steps:
        raise ValueError(f"train.steps={cfg.train.steps} disagrees with the budget, which gives "
                         f"{steps} steps; call validate.apply_budget(cfg) (validate.load does).")


def budget_steps(cfg: ml_collections.ConfigDict) -> int | None:
    """Steps that spend train.tokens_budget or train.flops_budget (None when both are 0): a
    scaling study holds tokens or FLOPs fixed, not steps. Rounded to the nearest step, so the
    spend is within half a step of the budget; FLOPs in train.flops_convention (lmjax/flops.py)."""
    t, d = cfg.train, cfg.data
    # what the arithmetic below reads (it runs before validate, from load)
    check_ranges(cfg, [k for k in RANGES if k.startswith(
        ("model.", "data.", "train.tokens_budget", "train.flops_budget"))])
    if t.tokens_budget and t.flops_budget:
        raise ValueError("Set train.tokens_budget or train.flops_budget, not both.")
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
