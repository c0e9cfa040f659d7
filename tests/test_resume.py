"""Cooldown forks (train.fork_from) and schedule changes on resume (lmjax/resume.py).

One constant-LR parent of 4 steps, a straight WSD run of 8 steps with a 4-step cooldown, and
two forks of the parent at its last step with that cooldown (one killed after its step-6 save
and re-run): every run is 1 device, a handful of steps, and the forks compile what the WSD
run compiled.
"""

import json
import os

import jax
import pytest
from etils import epath
from flax import nnx

from configs import smoke
from lmjax import checkpoint, config, paths, resume, sharding, train
from lmjax.data import pipeline
from lmjax.scaling import collect, report


def smoke_cfg(**train_keys):
    cfg = smoke.get_config()
    cfg.mesh.data = 1
    cfg.train.update(**{"steps": 8, "eval_every": 0, "eval_batches": 1, "loggers": "jsonl",
                        **train_keys})
    cfg.optim.update(warmup_steps=2, schedule="wsd", cooldown_steps=4)
    cfg.checkpoint.update(every=2, async_save=False)
    return cfg


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows}, rows[-1].get("eval/loss")


def tree(workdir):
    """Every file under `workdir` with its size and modification time."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size,
                                 os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(workdir) for f in files}


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, one = tmp_path_factory.mktemp("forks"), jax.devices()[:1]
    parent = smoke_cfg(steps=4)  # saves every step, keeps the newest and step 2
    parent.optim.schedule = "constant"
    parent.checkpoint.update(every=1, max_to_keep=1, keep_steps="2")
    train.run(parent, str(root / "parent"), devices=one)
    before = tree(root / "parent")
    train.run(smoke_cfg(), str(root / "wsd"), devices=one)
    fork = smoke_cfg(fork_from=str(root / "parent"))  # fork_step 0: where the cooldown begins
    train.run(fork, str(root / "fork"), devices=one)
    real_next = pipeline.BatchIterator.__next__

    def next_or_crash(self):
        if self.get_state()["step"] == 6:  # the batch of step 7, after the fork's step-6 save
            raise Crash
        return real_next(self)

    pipeline.BatchIterator.__next__ = next_or_crash
    try:
        with pytest.raises(Crash):
            train.run(fork, str(root / "killed"), devices=one)
    finally:
        pipeline.BatchIterator.__next__ = real_next
    assert max(losses(root / "killed")[0]) == 6 and os.listdir(root / "killed" / "checkpoints")
    train.run(fork, str(root / "killed"), devices=one)
    return root, before


def check_fork_of(parent, saved) -> None:
    """resume.fork of `parent` holds its checkpoint `saved` (step 4) whole: the checksums
    written with it (weights, both Adam moments, counts), step 4, its data position."""
    cfg = smoke_cfg(fork_from=str(parent))
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        abstract = train.compile_fns(cfg, mesh).abstract_state
        state, data_state, step = resume.fork(cfg, abstract, None, force=False)
    stored = json.loads((saved / "integrity" / "metadata").read_text())["checksums"]
    checksums, _ = checkpoint.fingerprint(state)
    assert step == 4 and checksums == stored
    assert int(nnx.to_pure_dict(state)[1]["step"]) == 4
    assert data_state == json.loads((saved / "data" / "process_0-of-1.json").read_text())


@pytest.mark.slow
def test_a_fork_starts_from_its_parents_checkpoint_and_never_writes_it(runs):
    root, before = runs
    assert sorted(os.listdir(root / "parent" / "checkpoints")) == ["2", "4"]
    check_fork_of(root / "parent", root / "parent" / "checkpoints" / "4")
    assert tree(root / "parent") == before  # nothing written, moved or deleted in the parent


@pytest.mark.slow
def test_a_fork_reads_a_parent_in_a_bucket_and_leaves_it_as_it_was(runs, bucket):
    root, _ = runs
    parent = epath.Path(bucket) / "parent"
    paths.upload_tree(root / "parent", parent)
    before = objects(parent)
    check_fork_of(parent, root / "parent" / "checkpoints" / "4")
    assert objects(parent) == before


def objects(folder: epath.Path) -> dict:
    """Every object under a bucket folder with its bytes (epath's rglob refuses gs://)."""
    found = {}
    for p in folder.iterdir():
        found.update(objects(p) if p.is_dir() else {str(p): p.read_bytes()})
    return found


@pytest.mark.slow
def test_a_fork_at_the_parents_last_step_is_the_straight_wsd_run(runs):
    """Bitwise: the parent's constant lr and WSD's stable lr are the same float, the fork
    resumes the parent's exact state and data position, and its step is the WSD run's
    program (fork keys never reach the jitted step)."""
    root, _ = runs
    (wsd, wsd_eval), (fork, fork_eval) = losses(root / "wsd"), losses(root / "fork")
    parent, _ = losses(root / "parent")
    assert sorted(fork) == [5, 6, 7, 8]
    assert {s: wsd[s] for s in parent} == parent and {s: wsd[s] for s in fork} == fork
    assert fork_eval == wsd_eval


@pytest.mark.slow
def test_a_killed_fork_resumes_bitwise(runs):
    root, _ = runs
    assert losses(root / "killed") == losses(root / "fork")


@pytest.mark.slow
def test_collect_turns_each_cooldown_end_into_a_point(runs):
    """The constant-LR parent is a trunk, not a point; each fork is one at its total tokens."""
    root, _ = runs
    points = {r["name"]: r for r in collect.collect(root)}
    assert sorted(points) == ["fork", "killed", "wsd"]
    fork = points["fork"]
    assert (fork["steps"], fork["tokens"], fork["fork_step"]) == (8, 8 * 8 * 32, 4)
    assert fork["eval_loss"] == points["wsd"]["eval_loss"] and fork["finished"]
    # a fork logs only its cooldown: its curve is no run's, and the curve methods say so
    with pytest.raises(ValueError, match="approach1 needs whole training curves; a cooldown "
                                         "fork logs only its cooldown"):
        report.analyze(str(root), "approach1", str(root / "fit"))


@pytest.mark.slow
def test_a_fork_that_does_not_continue_its_parent_is_one_sentence(runs):
    root, _ = runs
    parent = str(root / "parent")
    cfg = smoke_cfg(fork_from=parent, fork_step=3)
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint for step 3 \(it keeps "
                                                r"\[2, 4\]\); train the parent with"):
        resume.fork(cfg, None, None, force=False)
    cfg = smoke_cfg(fork_from=parent, fork_step=4)
    cfg.optim.schedule = "cosine"
    with pytest.raises(ValueError, match=r"took step 3 at learning rate 0.01, which this "
                                         r"config's schedule makes 0.00\d+: a fork keeps"):
        resume.fork(cfg, None, None, force=False)
    cfg = smoke_cfg(fork_from=parent)
    cfg.optim.b2 = 0.99
    with pytest.raises(ValueError, match="is a run with a different optim.b2; a fork"):
        resume.fork(cfg, None, None, force=False)
    cfg = smoke_cfg(fork_from=parent, init_from=parent)
    with pytest.raises(ValueError, match="Set train.fork_from or train.init_from, not both"):
        resume.validate(cfg)
    cfg = smoke_cfg(fork_from=parent)
    cfg.optim.schedule = "constant"
    with pytest.raises(ValueError, match="train.fork_step=0 forks where the WSD cooldown"):
        resume.validate(cfg)


@pytest.mark.parametrize("schedule, done, allowed", [
    ({"schedule": "constant"}, 100, True),
    ({"schedule": "wsd", "wsd_decay_fraction": 0.0}, 100, True),  # WSD without a cooldown
    ({"schedule": "wsd", "cooldown_steps": 20}, 80, True),  # before its cooldown
    ({"schedule": "wsd", "cooldown_steps": 20}, 90, False),  # in it
    ({"schedule": "cosine"}, 100, False),
])
def test_raising_train_steps_on_resume_only_where_taken_steps_keep_their_lr(
        tmp_path, capsys, schedule, done, allowed):
    cfg = smoke.get_config()
    cfg.optim.update(warmup_steps=10, **schedule)
    cfg.train.steps = 100
    config.save(cfg, tmp_path / "config.json")
    (tmp_path / "checkpoints" / str(done)).mkdir(parents=True)
    cfg.train.steps = 2000
    if allowed:
        resume.check(cfg, str(tmp_path), None, force=False)
        return
    with pytest.raises(ValueError, match=rf"holds {done} steps of a run whose schedule this "
                                         r"config changes \(step \d+ took learning rate"):
        resume.check(cfg, str(tmp_path), None, force=False)
    resume.check(cfg, str(tmp_path), None, force=True)
    assert "on a schedule that changes the learning rate" in capsys.readouterr().out
