"""The commands as a user runs them: `python -m lmjax ...` in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lmjax(*args, devices=8):
    env = {**os.environ, "XLA_FLAGS": xla.flags(devices)}
    return subprocess.run([sys.executable, "-m", "lmjax", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_writes_a_complete_workdir(tmp_path):
    workdir = tmp_path / "run"
    out = lmjax("train", "--config=configs/smoke.py", f"--workdir={workdir}",
                "--config.train.steps=6", "--config.train.eval_every=3",
                "--config.checkpoint.every=3", "--config.optim.warmup_steps=2", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert json.load(open(workdir / "config.json"))["train"]["steps"] == 6
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert (workdir / "tokenizer.model").stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["--config.model.d_modl=3"],
     "Unknown config key 'model.d_modl' (did you mean 'model.d_model'?)."),
    (["--config.mesh.data=3"],
     ("Mesh mesh.data=3, mesh.fsdp=1, mesh.seq=1, mesh.tensor=1, mesh.expert=1 does not "
      "divide the 8 available devices.")),
    (["--config.mesh.data=1", "--config.mesh.tensor=8"],
     "model.num_heads=4 is not divisible by the tensor axis (mesh.tensor=8)."),
    (["--config.data.global_batch_size=12"],
     "The micro-batch of 12 sequences (data.global_batch_size / train.grad_accum) is not "
     "divisible by the 8 data-parallel devices (mesh.data x mesh.fsdp)."),
    (["--config.data.tokenizer=/nonexistent/sp.model"], "/nonexistent/sp.model"),
])
def test_bad_input_is_one_sentence_and_touches_nothing(tmp_path, args, message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("precious")
    out = lmjax("train", "--config=configs/smoke.py", f"--workdir={workdir}", *args)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lmjax train: ") and message in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert (workdir / "config.json").read_text() == "precious"  # nothing saved is lost


def test_info_prints_the_published_count():
    out = lmjax("info", "--config=configs/llama.py:7b", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "6,738,415,616" in out.stdout


def test_unknown_command_and_missing_config():
    out = lmjax("trian")
    assert out.returncode != 0 and "Unknown command 'trian'" in out.stderr
    out = lmjax("train", "--workdir=/tmp/x")
    assert out.returncode != 0 and "--config=configs/x.py[:arg] is required" in out.stderr


def test_each_command_lists_only_its_own_flags():
    train, sample = lmjax("train", "--help", devices=1), lmjax("sample", "--help", devices=1)
    assert "--[no]force_resume" in train.stdout and "--coordinator" in train.stdout
    assert "--temperature" not in train.stdout and "--cpu_devices" not in train.stdout
    assert "--temperature" in sample.stdout and "--max_new_tokens" in sample.stdout
    assert "force_resume" not in sample.stdout and "--config" not in sample.stdout
