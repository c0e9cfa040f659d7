"""`lmjax sweep`: run every member of a sweep as its own `lmjax train`, in its own workdir.

A sweep file is a config file (`get_config(arg)`, the base of every member) that also has
`get_sweep()`: a list of `{'a.b': value}` override dicts, one per member (big_vision's
get_hyper, kept next to the config it changes), or a dict `{name: overrides}` to name them.
A member trains in `<root>/<name>` (a list's names are made from the overrides) with the exact
command a person would type, so any member can be rerun or debugged by hand.

Re-running is always safe: a member whose final checkpoint exists is skipped without starting
a process, and an unfinished one is resumed by `lmjax train` from its last checkpoint. A member
preempted on its own (exit 75, its step saved) is put back at the head of the queue.

The root may be a URL (gs://BUCKET/sweep, what a TPU pod's hosts share): every workdir is read
through lmjax/paths.py and handed to `lmjax train` as the URL itself.

A member whose `train.fork_from` names another member forks that member's workdir (Hägele et
al. 2024: one constant-LR trunk per size, a WSD cooldown branched at each token count;
`cooldowns` writes such members). It starts once its parent holds the step it forks, and
loading the sweep refuses a fork whose parent would not keep that step.
"""

import collections
import contextlib
import copy
import dataclasses
import json
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ml_collections
from etils import epath

from lmjax import checkpoint, distributed, paths, resume, validate
from lmjax import config as config_lib
from lmjax.scaling import collect

MAX_RESTARTS = 3  # a member preempted (exit 75: saved, stopped) more often than this fails


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    overrides: dict  # {'a.b': value}
    steps: int  # train.steps after budgets: what "finished" means
    parent: str = ""  # the member whose workdir train.fork_from names
    fork_step: int = 0  # the parent's step it forks


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
    if not paths.resolve(path).is_file():
        raise FileNotFoundError(f"Sweep file {path!r} does not exist.")
    try:
        module = config_lib.import_file(path)
    except SyntaxError as e:
        raise ValueError(f"Sweep file {path!r} has a syntax error on line {e.lineno}: "
                         f"{e.msg}.") from None
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"Sweep file {path!r} has no get_sweep() returning override dicts.")
    sweep = module.get_sweep()
    given = list(sweep.values()) if isinstance(sweep, dict) else sweep
    if not (isinstance(given, list | tuple) and given and all(isinstance(o, dict) for o in given)):
        raise ValueError(f"Sweep file {path!r}: get_sweep() must return a non-empty list of "
                         "{'a.b': value} dicts, or a dict {name: such a dict}.")
    named = sweep.items() if isinstance(sweep, dict) else [(_name(o), o) for o in sweep]
    members, cfgs = [], {}
    for name, overrides in named:
        if not re.fullmatch(r"[\w.=,+-]+", str(name)) or name in (".", ".."):
            raise ValueError(f"Sweep member name {name!r} is not a folder name (letters, "
                             "digits and _.=,+- only).")
        try:
            cfg = validate.load(path, [f"{k}={_text(v)}" for k, v in overrides.items()])
        except (KeyError, ValueError) as e:
            message = e.args[0] if e.args else e
            raise ValueError(f"Sweep member {name}: {message}") from None
        members.append(Member(name, dict(overrides), cfg.train.steps))
        cfgs[name] = cfg
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Sweep members {twice} appear more than once in get_sweep().")
    return [_with_parent(m, cfgs) for m in members]


def _with_parent(member: Member, cfgs: dict) -> Member:
    """`member` with the sibling it forks, refused (naming both) if that one would not keep
    the step: its checkpoints are deleted as it trains on (checkpoint.max_to_keep)."""
    parent = member.overrides.get("train.fork_from", "")
    if parent not in cfgs:
        return member
    step, kept = resume.fork_step(cfgs[member.name]), cfgs[parent]
    if not resume.keeps(kept, step):
        raise ValueError(f"Sweep member {member.name} forks {parent} at step {step}, which "
                         f"{parent} does not keep (train.steps={kept.train.steps}, "
                         f"checkpoint.every={kept.checkpoint.every}, max_to_keep="
                         f"{kept.checkpoint.max_to_keep}); add it to {parent}'s "
                         "checkpoint.keep_steps.")
    return dataclasses.replace(member, parent=parent, fork_step=step)


def cooldowns(cfg: ml_collections.ConfigDict, trunks: dict[str, dict], budgets: list[float],
              key: str = "train.tokens_budget", fraction: float = 0.2,
              shape: str = "1-sqrt") -> dict[str, dict]:
    """get_sweep()'s members for WSD scaling laws from one run per size (Hägele et al. 2024):
    each of `trunks` ({name: overrides of `cfg`, the sweep's get_config()}) trains at constant
    LR after warmup, and for each of `budgets` (values of `key`) a member forks it where a WSD
    run of that budget starts its cooldown (the last `fraction` of the steps after warmup,
    shaped `shape`), so that it ends as that WSD run would. The trunk trains to the last fork
    and keeps every forked step (checkpoint.keep_steps); only the forks are fit points."""
    members = {}
    for name, overrides in trunks.items():
        forks = {}
        for budget in budgets:
            fork = {**overrides, key: budget, "optim.schedule": "wsd", "optim.cooldown_steps": 0,
                    "optim.wsd_decay_fraction": fraction, "optim.cooldown_shape": shape,
                    "train.fork_from": name}
            branch = copy.deepcopy(cfg)
            for k, v in fork.items():
                config_lib.set_value(branch, k, _text(v))
            validate.apply_budget(branch)
            forks[f"{name},{_name({key: budget})}"] = fork, resume.fork_step(branch)
        steps = sorted({step for _, step in forks.values()})
        members[name] = {**overrides, "optim.schedule": "constant", "train.tokens_budget": 0.0,
                         "train.flops_budget": 0.0, "train.steps": steps[-1],
                         "checkpoint.keep_steps": ",".join(map(str, steps))}
        members.update({fork_name: fork for fork_name, (fork, _) in forks.items()})
    return members


def workdir_of(root: str, name: str) -> str:
    """A member's workdir: a URL kept whole (gs://b/sweep/name), a local path made absolute."""
    return str(paths.resolve(root) / name)


def is_finished(workdir: str, steps: int) -> bool:
    """The final step's checkpoint is complete (`train` saves the last step after logging
    it)."""
    return checkpoint.is_complete(workdir, steps)


def _overrides(workdir: str, member: Member) -> list[str]:
    """The member's --config flags; a parent member named by train.fork_from becomes its
    workdir, the sibling of `workdir`."""
    given = dict(member.overrides)
    if member.parent:
        given["train.fork_from"] = str(paths.resolve(workdir).parent / member.parent)
    return [f"--config.{k}={_text(v)}" for k, v in given.items()]


def train_command(path: str, workdir: str, member: Member) -> list[str]:
    return [sys.executable, "-m", "lmjax", "train", f"--config={path}", f"--workdir={workdir}",
            *_overrides(workdir, member)]


def tpu_command(path: str, workdir: str, member: Member, tpu: str,
                pod_flags: tuple[str, ...] = ()) -> list[str]:
    """The member handed to launch/tpu_pod.py (with `pod_flags`), which runs the command on
    every host of `tpu` (`--worker=all`); the workdir should be a gs:// path every host can
    reach."""
    train = ["lmjax", "train", f"--config={path}", f"--workdir={workdir}",
             *_overrides(workdir, member)]
    return [sys.executable, "launch/tpu_pod.py", f"--tpu={tpu}", *pod_flags, "--", *train]


def _shell(command: list[str]) -> str:
    return " ".join(c if re.fullmatch(r"[\w./=:,+@-]+", c) else repr(c) for c in command)


def _final_loss(workdir: str) -> str:
    if not (paths.resolve(workdir) / "metrics.jsonl").is_file():
        return ""
    evals = [row["eval/loss"] for row in collect.read_rows(workdir) if "eval/loss" in row]
    return f", eval/loss {evals[-1]:.4f}" if evals else ""


def _log_file(workdir: epath.Path, local_logs: pathlib.Path | None) -> epath.Path:
    """Where a member's output goes: locally its workdir's train.log, appended as it runs (tail
    -f works). An object store has no append, so for a URL root a local file, started with what
    earlier attempts left in train.log, that _upload_log writes back whole when the member
    ends or is stopped."""
    if local_logs is None:
        return workdir / "train.log"
    local, remote = epath.Path(local_logs) / f"{workdir.name}.log", workdir / "train.log"
    local.write_bytes(remote.read_bytes() if remote.exists() else b"")
    return local


def _upload_log(workdir: epath.Path, local_logs: pathlib.Path | None) -> None:
    if local_logs is not None:
        (workdir / "train.log").write_bytes((local_logs / f"{workdir.name}.log").read_bytes())


def _ready(root: str, member: Member) -> bool:
    """A fork of a sibling may start once that one's checkpoint at its fork step is whole."""
    return not member.parent or checkpoint.is_complete(workdir_of(root, member.parent),
                                                       member.fork_step)


def run_local(path: str, root: str, parallel: int = 1, dry_run: bool = False,
              env: dict | None = None, log=print) -> dict[str, str]:
    """Train every unfinished member, `parallel` at a time, here; see `run_slots`."""
    if parallel < 1:
        raise ValueError(f"--parallel={parallel} must be at least 1.")
    return run_slots(path, root, [f"local-{i}" for i in range(parallel)],
                     lambda m, workdir, slot: train_command(path, workdir, m), dry_run, env, log)


def run_tpu(path: str, root: str, pool: str, dry_run: bool = False, log=print, count: int = 0,
            pod_flags: str = "") -> dict[str, str]:
    """Train every unfinished member on a pool of TPU slices, each slice busy with one member
    at a time through launch/tpu_pod.py, which sees its member through preemptions of its
    slice. `root` must be visible from the pods (gs://). The pool: `pool`'s comma-separated
    slices, which exist; or with `count`, slices POOL-0 .. POOL-(count-1) that the members'
    launches create as `pod_flags` say (--accelerator, --spot, --queued, --zone, ...), keep
    for the next member, and that are deleted when the sweep ends, however it ends."""
    slices = [name for name in pool.split(",") if name]
    if not slices:
        raise ValueError("--runner=tpu needs --tpu=NAME[,NAME...]: the slices to train on.")
    if count and len(slices) > 1:
        raise ValueError(f"--tpu_count={count} names its slices NAME-0 .. NAME-{count - 1}: give "
                         f"one --tpu=NAME, not {len(slices)}.")
    if count < 0:
        raise ValueError(f"--tpu_count={count} must be at least 1 (0: --tpu names the slices).")
    flags = tuple(shlex.split(pod_flags))
    made = ("--create", "--reuse", *flags) if count else flags
    slices = [f"{slices[0]}-{i}" for i in range(count)] if count else slices
    if not dry_run and not pathlib.Path("launch/tpu_pod.py").is_file():  # this checkout's
        raise FileNotFoundError("launch/tpu_pod.py does not exist; run from the repository "
                                "root (or use --dry_run to print the commands).")
    if not paths.is_url(path):  # the hosts get this checkout (the cwd), unpacked elsewhere
        inside = pathlib.Path(path).resolve()
        if not inside.is_relative_to(pathlib.Path.cwd()):
            raise ValueError(f"--sweep={path} is outside this checkout, which is all the TPU "
                             f"hosts receive: move it inside, or onto gs://.")
        path = str(inside.relative_to(pathlib.Path.cwd()))
    try:
        return run_slots(path, root, slices,
                         lambda m, workdir, slot: tpu_command(path, workdir, m, slot, made),
                         dry_run, None, log)
    finally:
        for slot in slices if count else []:  # what the pool made, made or not: idle TPUs cost
            deleting = [sys.executable, "launch/tpu_pod.py", f"--tpu={slot}", *flags, "--delete",
                        "--"]
            log(_shell(deleting))
            if not dry_run:
                subprocess.run(deleting, capture_output=True)


def run_slots(path: str, root: str, slots: list[str], command, dry_run: bool = False,
              env: dict | None = None, log=print) -> dict[str, str]:
    """Keep every slot busy with the next unfinished member (`command(member, workdir, slot)`:
    its argv) until none is left; returns {name: status}, status one of 'skipped' (already
    finished), 'done', 'failed' (or preempted more than MAX_RESTARTS times). Each member's output
    goes to its workdir's train.log, and ROOT/sweep_status.json says where each member is (what
    `lmjax sweep --status` prints). SIGTERM or Ctrl-C stops the running members (they resume
    next time)."""
    members = load(path)
    status = {m.name: "skipped" for m in members if is_finished(workdir_of(root, m.name), m.steps)}
    queue = [m for m in members if m.name not in status]
    log(f"sweep {path}: {len(members)} members, {len(status)} finished, {len(queue)} to train")
    if dry_run:
        for i, m in enumerate(queue):
            log(_shell(command(m, workdir_of(root, m.name), slots[i % len(slots)])))
        return status
    local_logs = None
    if paths.is_url(root) and queue:
        local_logs = pathlib.Path(tempfile.mkdtemp(prefix="lmjax-sweep-logs-"))
        log(f"members' output: {local_logs}/NAME.log, uploaded to their train.log at the end")
    running: dict[str, tuple[subprocess.Popen, float, str]] = {}
    restarts, where = collections.Counter(), {}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # -> KeyboardInterrupt
    try:
        while queue or running:
            waiting = {m.name for m in queue} | set(running)
            for m in [m for m in queue if m.parent and m.parent not in waiting
                      and not _ready(root, m)]:
                queue.remove(m)
                status[m.name] = "failed"
                log(f"  failed {m.name}: {m.parent} ended without step {m.fork_step} to fork")
            free = [s for s in slots if s not in {slot for _, _, slot in running.values()}]
            while free and (m := next((m for m in queue if _ready(root, m)), None)) is not None:
                queue.remove(m)
                slot = free.pop(0)
                workdir = paths.resolve(workdir_of(root, m.name))
                workdir.mkdir(parents=True, exist_ok=True)
                with _log_file(workdir, local_logs).open("a") as out:
                    proc = subprocess.Popen(command(m, str(workdir), slot), stdout=out,
                                            stderr=subprocess.STDOUT, env=env)
                running[m.name], where[m.name] = (proc, time.perf_counter(), slot), slot
                log(f"  start {m.name}" + ("" if slot.startswith("local-") else f" on {slot}"))
                _write_status(root, members, status, running, where)
            time.sleep(0.2)
            for name, (proc, start, _) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                workdir = paths.resolve(workdir_of(root, name))
                _upload_log(workdir, local_logs)
                if proc.returncode == distributed.PREEMPTED and restarts[name] < MAX_RESTARTS:
                    restarts[name] += 1  # it saved: back in the queue, to resume
                    queue.insert(0, next(m for m in members if m.name == name))
                    log(f"  preempted {name}; resuming it (restart {restarts[name]} of "
                        f"{MAX_RESTARTS})")
                    continue
                status[name] = "done" if proc.returncode == 0 else "failed"
                detail = (_final_loss(str(workdir)) if proc.returncode == 0 else
                          f", exit {proc.returncode}: see {workdir / 'train.log'}")
                finished = sum(s != "failed" for s in status.values())
                log(f"  [{finished}/{len(members)} finished, {len(running)} running] "
                    f"{status[name]} {name} in {time.perf_counter() - start:.0f}s{detail}")
                _write_status(root, members, status, running, where)
    except KeyboardInterrupt:  # the CLI prints this one line; no traceback for a normal stop
        stopped = ", ".join(running) or "none"
        raise KeyboardInterrupt(f"interrupted; stopped {stopped} (each resumes from its last "
                                "checkpoint): re-run the same command to finish.") from None
    finally:
        for proc, _, _ in running.values():  # interrupted: stop members, they resume next time
            proc.terminate()
        for name, (proc, _, _) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            _upload_log(paths.resolve(workdir_of(root, name)), local_logs)
        signal.signal(signal.SIGTERM, previous)
        if local_logs is not None:
            shutil.rmtree(local_logs)  # a temporary folder; every log is in its workdir now
        with contextlib.suppress(OSError):
            _write_status(root, members, status, {}, where)
    return status


STATUS_FILE = "sweep_status.json"


def _write_status(root: str, members: list[Member], status: dict, running: dict,
                  where: dict) -> None:
    table = {m.name: {"status": "running" if m.name in running else status.get(m.name, "pending"),
                      "where": where.get(m.name, "")} for m in members}
    (paths.resolve(root) / STATUS_FILE).write_text(json.dumps(table, indent=1))


def status_table(path: str, root: str) -> str:
    """`lmjax sweep --status`: each member's state. A finished final checkpoint says 'done'
    whatever the last sweep wrote; otherwise ROOT/sweep_status.json ('running' there means a
    sweep process was running it when it last wrote: it may have died since)."""
    members = load(path)
    file = paths.resolve(root) / STATUS_FILE
    saved = json.loads(file.read_text()) if file.exists() else {}
    rows = []
    for m in members:
        entry = saved.get(m.name, {})
        state = "done" if is_finished(workdir_of(root, m.name), m.steps) else (
            entry.get("status", "pending").replace("skipped", "done"))
        rows.append((m.name, state, entry.get("where", "")))
    width = max(len(name) for name, _, _ in rows)
    return "\n".join([f"{'member':{width}}  status    where",
                      *(f"{n:{width}}  {s:8}  {w}" for n, s, w in rows)])
