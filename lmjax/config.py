"""Load a run's config (`configs/x.py[:arg]` plus `a.b=value` overrides), validate it, save it.

Configs are Python files with `get_config(arg)` (big_vision style). Every default lives in
configs/base.py; a run file changes a few keys. Validation runs before anything is compiled, so
a bad key or an impossible mesh costs a second, not a compile, and says what to change.
"""

import ast
import difflib
import importlib.util
import json
import os
import sys

import jax.numpy as jnp
import ml_collections

from lmjax import attention, flops, model, optim, rope_scaling, sharding

CHOICES = {
    "model.mlp": ("swiglu", "gelu"),
    "model.norm": ("rms", "layer"),
    "model.position": ("rope", "learned", "sinusoidal", "none"),
    "model.rope_scaling": rope_scaling.SCALINGS,
    "model.attention": attention.IMPLEMENTATIONS,
    "model.remat": ("none", "full", "dots_saveable", "offload"),
    "model.weight_grad": model.WEIGHT_GRADS,
    "model.parametrization": ("sp", "mup"),
    "data.source": ("text", "tfds", "synthetic"),
    "mesh.rules": tuple(sharding.RULES),
    "optim.schedule": optim.SCHEDULES,
    "train.on_nonfinite": ("stop", "skip"),
    "train.flops_convention": flops.CONVENTIONS,
}


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py`, `path/to/file.py:arg` or a run's `config.json`; overrides
    are `a.b=value` strings."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    if path.endswith(".json"):  # a workdir's config.json: finetune a converted or finished run
        cfg = _over_defaults(path)
    else:
        cfg = import_file(path).get_config(arg) if arg else import_file(path).get_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Override {item!r} must look like key.subkey=value.")
        set_value(cfg, key, value)
    apply_budget(cfg)
    cfg.lock()
    return cfg


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


def import_file(path: str):
    """A config file as a module (its get_config, a sweep's get_sweep), run with the folder that
    holds configs/ on sys.path so that `from configs import base` works."""
    root = _root(path)
    sys.path.insert(0, root)
    try:
        module_spec = importlib.util.spec_from_file_location(
            f"lmjax_config_{os.path.basename(path)[:-3]}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    return module


def _root(path: str) -> str:
    """The nearest folder above `path` that holds configs/, so that configs/x.py and
    experiments/<study>/sweep.py alike can `from configs import base`; else its grandparent."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(os.path.join(folder, "configs")):
        if os.path.dirname(folder) == folder:
            return os.path.dirname(os.path.dirname(os.path.abspath(path)))
        folder = os.path.dirname(folder)
    return folder


def set_value(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set `a.b.c` from a command-line string, parsed to the type the default already has."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parents + [leaf]):
        if part not in node:
            known = [".".join(parents[:depth] + [k]) for k in node.keys()]
            guess = difflib.get_close_matches(dotted, known, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise KeyError(f"Unknown config key {dotted!r}{hint}.")
        if part != leaf:
            node = node[part]
    old = node[leaf]
    node[leaf] = _parse(dotted, old, text)


def _parse(key: str, old, text: str):
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, str):
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(
            f"Config key {key!r} expects a {type(old).__name__}, got {text!r}.") from None


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Raise ValueError naming the first impossible setting; return the mesh shape."""
    for key, allowed in CHOICES.items():
        group, name = key.split(".")
        if cfg[group][name] not in allowed:
            raise ValueError(f"{key}={cfg[group][name]!r} is not one of {allowed}.")
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    for key in ("model.param_dtype", "model.dtype"):
        try:
            jnp.dtype(cfg.model[key.split(".")[1]])
        except TypeError:
            raise ValueError(f"{key}={cfg.model[key.split('.')[1]]!r} is not a dtype.") from None
    positive = {"model.vocab_size": m.vocab_size, "model.d_model": m.d_model,
                "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
                "model.num_kv_heads": m.num_kv_heads, "model.head_dim": m.head_dim,
                "model.mlp_dim": m.mlp_dim, "data.seq_len": d.seq_len,
                "model.mup_base_width": m.mup_base_width,
                "model.mup_base_head_dim": m.mup_base_head_dim,
                "data.global_batch_size": d.global_batch_size, "train.steps": t.steps,
                "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                "checkpoint.every": cfg.checkpoint.every}
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key}={value} must be at least 1.")
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"model.num_heads={m.num_heads} is not divisible by "
                         f"model.num_kv_heads={m.num_kv_heads}.")
    if m.position == "rope" and m.head_dim % 2:
        raise ValueError(f"model.head_dim={m.head_dim} must be even for rotary positions.")
    if m.position in ("learned", "sinusoidal") and d.seq_len > m.max_len:
        raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}.")
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"model.dropout={m.dropout} must be in [0, 1).")
    _validate_long_context(m, d)
    if cfg.profile.start_step < 1 or cfg.profile.num_steps < 0:
        raise ValueError(f"profile.start_step={cfg.profile.start_step} must be at least 1 and "
                         f"profile.num_steps={cfg.profile.num_steps} at least 0 (0 = off).")
    if t.spike_factor and t.spike_factor <= 1.0:
        raise ValueError(f"train.spike_factor={t.spike_factor} must be above 1 (or 0 = off).")
    if d.mixture:  # the weights and names; the files are checked when the data is built
        from lmjax.data import mixture

        if d.source != "text":
            raise ValueError(f"data.mixture mixes local texts; it needs data.source='text', "
                             f"not {d.source!r}.")
        mixture.parse(d.mixture)
    steps = budget_steps(cfg)
    if steps is not None and steps != t.steps:
        raise ValueError(f"train.steps={t.steps} disagrees with the budget, which gives {steps} "
                         "steps; call config.apply_budget(cfg) (config.load does).")
    if o.warmup_steps > t.steps:
        raise ValueError(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}.")

    shape = sharding.mesh_shape(cfg, num_devices)
    sizes = dict(zip(sharding.AXES, shape, strict=True))
    if cfg.mesh.rules == "fsdp_tp":
        for key in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
            if m[key] % sizes["tensor"]:
                raise ValueError(f"model.{key}={m[key]} is not divisible by the tensor axis "
                                 f"(mesh.tensor={sizes['tensor']}).")
    if cfg.mesh.rules in ("fsdp", "fsdp_tp") and m.d_model % sizes["fsdp"]:
        raise ValueError(f"model.d_model={m.d_model} is not divisible by the fsdp axis "
                         f"(mesh.fsdp={sizes['fsdp']}).")
    if m.attention == "ring" and sizes["seq"] < 2:
        raise ValueError("model.attention='ring' needs a sequence axis to pass keys round: set "
                         "mesh.seq (x mesh.dcn_seq) to 2 or more.")
    if d.seq_len % sizes["seq"]:
        raise ValueError(f"data.seq_len={d.seq_len} is not divisible by the seq axis "
                         f"(mesh.seq x mesh.dcn_seq = {sizes['seq']}).")
    batch_ways = sizes["data"] * sizes["fsdp"]
    if d.global_batch_size % t.grad_accum:
        raise ValueError(f"data.global_batch_size={d.global_batch_size} is not divisible by "
                         f"train.grad_accum={t.grad_accum}.")
    micro = d.global_batch_size // t.grad_accum
    if micro % batch_ways:
        raise ValueError(f"The micro-batch of {micro} sequences (data.global_batch_size / "
                         f"train.grad_accum) is not divisible by the {batch_ways} data-parallel "
                         f"devices (mesh.data x mesh.fsdp).")
    return shape


def _validate_long_context(m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> None:
    """Strided evaluation, sliding window and RoPE scaling. A window longer than data.seq_len is
    refused rather than ignored: no query could reach past it, so it would silently be full
    attention (a window equal to it is allowed: it takes effect when evaluated at longer
    contexts)."""
    if not 0 <= d.eval_stride <= d.seq_len:
        raise ValueError(f"data.eval_stride={d.eval_stride} must be between 1 and the context "
                         f"data.seq_len={d.seq_len} (0: non-overlapping windows, = seq_len).")
    if m.attention_window < 0:
        raise ValueError(f"model.attention_window={m.attention_window} must be >= 0 (0 = full "
                         "attention).")
    if m.attention_window > d.seq_len:
        raise ValueError(f"model.attention_window={m.attention_window} is larger than the "
                         f"context data.seq_len={d.seq_len}, where it would change nothing; "
                         f"use a window <= {d.seq_len}, or 0 for full attention.")
    if m.rope_scaling == "none":
        return
    if m.position != "rope":
        raise ValueError(f"model.rope_scaling={m.rope_scaling!r} needs model.position='rope', "
                         f"not {m.position!r}.")
    if m.rope_scaling_factor < 1.0:
        raise ValueError(f"model.rope_scaling_factor={m.rope_scaling_factor} must be >= 1 (the "
                         "new context over the trained one).")
    if m.rope_scaling == "yarn" and m.rope_original_max_len < 1:
        raise ValueError("model.rope_scaling='yarn' needs model.rope_original_max_len, the "
                         "context the model was trained at.")
    if m.rope_scaling == "yarn" and not 0 < m.rope_yarn_alpha < m.rope_yarn_beta:
        raise ValueError(f"model.rope_yarn_alpha={m.rope_yarn_alpha} and rope_yarn_beta="
                         f"{m.rope_yarn_beta} must satisfy 0 < alpha < beta.")


# Keys a resumed run may change: lengths, cadences, layout and kernels. Everything else
# (model, data, optimizer, seed) changes what the checkpoint means, so resuming with it is
# refused unless forced. train.steps may grow: the schedule is recomputed for the new length.
RESUMABLE = ("train.steps", "train.tokens_budget", "train.flops_budget", "train.log_every",
             "train.eval_every", "train.eval_batches", "train.grad_accum", "train.on_nonfinite",
             "train.spike_factor", "train.init_from", "checkpoint.",
             "mesh.", "model.attention", "model.remat", "model.weight_grad", "profile.",
             "train.compilation_cache_dir", "data.read_threads", "data.prefetch",
             "data.worker_count")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_conflicts(saved_path: str, cfg: ml_collections.ConfigDict) -> list[str]:
    """The keys (sorted) whose value differs between a workdir's config.json and `cfg`, leaving
    out those in RESUMABLE; a key present on one side only counts as differing."""
    try:
        with open(saved_path) as f:
            saved = _flat(json.load(f))
    except json.JSONDecodeError:
        raise ValueError(f"{saved_path} is not valid JSON; it is not a workdir lmjax wrote "
                         f"(use another --workdir).") from None
    new = _flat(json.loads(cfg.to_json()))
    return sorted(k for k in saved.keys() | new.keys()
                  if saved.get(k, "<absent>") != new.get(k, "<absent>")
                  and not resumable(k))


def resumable(key: str) -> bool:
    """RESUMABLE entries ending in '.' are groups; the others are exact keys (so
    'model.attention' does not also free 'model.attention_window')."""
    return any(key.startswith(r) if r.endswith(".") else key == r for r in RESUMABLE)


def save(cfg: ml_collections.ConfigDict, path: str) -> None:
    with open(path, "w") as f:
        f.write(cfg.to_json(indent=2, sort_keys=True) + "\n")


def from_json(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    cfg.lock()
    return cfg



# configs/ of the checkout this package was imported from: base.py holds every default.
BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "configs", "base.py")


def from_workdir(workdir: str) -> ml_collections.ConfigDict:
    """A run's config.json (from_json) laid over configs/base.py, locked: keys lmjax gained
    after the run was written read their defaults, so eval, sample and convert keep reading
    old workdirs."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not an lmjax workdir: it has no config.json.")
    return _over_defaults(path)


def _over_defaults(path: str) -> ml_collections.ConfigDict:
    cfg, saved = load(BASE), from_json(path).to_dict()
    unknown = [group for group in saved if group not in cfg]
    unknown += [f"{group}.{key}" for group, value in saved.items()
                if group in cfg and isinstance(value, dict) for key in value
                if key not in cfg[group]]
    if unknown:
        raise ValueError(f"{path} has key {unknown[0]!r}, which this lmjax does not know (it "
                         "was written by another version).")
    cfg.update(saved)
    if "scan_layers" not in saved.get("model", {}):  # written before scan: unrolled checkpoints
        cfg.model.scan_layers = False
    return cfg
