"""`lmjax sweep` as a user runs it: a 2 x 2 sweep of smoke models, killed midway and re-run."""

import json
import os
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

def get_sweep():  # 2 widths x 2 token budgets: 20 and 100 steps of 8 x 32 tokens
    return [{"model.d_model": d, "train.tokens_budget": t}
            for t in (5120.0, 25600.0) for d in (16, 32)]
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
    return {name: os.path.getmtime(os.path.join(root, name, "metrics.jsonl"))
            for name in os.listdir(root)}


def test_members_and_their_commands(tmp_path):
    path = tmp_path / "sweep.py"
    path.write_text(SWEEP)
    members = sweep.load(str(path))
    assert [(m.name, m.steps) for m in members] == [
        ("d_model=16,tokens_budget=5120", 20), ("d_model=32,tokens_budget=5120", 20),
        ("d_model=16,tokens_budget=25600", 100), ("d_model=32,tokens_budget=25600", 100)]
    command = sweep.train_command(str(path), "/r/x", members[0])
    assert command[1:] == ["-m", "lmjax", "train", f"--config={path}", "--workdir=/r/x",
                           "--config.model.d_model=16", "--config.train.tokens_budget=5120.0"]
    path.write_text(SWEEP.replace('"model.d_model"', '"model.d_modl"'))
    with pytest.raises(ValueError, match=r"Sweep member d_modl=16,.*'model.d_modl'"):
        sweep.load(str(path))


def test_a_broken_sweep_file_is_one_sentence(tmp_path):
    path = tmp_path / "sweep.py"
    path.write_text(SWEEP.replace("def get_sweep():", "def get_sweep(:"))
    line = SWEEP.splitlines().index("def get_sweep():  # 2 widths x 2 token budgets: 20 and "
                                    "100 steps of 8 x 32 tokens") + 1
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
    assert "4 members, 2 finished, 2 to train" in second
    for name in ("d_model=16,tokens_budget=5120", "d_model=32,tokens_budget=5120"):
        assert mtimes(root)[name] == before[name]  # finished members were not touched
    assert steps_logged(long_run) == list(range(5, 101, 5))  # resumed: each step once
    finished = mtimes(root)

    proc = lmjax_sweep(path, root, "--parallel=2")
    third = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "4 members, 4 finished, 0 to train" in third, third
    assert "start" not in third
    assert mtimes(root) == finished
