"""train.loggers: which writers metrics.Writer opens, W&B offline across a resume, and the one
sentence for a name it cannot serve. Driven through metrics.Writer with a config: no training."""

import json
import os
import sys

import pytest
from etils import epath

from configs import smoke
from lmjax import metrics, validate


def config(loggers: str):
    cfg = smoke.get_config()
    cfg.train.loggers = loggers
    return cfg


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B with no network and nothing written outside the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    # what W&B gathers about the machine (packages, git, system stats): seconds, nothing tested
    for name, value in {"WANDB__SAVE_REQUIREMENTS": "false", "WANDB_DISABLE_GIT": "true",
                        "WANDB__DISABLE_STATS": "true"}.items():
        monkeypatch.setenv(name, value)


def run_folders(workdir) -> list:
    return sorted((workdir / "wandb").glob("offline-run-*"))


def test_an_offline_wandb_run_keeps_config_rows_and_lineage_and_resumes_the_same_run(
        tmp_path, offline):
    workdir = tmp_path / "run"
    workdir.mkdir()
    cfg = config("tensorboard,jsonl,wandb")
    writer = metrics.Writer(str(workdir), cfg=cfg)
    run_id = writer.wandb.run.id
    assert writer.wandb.run.config["lineage"]["resumes"] == 0
    assert writer.wandb.run.config["model"]["d_model"] == cfg.model.d_model
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": 4.0 - step, "lr": 0.1})
    writer.close()
    [first] = run_folders(workdir)
    [record] = first.glob("*.wandb")
    data = record.read_bytes()
    assert b"train/loss" in data and b"lineage" in data and b"d_model" in data
    assert (workdir / "tensorboard").is_dir()

    resumed = metrics.Writer(str(workdir), resume_step=2, cfg=cfg)
    assert resumed.wandb.run.id == run_id
    lineage = resumed.wandb.run.config["lineage"]
    assert (lineage["start_step"], lineage["resumes"]) == (2, 1)
    assert lineage["workdir"] == str(workdir)
    resumed.write(3, {"train/loss": 0.5})
    resumed.close()
    assert json.loads((workdir / "wandb.json").read_text()) == {"id": run_id, "starts": [0, 2]}
    assert [p.name.endswith(run_id) for p in run_folders(workdir)] == [True, True]
    assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [1, 2, 3]


def test_jsonl_alone_writes_no_tensorboard_folder(tmp_path):
    writer = metrics.Writer(str(tmp_path), cfg=config("jsonl"))
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("loggers, message", [
    ("jsonl,tensorbord", "train.loggers='jsonl,tensorbord' names 'tensorbord', which is not one "
                         "of ('jsonl', 'tensorboard', 'wandb')."),
    ("tensorboard", "train.loggers='tensorboard' leaves out 'jsonl': metrics.jsonl is the run's "
                    "record (resume, sweeps and fits read it), so it is always written."),
    ("jsonl,wandb", "train.loggers asks for 'wandb', but the wandb package is not installed: "
                    "pip install 'lmjax[wandb]' (the [wandb] extra)."),
])
def test_a_logger_lmjax_cannot_serve_is_one_sentence(tmp_path, monkeypatch, loggers, message):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    with pytest.raises(ValueError) as raised:
        validate.validate(config(loggers), 8)
    assert str(raised.value) == message
    with pytest.raises(ValueError, match="train.loggers"):
        metrics.Writer(str(tmp_path), cfg=config(loggers))
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_a_gs_workdir_gets_the_wandb_run_folder_on_close(bucket, offline):
    root = epath.Path(bucket)
    writer = metrics.Writer(bucket, cfg=config("jsonl,wandb"), upload_every=60.0)
    local, run_id = writer.wandb.local, writer.wandb.run.id
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    [folder] = (root / "wandb").glob("offline-run-*")
    assert b"train/loss" in (folder / f"run-{run_id}.wandb").read_bytes()
    assert json.loads((root / "wandb.json").read_text())["id"] == run_id
    assert not os.path.exists(local)  # W&B's local folder is gone once copied up


def test_wandb_that_cannot_start_is_one_sentence(tmp_path, offline, monkeypatch):
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(ValueError) as raised:
        metrics.Writer(str(tmp_path), cfg=config("jsonl,wandb"))
    assert str(raised.value) == (
        "train.loggers has 'wandb', but W&B could not start a run (No API key configured. Use "
        "`wandb login` to log in.); WANDB_MODE=offline logs without network, for a later "
        "`wandb sync`.")


def test_only_process_0_logs(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
    writer = metrics.Writer(str(tmp_path), cfg=config("tensorboard,jsonl,wandb"))
    writer.write(1, {"train/loss": 1.0})
    writer.flush()
    writer.close()
    assert not any(tmp_path.iterdir())
