"""`lmjax sweep` as a user runs it: a sweep of three smoke models, killed midway and re-run."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lmjax.scaling import sweep
from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = '''
from configs import smoke

def get_config(arg=None):
    c = smoke.get_config()
    c.train.update(log_every=5, eval_every=0)
    c.checkpoint.update(every=10, async_save=False)
    return c

def get_sweep():  # 2 widths of 20 steps of 8 x 32 tokens, then one of 100
    return [{"model.d_model": d, "train.tokens_budget": t}
            for d, t in ((16, 5120.0), (32, 5120.0), (16, 25600.0))]
'''


def lmjax_sweep(path, root, *args):
    env = {**os.environ, "XLA_FLAGS": xla.flags(1)}
    return subprocess.Popen([sys.executable, "-m", "lmjax", "sweep", f"--sweep={path}",
                             f"--root={root}", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def steps_logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def mtimes(root):
    """Each member's metrics.jsonl's modification time (sweep_status.json is the sweep's)."""
    return {name: os.path.getmtime(os.path.join(root, name, "metrics.jsonl"))
            for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))}


def test_members_and_their_commands(tmp_path):
    path = tmp_path / "sweep.py"
    path.write_text(SWEEP)
    members = sweep.load(str(path))
    assert [(m.name, m.steps) for m in members] == [
        ("d_model=16,tokens_budget=5120", 20), ("d_model=32,tokens_budget=5120", 20),
        ("d_model=16,tokens_budget=25600", 100)]
    command = sweep.train_command(str(path), "/r/x", members[0])
    assert command[1:] == ["-m", "lmjax", "train", f"--config={path}", "--workdir=/r/x",
                           "--config.model.d_model=16", "--config.train.tokens_budget=5120.0"]
    path.write_text(SWEEP.replace('"model.d_model"', '"model.d_modl"'))
    with pytest.raises(ValueError, match=r"Sweep member d_modl=16,.*'model.d_modl'"):
        sweep.load(str(path))


def test_a_broken_sweep_file_is_one_sentence(tmp_path):
    path = tmp_path / "sweep.py"
    path.write_text(SWEEP.replace("def get_sweep():", "def get_sweep(:"))
    line = SWEEP.splitlines().index("def get_sweep():  # 2 widths of 20 steps of 8 x 32 "
                                    "tokens, then one of 100") + 1
    with pytest.raises(ValueError, match=rf"Sweep file '{path}' has a syntax error on line "
                                         rf"{line}: "):
        sweep.load(str(path))
    for returned, message in [("3", "must return a non-empty list"),
                              ("[]", "must return a non-empty list"),
                              ("{'../up': {}}", "Sweep member name '../up' is not a folder name")]:
        path.write_text(f"{SWEEP}\n\ndef get_sweep():\n    return {returned}\n")
        with pytest.raises(ValueError, match=message):
            sweep.load(str(path))


@pytest.mark.slow
def test_killed_sweep_finishes_on_rerun_and_a_finished_one_trains_nothing(tmp_path):
    path, root = tmp_path / "sweep.py", tmp_path / "runs"
    path.write_text(SWEEP)
    long_run = root / "d_model=16,tokens_budget=25600"
    proc = lmjax_sweep(path, root, "--parallel=1")
    deadline = time.time() + 900  # a guard against hangs: members start slowly on a busy host
    while not (long_run / "checkpoints" / "10").is_dir():  # the third member is mid-way
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and "Traceback" not in first, first  # one line, not a traceback
    assert first.splitlines()[-1] == (
        "lmjax sweep: interrupted; stopped d_model=16,tokens_budget=25600 (each resumes from "
        "its last checkpoint): re-run the same command to finish.")
    assert "done d_model=16,tokens_budget=5120" in first
    assert "done d_model=32,tokens_budget=5120" in first
    assert not sweep.is_finished(str(long_run), 100), first
    before = mtimes(root)
    kept = steps_logged(long_run)
    assert 10 <= max(kept) < 100

    proc = lmjax_sweep(path, root, "--parallel=2")
    second = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, second
    assert "3 members, 2 finished, 1 to train" in second
    for name in ("d_model=16,tokens_budget=5120", "d_model=32,tokens_budget=5120"):
        assert mtimes(root)[name] == before[name]  # finished members were not touched
    assert steps_logged(long_run) == list(range(5, 101, 5))  # resumed: each step once
    finished = mtimes(root)

    proc = lmjax_sweep(path, root, "--parallel=2")
    third = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "3 members, 3 finished, 0 to train" in third, third
    assert "start" not in third
    assert mtimes(root) == finished


COOLDOWNS = '''
from configs import smoke
from lmjax.scaling import sweep

def get_config(arg=None):
    return smoke.get_config()  # 8 x 32 tokens a step, warmup 5

def get_sweep():  # one constant-LR trunk, cooled down at 20 and 40 steps
    return sweep.cooldowns(get_config(), {"s": {"model.d_model": 16}}, [5120.0, 10240.0])
'''


def test_cooldown_forks_of_one_trunk_are_members(tmp_path):
    """The forks start where WSD runs of 20 and 40 steps cool down (the last 20% of the steps
    after warmup: 3 and 7 steps), the trunk trains to the last of them and keeps both."""
    path = tmp_path / "sweep.py"
    path.write_text(COOLDOWNS)
    trunk, short, long = sweep.load(str(path))
    assert (trunk.name, trunk.steps, trunk.parent) == ("s", 33, "")
    assert trunk.overrides["checkpoint.keep_steps"] == "17,33"
    assert trunk.overrides["optim.schedule"] == "constant"
    assert (short.name, short.steps, short.parent, short.fork_step) == (
        "s,tokens_budget=5120", 20, "s", 17)
    assert (long.steps, long.fork_step) == (40, 33)
    command = sweep.train_command(str(path), "/r/s,tokens_budget=5120", short)
    assert "--config.train.fork_from=/r/s" in command
    assert "--config.optim.schedule=wsd" in command
    path.write_text(COOLDOWNS.replace("return sweep.cooldowns", "members = sweep.cooldowns")
                    + '''    members["s"]["checkpoint.keep_steps"] = "33"\n    return members\n''')
    with pytest.raises(ValueError, match=r"Sweep member s,tokens_budget=5120 forks s at step "
                                         r"17, which s does not keep \(train.steps=33, "
                                         r"checkpoint.every=10, max_to_keep=3\)"):
        sweep.load(str(path))


def test_a_fork_starts_only_once_its_parent_holds_its_step(tmp_path, monkeypatch):
    """run_local with --parallel=3 and a stand-in for `lmjax train` that writes a member's
    kept and final checkpoints when it ends: the forks wait for the trunk's steps."""
    path, root = tmp_path / "sweep.py", tmp_path / "runs"
    path.write_text(COOLDOWNS)
    started = []

    class Train:
        def __init__(self, command, **_):
            flags = dict(c.split("=", 1) for c in command if c.startswith("--"))
            self.workdir = flags["--workdir"]
            self.steps = [flags.get("--config.checkpoint.keep_steps", "")] + [
                "33" if "fork_from" not in str(flags) else "end"]
            started.append((os.path.basename(self.workdir),
                            sorted(os.listdir(root / "s" / "checkpoints"))
                            if (root / "s" / "checkpoints").is_dir() else []))
            self.returncode = 0

        def poll(self):
            for step in ",".join(self.steps).split(","):
                if step:
                    os.makedirs(os.path.join(self.workdir, "checkpoints", step), exist_ok=True)
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", Train)
    status = sweep.run_local(str(path), str(root), parallel=3, log=lambda _: None)
    assert started == [("s", []), ("s,tokens_budget=5120", ["17", "33"]),
                       ("s,tokens_budget=10240", ["17", "33"])]
    assert set(status.values()) == {"done"}


def test_a_preempted_member_is_resumed_and_one_preempted_too_often_fails(tmp_path, monkeypatch):
    """A member that exits 75 (`lmjax train` saved at a preemption notice) goes back to the
    head of the queue; one preempted on every start fails after MAX_RESTARTS resumes."""
    path, root = tmp_path / "sweep.py", tmp_path / "runs"
    path.write_text(SWEEP)
    codes = {"d_model=16,tokens_budget=5120": [75, 0], "d_model=32,tokens_budget=5120": [0],
             "d_model=16,tokens_budget=25600": [75] * 9}
    started = []

    class Train:
        def __init__(self, command, **_):
            self.name = os.path.basename(next(c for c in command if c.startswith("--workdir=")))
            started.append(self.name)
            self.returncode = codes[self.name].pop(0)

        def poll(self):
            return self.returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", Train)
    said = []
    status = sweep.run_local(str(path), str(root), log=said.append)
    assert status == {"d_model=16,tokens_budget=5120": "done",
                      "d_model=32,tokens_budget=5120": "done",
                      "d_model=16,tokens_budget=25600": "failed"}
    assert started.count("d_model=16,tokens_budget=25600") == 1 + sweep.MAX_RESTARTS
    assert started[:2] == ["d_model=16,tokens_budget=5120"] * 2  # resumed before the next
    assert "  preempted d_model=16,tokens_budget=5120; resuming it (restart 1 of 3)" in said


def test_a_pool_of_slices_keeps_each_busy_and_requeues_a_preempted_member(tmp_path,
                                                                          monkeypatch):
    """`--runner=tpu --tpu=a,b`: three members on two slices, through a stand-in for
    launch/tpu_pod.py. The first member's slice is preempted past the launcher's own restarts
    (exit 75): it goes back to the queue and finishes on whichever slice is free; every member
    finishes once, never two on one slice; `--status` tells it."""
    checkout, root = tmp_path / "checkout", tmp_path / "runs"  # what the pods would receive
    (checkout / "launch").mkdir(parents=True)
    (checkout / "launch" / "tpu_pod.py").write_text("")
    path = checkout / "sweep.py"
    path.write_text(SWEEP)
    monkeypatch.chdir(checkout)
    monkeypatch.syspath_prepend(ROOT)  # the sweep file imports configs.smoke
    first = "d_model=16,tokens_budget=5120"
    runs, busy = [], {}

    class Launch:
        def __init__(self, command, **_):
            self.slice = next(c.split("=")[1] for c in command if c.startswith("--tpu="))
            self.name = os.path.basename(next(c for c in command if c.startswith("--workdir=")))
            assert self.slice not in busy.values()
            busy[self.name] = self.slice
            runs.append((self.name, self.slice))
            self.polls, self.returncode = 0, None

        def poll(self):
            self.polls += 1
            if self.polls < 3:
                return None
            del busy[self.name]
            preempted = self.name == first and [name for name, _ in runs].count(first) == 1
            self.returncode = 75 if preempted else 0
            if not preempted:
                member = next(m for m in sweep.load(str(path)) if m.name == self.name)
                os.makedirs(root / self.name / "checkpoints" / str(member.steps))
            return self.returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", Launch)
    said = []
    status = sweep.run_tpu(str(path), str(root), "a,b", log=said.append)
    assert set(status.values()) == {"done"} and len(status) == 3
    assert [name for name, _ in runs].count(first) == 2
    assert sorted({s for _, s in runs}) == ["a", "b"]
    assert f"  start {first} on a" in said and f"  preempted {first}; resuming it " \
           f"(restart 1 of 3)" in said
    table = sweep.status_table(str(path), str(root)).splitlines()
    assert table[0].split() == ["member", "status", "where"] and len(table) == 4
    assert all(line.split()[1] == "done" for line in table[1:])


def test_a_counted_pool_is_made_by_its_members_and_deleted_at_the_end(tmp_path, monkeypatch):
    """`--runner=tpu --tpu=pod --tpu_count=2 --tpu_flags=...`: the slots are pod-0 and pod-1,
    every member's launch may create its slot's slice or reuse it (`--create --reuse`, with
    the flags), and when the sweep ends each slot is deleted through the launcher."""
    checkout, root = tmp_path / "checkout", tmp_path / "runs"
    (checkout / "launch").mkdir(parents=True)
    (checkout / "launch" / "tpu_pod.py").write_text("")
    path = checkout / "sweep.py"
    path.write_text(SWEEP)
    monkeypatch.chdir(checkout)
    monkeypatch.syspath_prepend(ROOT)
    launches, deletes = [], []

    class Launch:
        def __init__(self, command, **_):
            launches.append(command)
            name = os.path.basename(next(c for c in command if c.startswith("--workdir=")))
            steps = next(m.steps for m in sweep.load(str(path)) if m.name == name)
            os.makedirs(root / name / "checkpoints" / str(steps))
            self.returncode = 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", Launch)
    monkeypatch.setattr(sweep.subprocess, "run", lambda argv, **_: deletes.append(argv))
    status = sweep.run_tpu(str(path), str(root), "pod", log=lambda _: None, count=2,
                           pod_flags="--accelerator=v5p-8 --spot --queued")
    assert set(status.values()) == {"done"} and len(status) == 3
    for command in launches:
        cut = command.index("--")
        assert command[1:cut] in (["launch/tpu_pod.py", f"--tpu=pod-{i}", "--create", "--reuse",
                                   "--accelerator=v5p-8", "--spot", "--queued"] for i in (0, 1))
    assert {c[2] for c in launches} == {"--tpu=pod-0", "--tpu=pod-1"}
    assert [argv[1:] for argv in deletes] == [
        ["launch/tpu_pod.py", f"--tpu=pod-{i}", "--accelerator=v5p-8", "--spot", "--queued",
         "--delete", "--"] for i in (0, 1)]
    with pytest.raises(ValueError, match=re.escape("--tpu_count=2 names its slices NAME-0 .. "
                                                   "NAME-1: give one --tpu=NAME, not 2.")):
        sweep.run_tpu(str(path), str(root), "a,b", count=2)
