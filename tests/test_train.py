"""End-to-end: the same run on different meshes, resume, accumulation, falling loss."""

import json
import os

import jax
import numpy as np
import pytest

from configs import smoke
from lmjax import resume, train
from lmjax.data import pipeline

MESHES = {"dp8": (8, 1, 1), "fsdp8": (1, 8, 1), "mixed": (2, 2, 2), "single": (1, 1, 1)}


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir)}


def smoke_cfg(**mesh):
    cfg = smoke.get_config()
    cfg.mesh.update(**mesh)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, (d, f, t) in MESHES.items():
        workdir = str(tmp_path_factory.mktemp(name))
        devices = jax.devices()[: d * f * t]
        train.run(smoke_cfg(data=d, fsdp=f, tensor=t), workdir, devices=devices)
        out[name] = workdir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp8", "fsdp8", "mixed"])
def test_same_losses_on_every_mesh(runs, name):
    base, other = losses(runs["single"]), losses(runs[name])
    assert sorted(base) == list(range(1, 21)) and sorted(other) == sorted(base)
    np.testing.assert_allclose([other[s] for s in base], list(base.values()), rtol=1e-5)


@pytest.mark.slow
def test_loss_falls_and_rows_are_complete(runs):
    rows = read_metrics(runs["single"])
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 1.0
    for key in ("lr", "tokens", "tokens_per_s", "mfu", "train/grad_norm", "flops"):
        assert key in rows[-1]
    assert rows[-1]["tokens"] == 20 * 8 * 32
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[1]["eval/perplexity"] == pytest.approx(np.exp(evals[1]["eval/loss"]))
    saved = json.load(open(os.path.join(runs["single"], "config.json")))
    assert saved["model"]["d_model"] == 32
    assert os.path.exists(os.path.join(runs["single"], "tokenizer.model"))


class Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_is_bitwise_exact(runs, tmp_path, monkeypatch):
    """Crash after the step-10 checkpoint (mid-way to the next), restart: identical losses."""
    workdir = str(tmp_path / "resumed")
    cfg = smoke_cfg(data=8, fsdp=1, tensor=1)
    real_next = pipeline.BatchIterator.__next__

    def next_or_crash(self):
        if self.get_state()["step"] == 13:  # the batch of step 14, after the save at step 10
            raise Crash
        return real_next(self)

    monkeypatch.setattr(pipeline.BatchIterator, "__next__", next_or_crash)
    with pytest.raises(Crash):
        train.run(cfg, workdir)
    assert max(losses(workdir)) == 12  # steps 11-12 logged past the checkpoint (13 pending)
    monkeypatch.setattr(pipeline.BatchIterator, "__next__", real_next)
    train.run(cfg, workdir)
    resumed, straight = losses(workdir), losses(runs["dp8"])
    assert [r["step"] for r in read_metrics(workdir)] == sorted(resumed)  # no step twice
    assert resumed == straight  # bitwise: float equality of every step's loss


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch(tmp_path, runs):
    cfg = smoke_cfg(data=8, fsdp=1, tensor=1)
    cfg.data.global_batch_size = 16
    cfg.train.steps = 3
    cfg.optim.warmup_steps = 1
    full = str(tmp_path / "full")
    train.run(cfg, full)
    cfg.train.grad_accum = 2
    accum = str(tmp_path / "accum")
    train.run(cfg, accum)
    a, b = losses(full), losses(accum)
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)


@pytest.mark.slow
def test_no_held_out_batches_means_no_eval_rows(tmp_path):
    cfg = smoke_cfg(data=8, fsdp=1, tensor=1)
    cfg.train.update(steps=2, eval_batches=0)
    cfg.optim.warmup_steps = 1
    train.run(cfg, str(tmp_path))
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2] and not any("eval/loss" in r for r in rows)


def test_a_run_that_saved_no_checkpoint_does_not_block_new_settings(tmp_path, capsys):
    """A run that failed before its first save left only its config.json: nothing to resume,
    so a run with other settings starts over (with a warning) instead of being refused."""
    from lmjax import config

    cfg = smoke.get_config()
    config.save(cfg, tmp_path / "config.json")
    cfg.optim.lr = cfg.optim.lr / 2
    resume.check(cfg, str(tmp_path), None, force=False)
    assert "saved no checkpoint (different optim.lr); starting it over" in capsys.readouterr().out
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)  # with a checkpoint, it is refused
    with pytest.raises(ValueError, match="holds a run with a different optim.lr"):
        resume.check(cfg, str(tmp_path), None, force=False)


def test_a_config_json_lmjax_did_not_write_is_never_overwritten(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match="holds a config.json that lmjax did not write"):
        resume.check(smoke.get_config(), str(tmp_path), None, force=False)
