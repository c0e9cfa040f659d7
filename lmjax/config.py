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

from lmjax import attention, optim, sharding

CHOICES = {
    "model.mlp": ("swiglu", "gelu"),
    "model.norm": ("rms", "layer"),
    "model.position": ("rope", "learned", "sinusoidal", "none"),
    "model.attention": attention.IMPLEMENTATIONS,
    "model.remat": ("none", "full", "dots_saveable"),
    "data.source": ("text", "synthetic"),
    "mesh.rules": tuple(sharding.RULES),
    "optim.schedule": optim.SCHEDULES,
}


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py` or `path/to/file.py:arg`; overrides are `a.b=value` strings."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    cfg = _import(path).get_config(arg) if arg else _import(path).get_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Override {item!r} must look like key.subkey=value.")
        set_value(cfg, key, value)
    cfg.lock()
    return cfg


def _import(path: str):
    """Run a config file with its folder's parent on sys.path: `from configs import base` works."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    sys.path.insert(0, root)
    try:
        module_spec = importlib.util.spec_from_file_location(
            f"lmjax_config_{os.path.basename(path)[:-3]}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    return module


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


def save(cfg: ml_collections.ConfigDict, path: str) -> None:
    with open(path, "w") as f:
        f.write(cfg.to_json(indent=2, sort_keys=True) + "\n")


def from_json(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    cfg.lock()
    return cfg

