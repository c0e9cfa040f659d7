"""The optimizer: global-norm clipping, then AdamW with a weight-decay mask, on a schedule.

Everything is an optax building block; this file only chooses and wires them. Weight decay
applies to matrices only: decaying norm scales and biases pulls them towards zero for no
benefit (the GPT-3/nanoGPT practice), and embeddings are excluded unless configured because
their rows see few gradient updates each.
"""

from collections.abc import Callable

import jax
import ml_collections
import optax

from lmjax import config

SCHEDULES = ("cosine", "linear", "constant", "rsqrt", "wsd")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """optim.schedule (its numbers, the warmup within train.steps included, are in
    validate.RANGES)."""
    config.check_choices(cfg, {"optim.schedule": SCHEDULES})


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr over cfg.warmup_steps, then the named decay."""
    lr, warmup = cfg.lr, cfg.warmup_steps
    end = lr * cfg.end_lr_fraction
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=cfg.end_lr_fraction)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, rest)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "rsqrt":  # lr * sqrt(warmup / step), continuous at the end of warmup
        after = lambda count: lr * jax.lax.rsqrt(1.0 + count / max(warmup, 1))
    elif cfg.schedule == "wsd":  # Hägele et al. 2024: hold, then decay over the last fraction
        decay = max(int(rest * cfg.wsd_decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [rest - decay])
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is unknown; choose one of {SCHEDULES}.")
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params, decay_embeddings: bool):
    """True for the leaves AdamW should decay: matrices, plus embedding tables if asked.

    Norm scales and biases never decay whatever their rank: GPT-2's per-head q/k/v biases are
    [N, H], and scanned layers (model.scan_layers) give every leaf a leading layers axis."""

    def decays(path, leaf) -> bool:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.rsplit("/", 1)[-1] in ("scale", "bias"):
            return False
        is_embedding = "embed/embedding" in name
        return leaf.ndim >= 2 and (decay_embeddings or not is_embedding)

    return jax.tree_util.tree_map_with_path(decays, params)


def make(cfg: ml_collections.ConfigDict, total_steps: int,
         lr_scales: dict[str, float] | None = None,
         lr_labels: Callable | None = None) -> optax.GradientTransformation:
    """clip -> AdamW -> schedule; `lr_scales` (label -> factor, with `lr_labels(params)` naming
    each leaf's label) gives parameters their own learning rate, as μP needs (lmjax/mup.py).

    The factor scales AdamW's whole update, -lr (adam + wd p), so a parameter's decoupled
    weight decay moves with its learning rate, as torch's AdamW (and the mup package) do.
    """
    adamw = optax.adamw(
        schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, cfg.decay_embeddings))
    if lr_scales is not None:
        per_label = optax.multi_transform(
            {label: optax.scale(factor) for label, factor in lr_scales.items()}, lr_labels)
        adamw = optax.chain(adamw, per_label)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
