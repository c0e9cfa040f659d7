"""`lmjax sweep`: run every member of a sweep as its own `lmjax train`, in its own workdir.

A sweep file is a config file (`get_config(arg)`, the base of every member) that also has
`get_sweep()`: a list of `{'a.b': value}` override dicts, one per member (big_vision's
get_hyper, kept next to the config it changes), or a dict `{name: overrides}` to name them.
A member trains in `<root>/<name>` (a list's names are made from the overrides) with the exact
command a person would type, so any member can be rerun or debugged by hand.

Re-running is always safe: a member whose final checkpoint exists is skipped without starting
a process, and an unfinished one is resumed by `lmjax train` from its last checkpoint.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

from lmjax import config as config_lib
from lmjax import validate


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    overrides: dict  # {'a.b': value}
    steps: int  # train.steps after budgets: what "finished" means


def _text(value) -> str:
    """A value as `--config.a.b=` parses it back (config.set_value)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _name(overrides: dict) -> str:
    name = ",".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else
                    f"{k.split('.')[-1]}={_text(v)}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name) or "base"


def load(path: str) -> list[Member]:
    """The members of a sweep file, each config loaded (so a bad key fails here, naming the
    member, before anything trains)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Sweep file {path!r} does not exist.")
    module = config_lib.import_file(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"Sweep file {path!r} has no get_sweep() returning override dicts.")
    sweep = module.get_sweep()
    named = sweep.items() if isinstance(sweep, dict) else [(_name(o), o) for o in sweep]
    members = []
    for name, overrides in named:
        try:
            cfg = validate.load(path, [f"{k}={_text(v)}" for k, v in overrides.items()])
        except (KeyError, ValueError) as e:
            message = e.args[0] if e.args else e
            raise ValueError(f"Sweep member {name}: {message}") from None
        members.append(Member(name, dict(overrides), cfg.train.steps))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Sweep members {twice} appear more than once in get_sweep().")
    return members


def is_finished(workdir: str, steps: int) -> bool:
    """The final step's checkpoint exists (Orbax renames a step's folder into place only once
    it is written whole, and `train` saves the last step after logging it)."""
    return os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))


def train_command(path: str, workdir: str, member: Member) -> list[str]:
    return [sys.executable, "-m", "lmjax", "train", f"--config={path}", f"--workdir={workdir}",
            *[f"--config.{k}={_text(v)}" for k, v in member.overrides.items()]]


def tpu_command(path: str, workdir: str, member: Member, tpu: str) -> list[str]:
    """The member handed to launch/tpu_pod.py, which runs the command on every host of `tpu`
    (`--worker=all`); the workdir should be a gs:// path every host can reach."""
    train = ["lmjax", "train", f"--config={path}", f"--workdir={workdir}",
             *[f"--config.{k}={_text(v)}" for k, v in member.overrides.items()]]
    return [sys.executable, "launch/tpu_pod.py", f"--tpu={tpu}", "--", *train]


def _shell(command: list[str]) -> str:
    return " ".join(c if re.fullmatch(r"[\w./=:,+@-]+", c) else repr(c) for c in command)


def _final_loss(workdir: str) -> str:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [row["eval/loss"] for row in map(json.loads, f) if "eval/loss" in row]
    return f", eval/loss {evals[-1]:.4f}" if evals else ""


def run_local(path: str, root: str, parallel: int = 1, dry_run: bool = False,
              env: dict | None = None, log=print) -> dict[str, str]:
    """Train every unfinished member, `parallel` at a time; returns {name: status}, status one
    of 'skipped' (already finished), 'done', 'failed'. Each member's output goes to its
    workdir's train.log. SIGTERM or Ctrl-C stops the running members (they resume next time)."""
    if parallel < 1:
        raise ValueError(f"--parallel={parallel} must be at least 1.")
    members = load(path)
    status = {m.name: "skipped" for m in members
              if is_finished(os.path.join(root, m.name), m.steps)}
    queue = [m for m in members if m.name not in status]
    log(f"sweep {path}: {len(members)} members, {len(status)} finished, {len(queue)} to train")
    if dry_run:
        for m in queue:
            log(_shell(train_command(path, os.path.join(root, m.name), m)))
        return status
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # -> KeyboardInterrupt
    try:
        while queue or running:
            while queue and len(running) < parallel:
                m = queue.pop(0)
                workdir = os.path.join(root, m.name)
                os.makedirs(workdir, exist_ok=True)
                with open(os.path.join(workdir, "train.log"), "a") as out:
                    proc = subprocess.Popen(train_command(path, workdir, m), stdout=out,
                                            stderr=subprocess.STDOUT, env=env)
                running[m.name] = (proc, time.perf_counter())
                log(f"  start {m.name}")
            time.sleep(0.2)
            for name, (proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                status[name] = "done" if proc.returncode == 0 else "failed"
                workdir = os.path.join(root, name)
                detail = (_final_loss(workdir) if proc.returncode == 0 else
                          f", exit {proc.returncode}: see {os.path.join(workdir, 'train.log')}")
                finished = sum(s != "failed" for s in status.values())
                log(f"  [{finished}/{len(members)} finished, {len(running)} running] "
                    f"{status[name]} {name} in {time.perf_counter() - start:.0f}s{detail}")
    except KeyboardInterrupt:  # the CLI prints this one line; no traceback for a normal stop
        stopped = ", ".join(running) or "none"
        raise KeyboardInterrupt(f"interrupted; stopped {stopped} (each resumes from its last "
                                "checkpoint): re-run the same command to finish.") from None
    finally:
        for proc, _ in running.values():  # interrupted: stop members, they resume next time
            proc.terminate()
        for proc, _ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        signal.signal(signal.SIGTERM, previous)
    return status


def run_tpu(path: str, root: str, tpu: str, dry_run: bool = False, log=print) -> dict[str, str]:
    """Hand each unfinished member to launch/tpu_pod.py, one after another (a pod trains one
    member at a time). `root` must be visible from the pod (gs://) for skips to be seen."""
    members = load(path)
    status = {m.name: "skipped" for m in members
              if is_finished(os.path.join(root, m.name), m.steps)}
    for m in members:
        if m.name in status:
            continue
        command = tpu_command(path, os.path.join(root, m.name), m, tpu)
        log(_shell(command))
        if dry_run:
            continue
        if not os.path.isfile("launch/tpu_pod.py"):
            raise FileNotFoundError("launch/tpu_pod.py does not exist; run from the repository "
                                    "root (or use --dry_run to print the commands).")
        status[m.name] = "done" if subprocess.run(command).returncode == 0 else "failed"
    return status
