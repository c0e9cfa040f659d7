"""Load a run's config (`configs/x.py[:arg]` plus `a.b=value` overrides), save it, read it back.

Configs are Python files with `get_config(arg)` (big_vision style). Every default lives in
configs/base.py; a run file changes a few keys. This is the bottom layer: it imports nothing of
lmjax. Each module checks its own keys (`model.validate`, `sharding.validate`, ...) and
lmjax/validate.py runs them all, with the token and FLOP budgets, before anything is compiled.
"""

import ast
import difflib
import json
import os
import sys
import types

import ml_collections
from etils import epath  # local paths and gs:// alike (lmjax/paths.py; config imports no lmjax)


def configs_dir() -> str:
    """The configs/ that ships with lmjax: inside the package once pip-installed (setup.py maps
    it there), beside the package in a checkout or an editable install."""
    package = os.path.dirname(os.path.abspath(__file__))
    shipped = os.path.join(package, "configs")
    return shipped if os.path.isdir(shipped) else os.path.join(os.path.dirname(package), "configs")


BASE = os.path.join(configs_dir(), "base.py")  # every default, whichever folder a run's file is in


def find(path: str) -> str:
    """A config file: `path` itself (local or gs://...) if it is a file, else for
    `configs/x.py` the shipped copy (a user outside a checkout types the README's commands
    too)."""
    if epath.Path(path).is_file():
        return path
    folder, _, rest = os.path.normpath(path).partition(os.sep)
    if folder == "configs" and os.path.isfile(os.path.join(configs_dir(), rest)):
        return os.path.join(configs_dir(), rest)
    if epath.Path(path).is_dir():
        raise ValueError(f"Config {path!r} is a folder; name a config file in it "
                         "(--config=FOLDER/x.py[:arg]).")
    raise FileNotFoundError(f"Config file {path!r} does not exist.")


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py`, `path/to/file.py:arg` or a run's `config.json`, local or
    gs://...; overrides are `a.b=value` strings. Budgets are not applied here: validate.load
    does that."""
    scheme = spec[:spec.index("://") + 3] if "://" in spec else ""  # gs:// holds a ':' too
    path, _, arg = spec[len(scheme):].partition(":")
    path = find(scheme + path)
    if path.endswith(".json"):  # a workdir's config.json: finetune a converted or finished run
        cfg = _over_defaults(path)
    else:
        cfg = _from_file(path, arg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Override {item!r} must look like key.subkey=value.")
        set_value(cfg, key, value)
    cfg.lock()
    return cfg


def _from_file(path: str, arg: str) -> ml_collections.ConfigDict:
    """get_config(arg) of a config file, or one sentence saying why the file cannot give one."""
    try:
        module = import_file(path)
    except SyntaxError as e:
        raise ValueError(f"Config file {path!r} has a syntax error on line {e.lineno}: "
                         f"{e.msg}.") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"Config file {path!r} defines no get_config(arg=None) function.")
    cfg = get_config(arg) if arg else get_config()
    if isinstance(cfg, dict):
        cfg = ml_collections.ConfigDict(cfg)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(f"get_config() of config file {path!r} returned a "
                         f"{type(cfg).__name__}, not a ConfigDict or dict.")
    return cfg


def import_file(path: str):
    """A config file (local or gs://...) as a module (its get_config, a sweep's get_sweep), run
    with the folder that holds configs/ on sys.path so that `from configs import base` works.
    The source is read through epath and compiled under its own name, so a file in a bucket
    runs as a local one does and a syntax error names the file it is in."""
    code = compile(epath.Path(path).read_bytes(), path, "exec", dont_inherit=True)
    module = types.ModuleType(f"lmjax_config_{os.path.basename(path)[:-3]}")
    module.__file__ = path
    root = _root(path)
    sys.path.insert(0, root)
    try:
        exec(code, module.__dict__)
    finally:
        sys.path.remove(root)
    return module


def _root(path: str) -> str:
    """The nearest folder above `path` that holds configs/, so that configs/x.py and
    experiments/<study>/sweep.py alike can `from configs import base`; else (a file of the
    user's own anywhere, or in a bucket) the shipped configs/'s folder."""
    if "://" in path:
        return os.path.dirname(configs_dir())
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(os.path.join(folder, "configs")):
        if os.path.dirname(folder) == folder:
            return os.path.dirname(configs_dir())
        folder = os.path.dirname(folder)
    return folder


def set_value(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set `a.b.c` from a command-line string, parsed to the type the default already has."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parents + [leaf]):
        if not isinstance(node, ml_collections.ConfigDict):  # `seed.x`: seed holds a value
            raise KeyError(f"Unknown config key {dotted!r}: {'.'.join(parents[:depth])} is a "
                           f"value, not a group of keys.")
        if part not in node:
            known = [".".join(parents[:depth] + [k]) for k in node.keys()]
            guess = difflib.get_close_matches(dotted, known, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise KeyError(f"Unknown config key {dotted!r}{hint}.")
        if part != leaf:
            node = node[part]
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise ValueError(f"Config key {dotted!r} is a group of keys; set one of them "
                         f"({dotted}.{next(iter(old.keys()), 'KEY')}=...).")
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


def check_choices(cfg: ml_collections.ConfigDict, choices: dict[str, tuple]) -> None:
    """Raise ValueError naming the first dotted key whose value is not among its choices: each
    module's validate passes the tuples that live next to the code that reads the key."""
    for key, allowed in choices.items():
        value = cfg
        for part in key.split("."):  # 'a.b', or deeper ('model.moe.score')
            value = value[part]
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {allowed}.")


# Keys older workdirs hold that no longer change anything: read and dropped.
RETIRED = {"model": ("weight_grad",)}  # a CPU matmul layout, now lmjax/backends/cpu.py's choice


# Keys a resumed run may change: cadences, layout, kernels, loggers. Everything else (model,
# data, optimizer, seed) changes what the checkpoint means, so resuming with it is refused
# unless forced; SCHEDULE's keys may change only where train checks that the learning rate of
# every step already taken stays the same.
RESUMABLE = ("train.log_every",
             "train.eval_every", "train.eval_batches", "train.grad_accum", "train.on_nonfinite",
             "train.spike_factor", "train.init_from", "train.fork_from", "train.fork_step",
             "checkpoint.",
             "mesh.", "model.attention", "model.remat", "profile.",
             "train.compilation_cache_dir", "train.lease_timeout", "train.loggers",
             "train.wandb_project", "train.wandb_entity", "data.read_threads",
             "data.prefetch", "data.worker_count")


# Keys that shape the learning-rate schedule: a resume (or a fork, train.fork_from) may change
# them when the steps already taken keep their learning rates (train: optim.first_change), e.g.
# a longer constant or WSD run before its cooldown, or a cooldown started in place.
SCHEDULE = ("train.steps", "train.tokens_budget", "train.flops_budget", "optim.schedule",
            "optim.end_lr_fraction", "optim.wsd_decay_fraction", "optim.cooldown_steps",
            "optim.cooldown_shape")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_conflicts(saved_path: str | os.PathLike, cfg: ml_collections.ConfigDict
                     ) -> list[str]:
    """The keys (sorted) whose value differs between a workdir's config.json and `cfg`, leaving
    out those in RESUMABLE and SCHEDULE (the schedule is compared by its values). A key the
    workdir lacks (lmjax gained it later) reads its default of configs/base.py, as
    from_workdir reads it, so a new key at its default resumes an old run; a key only the
    workdir has counts as differing."""
    try:
        saved = _flat(json.loads(epath.Path(saved_path).read_text()))
    except json.JSONDecodeError:
        raise ValueError(f"{saved_path} is not valid JSON; it is not a workdir lmjax wrote "
                         f"(use another --workdir).") from None
    new = _flat(json.loads(cfg.to_json()))
    defaults = {**_flat(json.loads(load(BASE).to_json())),
                "model.scan_layers": False}  # written before scan: unrolled checkpoints
    saved = {**{k: defaults[k] for k in new.keys() - saved.keys() if k in defaults}, **saved}
    retired = {f"{group}.{key}" for group, keys in RETIRED.items() for key in keys}
    return sorted(k for k in saved.keys() | new.keys()
                  if saved.get(k, "<absent>") != new.get(k, "<absent>")
                  and not resumable(k) and k not in SCHEDULE and k not in retired)


def resumable(key: str) -> bool:
    """RESUMABLE entries ending in '.' are groups; the others are exact keys (so
    'model.attention' does not also free 'model.attention_window')."""
    return any(key.startswith(r) if r.endswith(".") else key == r for r in RESUMABLE)


def save(cfg: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    """Written whole in one call: on gs:// an object appears complete or not at all."""
    epath.Path(path).write_text(cfg.to_json(indent=2, sort_keys=True) + "\n")


def from_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """A saved config, locked; one sentence naming the file if it is not one (a run killed
    mid-write on a disk without atomic writes, or a file of something else)."""
    try:
        tree = json.loads(epath.Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is truncated or was not written "
                         "by lmjax.") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path} holds a JSON {type(tree).__name__}, not the object of a "
                         "config lmjax wrote.")
    cfg = ml_collections.ConfigDict(tree)
    cfg.lock()
    return cfg


def from_workdir(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """A run's config.json (from_json) laid over configs/base.py, locked: keys lmjax gained
    after the run was written read their defaults, so eval, sample and convert keep reading
    old workdirs."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not an lmjax workdir: it has no config.json.")
    return _over_defaults(path)


def _over_defaults(path: str | os.PathLike) -> ml_collections.ConfigDict:
    cfg, saved = load(BASE), from_json(path).to_dict()
    for group, keys in RETIRED.items():
        for key in keys:
            saved.get(group, {}).pop(key, None)
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
