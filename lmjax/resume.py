"""Where a run continues from: its own workdir's checkpoints (a resume) or another workdir's
checkpoint at a step (a fork, `train.fork_from`), and the checks that keep both exact.

Either way the run carries on someone's training, so its config may differ only in keys that
leave the checkpoint's meaning intact (config.RESUMABLE), and its learning-rate schedule only
where every step already taken keeps its learning rate (config.SCHEDULE, optim.first_change).
That is what makes a resumed run with a larger train.steps the same as one planned that long
(a constant or WSD schedule before its cooldown), and a cooldown forked at step s the same as
a WSD run of its length: the fork takes the parent's weights, optimizer moments, step count and
data position, and trains s+1 .. train.steps in its own workdir (Hägele et al. 2024, "Scaling
Laws and Compute-Optimal Training Beyond Fixed Training Durations": one constant-LR run per
size, a cooldown branched at each token count). A fork resumes from its own checkpoints like
any run; the parent is only read, so it may be a finished run in a bucket or one still training.
"""

import json

import ml_collections
from flax import nnx

from lmjax import checkpoint, optim, paths
from lmjax import config as config_lib


def check(cfg: ml_collections.ConfigDict, workdir: str, tokenizer, force: bool) -> None:
    """Refuse a workdir written with another config, tokenizer or schedule, naming what
    differs; `force` (--force_resume) continues with a warning instead."""
    differ, root = [], paths.resolve(workdir)
    if (root / "config.json").exists():
        if not _is_run_config(root / "config.json"):
            raise ValueError(f"Workdir {workdir} holds a config.json that lmjax did not write; "
                             f"use another --workdir.")
        differ = config_lib.resume_conflicts(root / "config.json", cfg)
    saved_tokenizer = root / "tokenizer.model"
    if tokenizer is not None and saved_tokenizer.exists():
        if saved_tokenizer.read_bytes() != tokenizer.serialized():
            differ.append("tokenizer model file")
    done = _latest_step(root)
    if differ and not force and not done:
        print(f"warning: {workdir} holds the config of a run that saved no checkpoint "
              f"(different {', '.join(differ)}); starting it over with this one.")
        return
    if differ and not force:
        raise ValueError(f"Workdir {workdir} holds a run with a different {', '.join(differ)}; "
                         f"use another --workdir, or --force_resume to continue it anyway.")
    if differ:  # forced: the schedule is the user's to change too
        print(f"warning: continuing {workdir} with a different {', '.join(differ)}.")
        return
    change = done and optim.first_change(config_lib.from_workdir(root), cfg, done)
    if change and not force:
        step, before, now = change
        raise ValueError(
            f"Workdir {workdir} holds {done} steps of a run whose schedule this config changes "
            f"(step {step} took learning rate {before:.6g}, this config gives it {now:.6g}): "
            "only a constant schedule or WSD before its cooldown can grow (train.steps), so use "
            "another --workdir, fork a cooldown from it (train.fork_from), or --force_resume to "
            "continue on the new schedule anyway.")
    if change:
        print(f"warning: continuing {workdir} on a schedule that changes the learning rate of "
              f"steps it took (from step {change[0]}).")


def fork_step(cfg: ml_collections.ConfigDict) -> int:
    """train.fork_step, or (0) the step where this run's WSD cooldown begins: train.steps minus
    its length, so that the fork ends where a WSD run of train.steps ends."""
    if cfg.train.fork_step:
        return cfg.train.fork_step
    o = cfg.optim
    decay = optim.cooldown_length(o, cfg.train.steps) if o.schedule == "wsd" else 0
    if decay == 0:
        raise ValueError(f"train.fork_step=0 forks where the WSD cooldown begins, but "
                         f"optim.schedule={o.schedule!r} has no cooldown here; set "
                         "train.fork_step, or optim.schedule='wsd' with optim.cooldown_steps.")
    return cfg.train.steps - decay


def keeps(cfg: ml_collections.ConfigDict, step: int) -> bool:
    """Whether a run of `cfg` that finished still holds checkpoint `step`: a kept step, or a
    saved one (every checkpoint.every, and the last) among the newest checkpoint.max_to_keep."""
    steps, every = cfg.train.steps, cfg.checkpoint.every
    kept = checkpoint.keep_steps(cfg.checkpoint)
    saved = {*range(every, steps + 1, every), *kept, steps}
    newer = sum(s > step for s in saved if s <= steps)
    return step in kept or step in saved and newer < cfg.checkpoint.max_to_keep


def validate(cfg: ml_collections.ConfigDict) -> None:
    """A fork names one start: its parent's whole state, not init_from's weights too."""
    if cfg.train.fork_from and cfg.train.init_from:
        raise ValueError("Set train.fork_from or train.init_from, not both: a fork continues "
                         "its parent's whole state, init_from starts from its weights only.")
    if cfg.train.fork_from:
        fork_step(cfg)


def fork(cfg: ml_collections.ConfigDict, abstract_state: nnx.State, tokenizer,
         force: bool) -> tuple[nnx.State, dict, int]:
    """(state, data position, step) of train.fork_from's checkpoint at fork_step(cfg), laid
    out like `abstract_state`, after checking that this run continues the parent's: the same
    config but for RESUMABLE keys, the same tokenizer, and the same learning rate at every step
    the parent took before the fork (else refused unless `force`)."""
    parent, step = cfg.train.fork_from, fork_step(cfg)
    root = paths.resolve(parent)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"train.fork_from={parent!r} is not an lmjax workdir: it has no "
                                "config.json.")
    differ = config_lib.resume_conflicts(root / "config.json", cfg)
    saved_tokenizer = root / "tokenizer.model"
    if tokenizer is not None and saved_tokenizer.exists():
        if saved_tokenizer.read_bytes() != tokenizer.serialized():
            differ.append("tokenizer model file")
    if differ and not force:
        raise ValueError(f"train.fork_from={parent!r} is a run with a different "
                         f"{', '.join(differ)}; a fork continues its parent's run, or "
                         "--force_resume forks it anyway.")
    change = optim.first_change(config_lib.from_workdir(root), cfg, step)
    if change and not force:
        raise ValueError(
            f"train.fork_from={parent!r} took step {change[0]} at learning rate "
            f"{change[1]:.6g}, which this config's schedule makes {change[2]:.6g}: a fork keeps "
            f"its parent's schedule up to train.fork_step={step} (e.g. a constant-LR parent and "
            "optim.schedule='wsd'), or --force_resume forks it anyway.")
    if differ or change:
        print(f"warning: forking {parent} with a different "
              f"{', '.join(differ + (['schedule'] if change else []))}.")
    state, data_state = checkpoint.restore_from(parent, abstract_state, step)
    print(f"Forked {parent} at step {step}.")
    return state, data_state, step


def _is_run_config(path) -> bool:
    """Valid JSON with a run's groups (invalid JSON is resume_conflicts' to name)."""
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return True
    return isinstance(saved, dict) and {"model", "data", "optim", "train"} <= set(saved)


def _latest_step(root) -> int:
    """The newest step ever saved here, 0 if none (an unfinished save's folder is not a
    number); restore may fall back to an older one, whose steps a schedule check covers too."""
    folder = root / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=0)
