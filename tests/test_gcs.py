"""A gs:// workdir, end to end, on a real GCS API server (tests/gcs.py): train, SIGKILL and
resume bitwise-exactly, eval; and lmjax/paths.py's helpers on a bucket. Nothing may land in a
local folder named `gs:` (what os.path.abspath makes of gs://bucket/run)."""

import json
import os
import tempfile

import numpy as np
import pytest
from etils import epath

from configs import smoke
from lmjax import checkpoint, evaluate, paths, train
from lmjax.metrics import Writer
from tests.test_reliability import (
    without_timing,
)


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in
            (epath.Path(str(workdir)) / "metrics.jsonl").read_text().splitlines()]


def assert_no_local_gs(*folders) -> None:
    for folder in (os.getcwd(), tempfile.gettempdir(), *folders):
        assert not os.path.exists(os.path.join(folder, "gs:")), folder


def test_resolve_keeps_urls_and_absolutises_local_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("gs://b/run")) == "gs://b/run"
    assert str(paths.resolve("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    assert str(paths.resolve("run")) == str(tmp_path / "run")
    assert paths.is_url("gs://b") and not paths.is_url("/tmp/b")


def test_move_upload_and_metrics_on_a_bucket(bucket, tmp_path):
    root = epath.Path(f"{bucket}/helpers")
    local = tmp_path / "events"
    (local / "sub").mkdir(parents=True)
    (local / "a").write_text("a")
    (local / "sub" / "b").write_text("b")
    paths.upload_tree(local, root / "up")
    assert (root / "up" / "sub" / "b").read_text() == "b"
    paths.move(root / "up", root / "moved" / "0")
    assert not (root / "up").exists()
    assert sorted(p.name for p in (root / "moved" / "0").iterdir()) == ["a", "sub"]

    writer = Writer(str(root), upload_every=0.0)  # every row written through at once
    for step in (1, 2, 3):
        writer.write(step, {"loss": np.float32(step)})
    assert [r["step"] for r in rows(root)] == [1, 2, 3]
    writer.close()
    assert any(p.name.startswith("events") for p in (root / "tensorboard").iterdir())
    resumed = Writer(str(root), resume_step=2, upload_every=60.0)  # rows past step 2 go
    assert [r["step"] for r in rows(root)] == [1, 2]
    resumed.write(3, {"loss": 3.5})
    resumed.flush()  # what train does before each checkpoint
    assert [r["loss"] for r in rows(root)] == [1.0, 2.0, 3.5]
    resumed.close()
    assert_no_local_gs(tmp_path)


@pytest.mark.slow
def test_train_and_eval_on_a_gs_workdir(bucket, smoke_workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a stray os.path.abspath would write here
    cfg = smoke.get_config()  # as conftest's smoke_workdir, which is the local twin of this run
    cfg.train.update(steps=6, eval_every=3, eval_batches=2)
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.every = 3
    cfg.profile.update(start_step=4, num_steps=1)  # traced locally, copied up on stop
    workdir = f"{bucket}/smoke"
    train.run(cfg, workdir)

    root = epath.Path(workdir)
    assert {"config.json", "metrics.jsonl", "tokenizer.model", "tensorboard", "checkpoints",
            "profile"} <= {p.name for p in root.iterdir()}
    assert any(p.name.startswith("events") for p in (root / "tensorboard").iterdir())
    assert {"3", "6"} <= {p.name for p in (root / "checkpoints").iterdir()}
    local = [json.loads(line) for line in open(os.path.join(smoke_workdir, "metrics.jsonl"))]
    assert [without_timing(r) for r in rows(root)] == [without_timing(r) for r in local]

    on_gcs, on_disk = evaluate.evaluate(workdir), evaluate.evaluate(smoke_workdir)
    assert on_gcs == on_disk and on_gcs["step"] == 6
    assert_no_local_gs(tmp_path)


def test_a_corrupt_step_on_a_bucket_is_set_aside(bucket):
    """checkpoint._set_aside on gs://: the unusable step moves to corrupt_checkpoints/."""
    cfg = smoke.get_config()
    workdir = f"{bucket}/aside"
    mngr = checkpoint.manager(workdir, cfg.checkpoint)
    root = epath.Path(workdir)
    (root / "checkpoints" / "5" / "state").mkdir(parents=True, exist_ok=True)
    (root / "checkpoints" / "5" / "state" / "junk").write_text("not a checkpoint")
    checkpoint._set_aside(mngr, {5: "unreadable"})
    assert not (root / "checkpoints" / "5").exists()
    assert (root / "corrupt_checkpoints" / "5.0" / "state" / "junk").read_text() == (
        "not a checkpoint")
    mngr.close()
