"""The optimizer: global-norm clipping, then `optim.name`'s update with a weight-decay mask, on
a schedule.

Everything is an optax building block; this file only chooses and wires them. Weight decay
applies to matrices only: decaying norm scales and biases pulls them towards zero for no
benefit (the GPT-3/nanoGPT practice), and embeddings are excluded unless configured because
their rows see few gradient updates each. Every optimizer adds its decay before the learning
rate, so the step is -lr (update + wd p) whichever is chosen; under μP it is -lr (a update +
b wd p) with each parameter group's factors from mup.py.

optim.name  update (optax)                                      state per parameter
adamw       Adam (Loshchilov & Hutter 2019)                     2 copies
muon        orthogonalized momentum on hidden matrices          1 copy; 2 for AdamW's leaves
            (Jordan 2024), AdamW on embeddings, unembedding,
            norms and biases
lion        sign of interpolated momentum (Chen et al. 2023)    1 copy
adafactor   factored second moment (Shazeer & Stern 2018)       a row and a column per matrix
"""

import copy
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lmjax import config, mup

SCHEDULES = ("cosine", "linear", "constant", "rsqrt", "wsd")
COOLDOWN_SHAPES = ("linear", "1-sqrt")  # WSD's decay (Hägele et al. 2024, sec. 3)
NAMES = ("adamw", "muon", "lion", "adafactor")

# Muon's view of each hidden kernel as the matrix its layer multiplies by: (reduction axes,
# output axes), counted from the end so that scanned layers' leading axis is a batch axis.
# q/k/v [D, N, H] are D x NH (einsum BLD,DNH->BLNH); o [N, H, D] is NH x D; MLP kernels 2-D.
MUON_AXES = {**{m: (-3, (-2, -1)) for m in ("q", "k", "v")}, "o": ((-3, -2), -1),
             **{m: (-2, -1) for m in ("up", "gate", "down")}}
# Moonlight's matched update RMS (Liu et al. 2025, arXiv 2502.16982, sec. 2.2): each
# orthogonalized update x 0.2 sqrt(max(fan_in, fan_out)) has AdamW's typical RMS, so Muon's
# matrices and AdamW's other leaves share optim.lr, optim.weight_decay and the schedule.
MUON_RMS = 0.2


def validate(cfg: ml_collections.ConfigDict) -> None:
    """optim.schedule and optim.name, and μP only where its Adam table holds (its numbers, the
    warmup within train.steps included, are in validate.RANGES)."""
    config.check_choices(cfg, {"optim.schedule": SCHEDULES, "optim.name": NAMES,
                               "optim.cooldown_shape": COOLDOWN_SHAPES})
    o, steps = cfg.optim, cfg.train.steps
    if o.schedule == "wsd" and cooldown_length(o, steps) > steps - o.warmup_steps:
        raise ValueError(f"optim.cooldown_steps={o.cooldown_steps} is longer than the "
                         f"{steps - o.warmup_steps} steps after warmup (train.steps={steps}, "
                         f"optim.warmup_steps={o.warmup_steps}).")
    if cfg.optim.name == "muon" and cfg.model.parametrization == "mup":
        raise ValueError("optim.name='muon' cannot run under model.parametrization='mup': μP's "
                         "learning rates (lmjax/mup.py) are Adam's, and Muon's orthogonalized "
                         "updates already scale with each matrix's shape; use 'sp'.")


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
    elif cfg.schedule == "wsd":
        after = _wsd(cfg, cooldown_length(cfg, total_steps), rest)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is unknown; choose one of {SCHEDULES}.")
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def cooldown_length(cfg: ml_collections.ConfigDict, total_steps: int) -> int:
    """WSD's decay: the last optim.cooldown_steps steps, else optim.wsd_decay_fraction of the
    steps after warmup (0: no cooldown, a constant learning rate after warmup)."""
    if cfg.cooldown_steps:
        return cfg.cooldown_steps
    return int(max(total_steps - cfg.warmup_steps, 1) * cfg.wsd_decay_fraction)


def _wsd(cfg: ml_collections.ConfigDict, decay: int, rest: int) -> optax.Schedule:
    """Hägele et al. 2024 (arXiv 2405.18392): hold optim.lr, then cool down over the last
    `decay` steps to end_lr_fraction x lr, linearly or as 1 - sqrt (their best shape, sec. 3).

    The learning rate reaches the end value at train.steps, so the last update uses the one
    before it; the stable part does not depend on the run's length, which is what lets a
    cooldown start from another run's checkpoint (train.fork_from) or a run grow on resume."""
    lr, end = cfg.lr, cfg.lr * cfg.end_lr_fraction
    if decay == 0:
        return optax.constant_schedule(lr)
    if cfg.cooldown_shape == "linear":
        cool = optax.linear_schedule(lr, end, decay)
    else:  # "1-sqrt"
        cool = lambda count: end + (lr - end) * (1.0 - jnp.sqrt(jnp.minimum(count, decay)
                                                               / decay))
    return optax.join_schedules([optax.constant_schedule(lr), cool], [rest - decay])


def first_change(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                 steps: int) -> tuple[int, float, float] | None:
    """(step, old lr, new lr) of the first of steps 0 .. steps-1 whose learning rate differs
    between two runs' configs (optim and train.steps), or None: whether a run that took those
    steps under `old` is the start of a run planned as `new` (a resume that changes the length,
    a fork). Compared exactly: one schedule evaluated twice gives the same floats, and any
    other value would have made another run."""
    counts = jnp.arange(steps)
    before = np.asarray(schedule(old.optim, old.train.steps)(counts))
    after = np.asarray(schedule(new.optim, new.train.steps)(counts))
    differ = np.flatnonzero(before != after)
    if differ.size == 0:
        return None
    k = int(differ[0])
    return k, float(before[k]), float(after[k])


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


def muon_labels(params):
    """'muon' for the hidden matrices (mup.role 'hidden': attention q/k/v/o, MLP kernels),
    'adamw' for embeddings, the unembedding, norms and biases (Jordan 2024: Muon is for the
    hidden layers; the input and output layers want Adam)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "muon" if mup.role(path) == "hidden" else "adamw", params)


def muon_dimension_numbers(params):
    """optax's MuonDimensionNumbers for each leaf Muon updates (MUON_AXES by module name)."""
    def dims(path, leaf):
        if isinstance(leaf, optax.MaskedNode):  # an AdamW leaf, masked out of Muon's branch
            return leaf
        reduction, output = MUON_AXES[_module(path)]
        return optax.contrib.MuonDimensionNumbers(reduction, output)

    return jax.tree_util.tree_map_with_path(
        dims, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _module(path) -> str:
    """The module that owns a leaf ('q', 'up', ...): optax's init sees nnx Variables, whose
    paths end in 'value', its update plain arrays."""
    names = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
    return names[-3] if names[-1] == "value" else names[-2]


def _adamw(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=lambda params: decay_mask(params, cfg.decay_embeddings))


def _muon(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    """optax.contrib.muon on the hidden matrices, this file's AdamW on the rest.

    The split is ours, not optax.contrib.muon's own Adam branch: that one decays every leaf it
    holds (norms and biases too) and uses Nesterov momentum, so AdamW's leaves would not train
    as under optim.name='adamw'. Inside, Muon's Adam branch holds no leaf (a step count only)."""
    muon = optax.contrib.muon(
        lr, beta=cfg.muon_momentum, eps=cfg.eps, weight_decay=cfg.weight_decay,
        weight_decay_mask=lambda params: decay_mask(params, cfg.decay_embeddings),
        muon_weight_dimension_numbers=muon_dimension_numbers, consistent_rms=MUON_RMS)
    return _bare_masked_nodes(
        optax.partition({"muon": muon, "adamw": _adamw(cfg, lr)}, muon_labels))


def _bare_masked_nodes(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` whose state holds optax's MaskedNode (the leaves a partition's branch does not
    own) as itself, not wrapped in the parameter's nnx Variable: a MaskedNode has no array in
    it, so nnx.Optimizer could give it neither a shape nor a sharding."""

    def init(params):
        return jax.tree.map(
            lambda x: x.get_value() if isinstance(x, nnx.Variable)
            and isinstance(x.get_value(), optax.MaskedNode) else x,
            tx.init(params), is_leaf=lambda x: isinstance(x, nnx.Variable))

    return optax.GradientTransformationExtraArgs(init, tx.update)


def _adafactor(cfg: ml_collections.ConfigDict,
               lr: optax.Schedule) -> optax.GradientTransformation:
    """optax.adafactor with optax's defaults (update clipping at RMS 1, second-moment decay
    1 - t^-0.8, no momentum), but a learning rate in AdamW's units: no multiplying by each
    parameter's RMS (T5's relative step), and the decay inside -lr (u + wd p), as adamw has it
    (optax.adafactor alone adds wd p after the learning rate)."""
    factored = optax.adafactor(
        learning_rate=None, multiply_by_parameter_scale=False, weight_decay_rate=cfg.weight_decay,
        weight_decay_mask=lambda params: decay_mask(params, cfg.decay_embeddings))
    return optax.chain(_named_statistics(factored), optax.scale_by_learning_rate(lr,
                                                                                 flip_sign=False))


def _named_statistics(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` (Adafactor) whose second-moment statistics carry logical axis names that fit them.

    nnx.Optimizer gives every state leaf its parameter's names, but Adafactor's row and column
    statistics drop one axis of the parameter, and a factored parameter's `v` (or an unfactored
    one's v_row and v_col) is a [1] placeholder: those names would not fit their shapes, and the
    state could not be sharded at all. A statistic keeps the names of the axes it kept (so it
    is split as its parameter is, e.g. over 'fsdp'); a placeholder is replicated."""

    def init(params):
        factored, *rest = tx.init(params)  # optax.adafactor's chain: its FactoredState first

        def fit(stats):
            return jax.tree.map(_fitted_names, stats, params,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))

        return (factored._replace(v_row=fit(factored.v_row), v_col=fit(factored.v_col),
                                  v=fit(factored.v)), *rest)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def _fitted_names(stat, param):
    if not isinstance(stat, nnx.Variable):  # plain arrays (outside nnx): nothing to fit
        return stat
    names = stat.get_metadata().get("out_sharding")
    shape, full = tuple(stat.shape), tuple(param.shape)
    if names is None or shape == full:
        return stat
    for axis in range(len(full)):  # the axis a row or column statistic averaged over
        if full[:axis] + full[axis + 1:] == shape:
            return stat.replace(out_sharding=names[:axis] + names[axis + 1:])
    return stat.replace(out_sharding=None)  # a [1] placeholder: replicated


def make(cfg: ml_collections.ConfigDict, total_steps: int,
         lr_scales: dict[str, float] | None = None, lr_labels: Callable | None = None,
         decay_scales: dict[str, float] | None = None) -> optax.GradientTransformation:
    """clip -> optim.name's update -> schedule; `lr_scales` (label -> factor a, with
    `lr_labels(params)` naming each leaf's label) gives parameters their own learning rate and
    `decay_scales` (label -> b; default a) their own decoupled decay: -lr (a update + b wd p),
    as μP needs (lmjax/mup.py: b = a m on hidden matrices keeps their decay lr wd at any width,
    as mup's MuAdamW does; b = a is torch AdamW with per-group learning rates)."""
    lr = schedule(cfg, total_steps)
    if lr_scales is None:
        tx = _update(cfg, lr)
    else:
        tx = _per_label(cfg, lr, lr_scales, lr_labels, decay_scales or lr_scales)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


def _per_label(cfg: ml_collections.ConfigDict, lr: optax.Schedule, lr_scales: dict[str, float],
               lr_labels: Callable, decay_scales: dict[str, float]
               ) -> optax.GradientTransformation:
    """-lr (a u + b wd p): optim.name's update u without its decay, and the decoupled decay
    alone (the same mask and schedule), each times its leaf's label's factor."""
    bare_cfg = copy.deepcopy(cfg)
    bare_cfg.weight_decay = 0.0
    bare = _update(bare_cfg, lr)
    decay = optax.chain(optax.add_decayed_weights(
        cfg.weight_decay, mask=lambda params: decay_mask(params, cfg.decay_embeddings)),
        optax.scale_by_learning_rate(lr))

    def init(params):
        return bare.init(params), decay.init(params)

    def update(updates, state, params=None):
        step, bare_state = bare.update(updates, state[0], params)
        pull, decay_state = decay.update(jax.tree.map(jnp.zeros_like, updates), state[1], params)
        combine = lambda label, u, d: lr_scales[label] * u + decay_scales[label] * d  # noqa: E731
        return jax.tree.map(combine, lr_labels(updates), step, pull), (bare_state, decay_state)

    return optax.GradientTransformationExtraArgs(init, update)


def _update(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    """optim.name's update, decay and learning rate: -lr (u + wd p)."""
    if cfg.name == "adamw":
        tx = _adamw(cfg, lr)
    elif cfg.name == "muon":
        tx = _muon(cfg, lr)
    elif cfg.name == "lion":  # Chen et al. 2023 use b1=0.9, b2=0.99 (0.95, 0.98 for LMs)
        tx = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                        mask=lambda params: decay_mask(params, cfg.decay_embeddings))
    elif cfg.name == "adafactor":
        tx = _adafactor(cfg, lr)
    else:
        raise ValueError(f"optim.name={cfg.name!r} is unknown; choose one of {NAMES}.")
    return tx
