"""Reliability: crash and preemption resume, corrupt checkpoints, resharding, NaN guard, bad input.

The crash harness runs `python -m lmjax train` as a subprocess and kills it with SIGKILL at
seeded points, through the LMJAX_FAULT hook (lmjax/faults.py) so that each kill lands in the
phase it names: just after a step is dispatched, as an evaluation starts, or while an async
checkpoint is being written. After the last restart, metrics.jsonl must equal an uninterrupted
run's, float for float, and every row any attempt ever wrote must match too.
scripts/stress_resume.py runs the same harness with many more kills, some at random wall-clock
times.
"""

import asyncio
import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import smoke
from lmjax import checkpoint, config, distributed, faults, metrics, sharding, train, validate
from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# More saves and evals than smoke.py's defaults, so that kills have more places to land.
ARGS = ("--config=configs/smoke.py", "--config.checkpoint.every=4", "--config.train.eval_every=5")
STEPS, SAVE_EVERY, EVAL_EVERY = 20, 4, 5
TIMING = ("tokens_per_s", "mfu")  # wall-clock figures, the only ones allowed to differ


# ------------------------------------------------------------------ the harness


def subprocess_env(compile_cache: str) -> dict:
    """One CPU device (fast to compile) and a shared XLA compile cache: same program, same bits."""
    return {**os.environ, "XLA_FLAGS": xla.flags(1),
            "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": compile_cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def start_train(workdir, env: dict, fault: str | None = None, *extra: str) -> subprocess.Popen:
    env = {**env, faults.FAULT_ENV: fault} if fault else env
    return subprocess.Popen([sys.executable, "-m", "lmjax", "train", *ARGS, f"--workdir={workdir}",
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_train(workdir, env: dict, fault: str | None = None, *extra: str) -> tuple[int, str]:
    proc = start_train(workdir, env, fault, *extra)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def read_rows(workdir) -> list[dict]:
    """metrics.jsonl's rows; a last line torn by a kill mid-write is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def assert_rows_match(rows: list[dict], baseline: dict[int, dict]) -> None:
    """Each row equals the uninterrupted run's row of its step (floats bitwise), once each."""
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"a step is logged twice or out of order: {steps}"
    for row in rows:
        assert without_timing(row) == baseline[row["step"]], row["step"]


def kill_plan(seed: int, kills: int) -> list[tuple[str, int]]:
    """`kills` (phase, step) points with distinct, increasing steps, at least one save and one
    eval kill: since each restart resumes at or before the step it died at, every point fires."""
    rng = random.Random(seed)
    saves = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    evals = [s for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY) if s % SAVE_EVERY]
    chosen = {rng.choice(saves): "save", rng.choice(evals): "eval"}
    rest = [s for s in range(1, STEPS + 1) if s not in chosen]
    chosen.update({s: "step" for s in rng.sample(rest, kills - 2)})
    return [(phase, step) for step, phase in sorted(chosen.items())]


def crash_and_resume(workdir, env: dict, plan: list[tuple[str, int]],
                     baseline: dict[int, dict]) -> list[int]:
    """Kill at each point of `plan`, then finish; returns the step each restart resumed from
    (the last checkpoint before the kill). Checks every row written along the way."""
    resumed_from = []
    for phase, step in plan:
        code, log = run_train(workdir, env, f"{phase}:{step}")
        assert code == -signal.SIGKILL, f"{phase}:{step} did not kill (rc {code}): {log[-2000:]}"
        assert_rows_match(read_rows(workdir), baseline)
        entries = os.listdir(os.path.join(workdir, "checkpoints"))
        if phase == "save":  # killed while the async write was in flight: Orbax's tmp folder
            assert any(".orbax-checkpoint-tmp" in e for e in entries), entries
        resumed_from.append(max((int(d) for d in entries if d.isdigit()), default=0))
    code, log = run_train(workdir, env)
    assert code == 0, log[-3000:]
    entries = os.listdir(os.path.join(workdir, "checkpoints"))
    assert all(e.isdigit() for e in entries), entries  # every unfinished write was cleaned up
    return resumed_from


def settle(folder, quiet_s: float = 1.0, timeout_s: float = 60.0) -> None:
    """Wait until nothing under `folder` changes for `quiet_s`: a save that failed in one item
    leaves the others' native writes running in this process (a real run has exited by then),
    and the next manager's clean-up must not race them."""
    def snapshot():
        try:
            return sorted((os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
                          for d, _, files in os.walk(folder) for f in files)
        except FileNotFoundError:  # renamed or removed while walked: still changing
            return None
    deadline, before = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = snapshot()
        if now is not None and now == before:
            return
        before = now
        time.sleep(quiet_s)


# ------------------------------------------------------------------ crash and preemption


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(str(tmp_path_factory.mktemp("xla_cache")))


@pytest.fixture(scope="module")
def baseline(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, log = run_train(workdir, env)
    assert code == 0, log[-3000:]
    rows = read_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return {r["step"]: without_timing(r) for r in rows}


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_exact(env, baseline, tmp_path):
    """Also determinism: the first run, a fresh process, matches the baseline's rows up to its
    kill bit for bit (crash_and_resume checks every row after every kill)."""
    plan = kill_plan(seed=5, kills=3)
    assert {phase for phase, _ in plan} == {"step", "eval", "save"}
    resumed_from = crash_and_resume(tmp_path / "run", env, plan, baseline)
    assert all(s % SAVE_EVERY == 0 for s in resumed_from)
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert_rows_match(rows, baseline)
    assert not os.path.exists(tmp_path / "run" / "corrupt_checkpoints")  # no kill corrupts


@pytest.mark.slow
def test_sigkill_then_resume_on_a_gs_workdir_is_bitwise_exact(env, baseline, bucket, tmp_path):
    """On a bucket (tests/gcs.py's server, its address passed on): metrics.jsonl is
    rewritten whole before each save, so a killed run's rows end at its last checkpoint."""
    from etils import epath

    from tests import gcs

    env = {**env, **{k: os.environ[k] for k in gcs.environment(0)}}  # set by the `bucket` fixture
    workdir = f"{bucket}/resume"
    code, log = run_train(workdir, env, "step:10")  # killed after step 10; saved at 4 and 8
    assert code == -signal.SIGKILL, log[-3000:]
    rows = lambda: [json.loads(line) for line in  # noqa: E731
                    (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows()] == list(range(1, 9))  # flushed before each save
    code, log = run_train(workdir, env)
    assert code == 0, log[-3000:]
    assert_rows_match(rows(), baseline)
    assert [r["step"] for r in rows()] == sorted(baseline)
    for folder in (ROOT, tmp_path):  # the subprocesses' cwd: no local folder named `gs:`
        assert not os.path.exists(os.path.join(folder, "gs:"))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_75_then_resumes_bitwise_at_o3(tmp_path):
    """As a real run: XLA's default -O3, no compilation cache at all (each process compiles
    afresh), so the resumed rows equal the uninterrupted run's because compiling is
    deterministic, not because both loaded one cached executable."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    # no evaluation (one program fewer to compile at -O3, three times over) and 12 steps
    short = ("--config.train.compilation_cache_dir=", "--config.train.eval_every=0",
             "--config.train.steps=12")
    code, log = run_train(tmp_path / "straight", env, None, *short)
    assert code == 0, log[-3000:]
    straight = {r["step"]: without_timing(r) for r in read_rows(tmp_path / "straight")}
    workdir = tmp_path / "preempted"
    code, log = run_train(workdir, env, "term:7", *short)  # SIGTERMs itself after step 7
    assert code == distributed.PREEMPTED and "Traceback" not in log, log[-3000:]  # not "done"
    assert "Preempted: saved step 7" in log
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [4, 7]
    code, log = run_train(workdir, env, None, *short)
    assert code == 0, log[-3000:]
    assert_rows_match(read_rows(workdir), straight)
    assert len(read_rows(workdir)) == 12


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_exits_130(env, baseline, tmp_path):
    """The save is SIGTERM's (whose test above resumes from it bitwise); the exit is 130."""
    workdir = tmp_path / "interrupted"
    code, log = run_train(workdir, env, "int:7")  # the process SIGINTs itself after step 7
    assert code == 130 and "Traceback" not in log, log[-3000:]
    assert "Interrupted: saving at the end of this step" in log
    assert "Preempted: saved step 7" in log
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [4, 7]
    assert_rows_match(read_rows(workdir), baseline)
    assert [r["step"] for r in read_rows(workdir)] == list(range(1, 8))


def test_a_second_ctrl_c_is_left_to_the_operating_system():
    """The first SIGINT is a notice (the loop saves, then KeyboardInterrupt: exit 130); it
    hands SIGINT back to the OS, whose default ends the process at once on a second one."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), distributed.preemption_notice() as preempted:
        assert not preempted(1)
        signal.raise_signal(signal.SIGINT)  # handled before raise_signal returns
        assert preempted(2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------ in-process helpers


def smoke_cfg(**updates):
    cfg = smoke.get_config()
    for group, values in updates.items():
        cfg[group].update(**values)
    return cfg


def restore(workdir, cfg, devices, step=None):
    mesh = sharding.make_mesh(cfg, devices)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)  # traces shapes only; nothing is compiled here
        mngr = checkpoint.manager(workdir, cfg.checkpoint)
        try:
            return checkpoint.restore(mngr, fns.abstract_state, step)
        finally:
            mngr.close()


def leaves(state) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_rows(workdir)}


# ------------------------------------------------------------------ corrupt checkpoints

ONE = jax.devices()[:1]
SINGLE = {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 1-device smoke run with checkpoints at steps 10 and 20."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    train.run(smoke_cfg(**SINGLE), workdir, devices=ONE)
    return workdir


def biggest_file(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    path = biggest_file(os.path.join(step_dir, "state"))
    os.truncate(path, os.path.getsize(path) // 2)


def flip_bytes(step_dir):
    path = biggest_file(os.path.join(step_dir, "state"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def delete_state_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def delete_data_item(step_dir):
    shutil.rmtree(os.path.join(step_dir, "data"))


def truncate_metadata(step_dir):
    """The OCDBT file of the arrays' metadata: every array's open fails, many reads in flight."""
    for name in os.listdir(os.path.join(step_dir, "state", "d")):
        path = os.path.join(step_dir, "state", "d", name)
        os.truncate(path, os.path.getsize(path) // 2)


def shift_data_position(step_dir):
    """One flipped bit turns step 20 into 30: still valid JSON, but data 10 steps ahead."""
    path = os.path.join(step_dir, "data", "process_0-of-1.json")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw.replace(b"20", b"30"))


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [truncate, truncate_metadata, flip_bytes,
                                     delete_state_manifest, delete_data_item,
                                     shift_data_position])
def test_corrupt_latest_falls_back_and_keeps_everything(finished, tmp_path, capsys, corrupt):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    corrupt(os.path.join(workdir, "checkpoints", "20"))
    state, data_state, step = restore(workdir, smoke_cfg(**SINGLE), ONE)
    assert step == 10 and data_state == {"step": 10}
    out, err = capsys.readouterr()
    warning, moved = out.splitlines()  # one line each, and nothing else: no tracebacks
    assert "checkpoint step 20" in warning and "unusable" in warning and not err
    assert moved.startswith("warning: moved checkpoint step 20 to ")
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["10"]  # 20 moved, not deleted
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["20.0"]
    reference, _, _ = restore(finished, smoke_cfg(**SINGLE), ONE, step=10)
    got, want = leaves(state), leaves(reference)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def finished_leaves(finished):
    return {step: leaves(restore(finished, smoke_cfg(**SINGLE), ONE, step=step)[0])
            for step in (10, 20)}


@pytest.mark.slow
@settings(max_examples=16, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6), st.sampled_from(["bit", "bytes", "truncate", "delete"]),
       st.floats(0, 1), st.integers(0, 7))
def test_any_damage_to_one_checkpoint_file_loses_at_most_that_step(finished, finished_leaves,
                                                                   capsys, which, how, where,
                                                                   bit):
    """A flipped bit, 64 flipped bytes, a cut or a deletion anywhere in any file of either
    checkpoint: the restore gives step 20 or, when 20 is the one damaged, step 10, bitwise as
    saved, with at most two warning lines; never a wrong state, a traceback or both steps lost."""
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "run")
        shutil.copytree(finished, workdir)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir,
                                                                            "checkpoints"))
                       for f in fs)
        path = files[which % len(files)]
        size = os.path.getsize(path)
        at = min(int(where * size), max(size - 1, 0))
        if how == "delete":
            os.remove(path)
        elif how == "truncate":
            os.truncate(path, at)
        elif size:
            with open(path, "r+b") as f:
                f.seek(at)
                chunk = f.read(1 if how == "bit" else 64)
                f.seek(at)
                f.write(bytes([chunk[0] ^ (1 << bit)]) if how == "bit"
                        else bytes(b ^ 0xFF for b in chunk))
        state, data_state, step = restore(workdir, smoke_cfg(**SINGLE), ONE)
        out, err = capsys.readouterr()
        assert step in (10, 20) and data_state == {"step": step}, (path, how, at)
        got = leaves(state)
        assert all(np.array_equal(got[k], v) for k, v in finished_leaves[step].items())
        assert not err and len(out.splitlines()) <= 2 and "Traceback" not in out, (path, out)
        if step == 10:  # the damaged newest step is moved aside, never deleted
            assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["20.0"]


@pytest.mark.slow
def test_resume_after_corruption_is_exact(finished, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    truncate(os.path.join(workdir, "checkpoints", "20"))
    train.run(smoke_cfg(**SINGLE), workdir, devices=ONE)  # redoes steps 11-20
    assert losses(workdir) == losses(finished)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_no_valid_checkpoint_stops_and_moves_nothing(finished, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    for step in ("10", "20"):
        delete_state_manifest(os.path.join(workdir, "checkpoints", step))
    with pytest.raises(ValueError, match=r"No checkpoint in .* can be restored \(step 20: .*"
                                         r"step 10: "):
        restore(workdir, smoke_cfg(**SINGLE), ONE)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_nonfinite_state_is_never_saved(tmp_path):
    state = nnx.State({"w": jax.numpy.array([1.0, np.inf]), "b": jax.numpy.zeros(2)})
    mngr = checkpoint.manager(str(tmp_path), smoke.get_config().checkpoint)
    with pytest.raises(FloatingPointError, match=r"Not saving step 3: 1 state leaves .* 'w'"):
        checkpoint.save(mngr, 3, state, {"step": 3})
    mngr.close()
    assert mngr.all_steps() == []


def test_disk_full_mid_save_is_one_sentence_and_the_last_checkpoint_resumes(tmp_path,
                                                                           monkeypatch, caplog):
    """A write that fails with ENOSPC in Orbax's background thread (a patched writer: the
    integrity item's) is named in one sentence; the step before it restores whole."""
    cfg = smoke.get_config().checkpoint  # async_save: the failure surfaces at the next wait
    mngr = checkpoint.manager(str(tmp_path), cfg)
    checkpoint.save(mngr, 1, nnx.State({"w": jax.numpy.arange(4.0)}), {"step": 1})
    mngr.wait_until_finished()

    async def no_space(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "integrity"))

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space)
    with pytest.raises(checkpoint.DiskFull, match=r"^No space left to write checkpoint step 2 in "
                       r".*; step 1, the newest complete checkpoint, is intact: free space and "
                       r"run the same command to resume from it\.$"):
        checkpoint.save(mngr, 2, nnx.State({"w": jax.numpy.ones(4)}), {"step": 2})
        mngr.wait_until_finished()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # Orbax's are dropped
    mngr.close()
    monkeypatch.undo()
    settle(tmp_path / "checkpoints")  # TensorStore may still be writing step 2's state
    abstract = nnx.State({"w": jax.ShapeDtypeStruct((4,), np.float32,
                                                    sharding=jax.numpy.zeros(4).sharding)})
    mngr = checkpoint.manager(str(tmp_path), cfg)  # the next run: the torn write is cleaned up
    state, data_state, step = checkpoint.restore(mngr, abstract)
    mngr.close()
    assert (step, data_state) == (1, {"step": 1})
    assert np.array_equal(state["w"][...], np.arange(4.0))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_reads_a_failed_restore_leaves_in_flight_report_nothing(monkeypatch):
    """When one read of a step fails, Orbax closes its event loop while TensorStore still has
    other reads in flight; each that finishes then calls into the closed loop (an unraisable
    'Event loop is closed', thousands of tracebacks on a big model). Made here with a
    TensorStore promise resolved after its loop is closed: nothing is reported, while other
    unraisable errors still are."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint.quiet_abandoned_io()  # what every checkpoint.manager installs
    promise, in_flight = ts.Promise.new()

    async def read(future):
        return await future

    async def first_read_fails():
        asyncio.ensure_future(read(in_flight))
        await asyncio.sleep(0)  # the second read is now waiting on TensorStore
        raise ValueError("truncated")

    loop = asyncio.new_event_loop()
    with pytest.raises(ValueError):
        loop.run_until_complete(first_read_fails())
    loop.close()
    promise.set_result(1)  # TensorStore finishes the read: its callback finds the loop closed

    class Other:
        def __del__(self):
            raise KeyError("not ours")

    Other()
    assert [type(report.exc_value) for report in seen] == [KeyError]


def test_checksum_is_the_same_on_every_layout():
    """The integrity checksum is a wrapping integer sum: any order, any sharding, same value."""
    x = jax.random.normal(jax.random.key(0), (64, 32))
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    words = np.asarray(x).view(np.uint32).astype(np.uint64).sum() % 2**32
    assert int(checkpoint._leaf_checksum(x)) == int(checkpoint._leaf_checksum(sharded)) == words
    assert int(checkpoint._leaf_checksum(x.at[3, 4].add(1e-6))) != words


# ------------------------------------------------------------------ resharding


@pytest.mark.slow
def test_restore_onto_other_meshes_and_continue(tmp_path):
    """Written on 8 devices (2,2,2 fsdp_tp); restored on 4 (fsdp) and 1 (dp) with identical
    values; training continues on 4 devices; that run's checkpoint restores back onto 8."""
    eight = {"mesh": {"data": 2, "fsdp": 2, "tensor": 2, "rules": "fsdp_tp"}}
    four = {"mesh": {"data": 1, "fsdp": 4, "tensor": 1, "rules": "fsdp"}}
    one = {"mesh": {"data": 1, "fsdp": 1, "tensor": 1, "rules": "dp"}}
    written = str(tmp_path / "eight")
    train.run(smoke_cfg(**eight), written)
    reference = leaves(restore(written, smoke_cfg(**eight), jax.devices(), step=10)[0])
    for layout, n in ((four, 4), (one, 1)):
        state, _, step = restore(written, smoke_cfg(**layout), jax.devices()[:n], step=10)
        assert step == 10
        got = leaves(state)
        assert got.keys() == reference.keys()
        assert all(np.array_equal(got[k], reference[k]) for k in reference), layout

    continued = str(tmp_path / "four")
    shutil.copytree(written, continued)
    shutil.rmtree(os.path.join(continued, "checkpoints", "20"))
    train.run(smoke_cfg(**four), continued, devices=jax.devices()[:4])
    a, b = losses(written), losses(continued)
    assert sorted(b) == list(range(1, 21))
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)
    back = leaves(restore(continued, smoke_cfg(**eight), jax.devices(), step=20)[0])
    alone = leaves(restore(continued, smoke_cfg(**one), ONE, step=20)[0])
    assert all(np.array_equal(back[k], alone[k]) for k in alone)


# ------------------------------------------------------------------ numerics guard

SHORT = {**SINGLE, "train": {"steps": 6, "eval_every": 0}, "checkpoint": {"every": 4},
         "optim": {"warmup_steps": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("nan_at, every", [(5, 4), (4, 2)])  # between saves; on a save step
def test_nan_stops_with_step_and_metric_and_saves_nothing_after(tmp_path, monkeypatch, nan_at,
                                                                 every):
    monkeypatch.setenv(faults.FAULT_ENV, f"nan:{nan_at}")  # that step's batch has NaN weights
    workdir = str(tmp_path / "run")
    cfg = smoke_cfg(**{**SHORT, "checkpoint": {"every": every}})
    with pytest.raises(FloatingPointError, match=rf"train/grad_norm=nan, .*train/loss=nan at "
                                                 rf"step {nan_at}; stopping the run"):
        train.run(cfg, workdir, devices=ONE)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4" if every == 4 else "2"]
    assert max(losses(workdir)) == nan_at - 1


@pytest.mark.slow
def test_skip_mode_leaves_weights_and_moments_untouched_and_goes_on(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv(faults.FAULT_ENV, "nan:6")
    cfg = smoke_cfg(**{**SHORT, "train": {"steps": 7, "eval_every": 0, "on_nonfinite": "skip"},
                       "checkpoint": {"every": 1}})  # keeps 5, 6 and 7
    workdir = str(tmp_path / "run")
    train.run(cfg, workdir, devices=ONE)
    warning = capsys.readouterr().out
    assert "train/grad_norm=nan" in warning and "at step 6; the update was skipped" in warning
    rows = {r["step"]: r for r in read_rows(workdir)}
    assert [rows[s]["train/skipped"] for s in range(1, 8)] == [0, 0, 0, 0, 0, 1, 0]
    before, after, next_ = (leaves(restore(workdir, cfg, ONE, step=s)[0]) for s in (5, 6, 7))
    step_key = "[1]['step']"
    assert [x.pop(step_key) for x in (before, after, next_)] == [5, 6, 7]  # the count advances
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # Training goes on after the skipped step: step 7 is finite and changes every weight matrix.
    assert np.isfinite(rows[7]["train/loss"]) and rows[7]["train/loss"] < rows[1]["train/loss"]
    assert all(np.all(np.isfinite(v)) for v in next_.values())
    assert sum(not np.array_equal(after[k], next_[k]) for k in after) > len(after) // 2


@pytest.mark.slow
def test_spike_guard_stops_a_run_before_the_spike_is_saved(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "spike:22")  # step 22 (a save step) is a bad batch
    cfg = smoke_cfg(**{**SHORT, "train": {"steps": 24, "eval_every": 0, "spike_factor": 1.5},
                       "checkpoint": {"every": 11}})
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"train/loss is [\d.]+ at step 22, over "
                                                 r"train.spike_factor=1.5 x the mean [\d.]+ of "
                                                 r"the previous 20 steps; stopping the run"):
        train.run(cfg, workdir, devices=ONE)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["11"]  # from before the spike
    assert max(losses(workdir)) == 21


def test_spike_guard_names_step_and_factor():
    recent = [2.0] * 20
    train._check_spike(30, 3.9, recent, factor=2.0)  # under 2 x 2.0: fine
    with pytest.raises(FloatingPointError, match="train/loss is 4.1 at step 31, over "
                                                 r"train.spike_factor=2.0 x the mean 2"):
        train._check_spike(31, 4.1, recent, factor=2.0)
    train._check_spike(5, 100.0, [2.0] * 5, factor=2.0)  # too few steps to judge yet


# ------------------------------------------------------------------ bad input on resume


@pytest.mark.parametrize("override,named", [
    ({"model": {"d_model": 64}}, "model.d_model"),
    ({"data": {"seq_len": 16}, "seed": 3}, "data.seq_len, seed"),
    ({"optim": {"lr": 0.1}}, "optim.lr"),
])
def test_resume_with_another_config_is_refused(finished, tmp_path, override, named):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    cfg = smoke_cfg(**SINGLE)
    for key, value in override.items():
        cfg[key] = value if not isinstance(value, dict) else cfg[key]
        if isinstance(value, dict):
            cfg[key].update(**value)
    with pytest.raises(ValueError, match=f"holds a run with a different {named}; use another "
                                         f"--workdir, or --force_resume"):
        train.run(cfg, workdir, devices=ONE)
    with open(os.path.join(workdir, "config.json")) as f, open(
            os.path.join(finished, "config.json")) as g:
        assert f.read() == g.read()  # untouched


def test_resumable_keys_may_change(finished, tmp_path):
    cfg = smoke_cfg(mesh={"data": 4, "rules": "dp"}, train={"steps": 40, "log_every": 5},
                    checkpoint={"every": 7, "async_save": False})
    path = os.path.join(finished, "config.json")
    assert config.resume_conflicts(path, cfg) == []
    cfg.optim.b2 = 0.99
    cfg.model.attention = "xla"
    assert config.resume_conflicts(path, cfg) == ["optim.b2"]
    cfg.model.attention_window = 8  # shares a prefix with a resumable key, but changes the model
    assert config.resume_conflicts(path, cfg) == ["model.attention_window", "optim.b2"]


def test_other_tokenizer_and_foreign_config_are_refused(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    (workdir / "tokenizer.model").write_bytes(b"another model")
    with pytest.raises(ValueError, match="different tokenizer model file"):
        train.run(smoke_cfg(**SINGLE), str(workdir), devices=ONE)
    (workdir / "config.json").write_text("precious")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        train.run(smoke_cfg(**SINGLE), str(workdir), devices=ONE)


def test_a_workdir_that_is_a_file_or_inside_one_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("precious")
    for workdir, where in ((tmp_path / "file", "is a file"),
                           (tmp_path / "file" / "run", f"lies inside {tmp_path}/file, which is")):
        with pytest.raises(NotADirectoryError, match=f"^Workdir {workdir} {where}"):
            train.run(smoke_cfg(**SINGLE), str(workdir), devices=ONE)
    assert (tmp_path / "file").read_text() == "precious"


def test_tokenizer_that_is_not_a_model(tmp_path):
    path = tmp_path / "sp.model"
    path.write_bytes(b"not a protobuf")
    cfg = smoke_cfg(**SINGLE)
    cfg.data.tokenizer = str(path)
    with pytest.raises(ValueError, match=f"Tokenizer file {path} is not a SentencePiece model."):
        train.run(cfg, str(tmp_path / "run"), devices=ONE)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value,message", [
    ("on_nonfinite", "ignore", "train.on_nonfinite='ignore' is not one of ('stop', 'skip')"),
    ("spike_factor", 0.5, "train.spike_factor=0.5 must be above 1 (or 0 = off)"),
])
def test_guard_settings_are_validated(key, value, message):
    cfg = smoke.get_config()
    cfg.train[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate.validate(cfg, 8)


@pytest.mark.slow
def test_force_resume_through_the_cli(finished, tmp_path):
    """The CLI names the differing key in one line; --force_resume goes on (and a model change
    then fails on every checkpoint, with nothing moved)."""
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    base = [sys.executable, "-m", "lmjax", "train", "--config=configs/smoke.py",
            f"--workdir={workdir}", "--config.mesh.data=1", "--config.model.mlp_dim=128"]
    env = {**os.environ, "XLA_FLAGS": xla.flags(1)}
    out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert last.startswith("lmjax train: Workdir") and "different model.mlp_dim;" in last
    out = subprocess.run(base + ["--force_resume"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert last.startswith("lmjax train: No checkpoint in") and "step 10:" in last
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]


# ------------------------------------------------------------------ metrics.jsonl


def test_a_row_torn_by_a_crash_is_dropped_on_resume_with_one_warning(tmp_path, capsys):
    rows = [json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 4, "train/lo')
    writer = metrics.Writer(str(tmp_path), resume_step=3)
    warning = capsys.readouterr().out
    assert warning == (f"warning: dropped line 4 of {tmp_path}/metrics.jsonl: a row cut short "
                       f"by a crash mid-write; its step is logged again.\n")
    writer.write(4, {"train/loss": 2.0})
    writer.close()
    assert [r["step"] for r in read_rows(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


class FullDisk:
    """A file whose disk holds only half of the next write (then refuses, as a full disk)."""

    def __init__(self, file):
        self.file = file

    def write(self, data: bytes) -> int:
        return self.file.write(data[:len(data) // 2])

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_row_is_written_whole_or_not_at_all_and_made_durable_on_save(tmp_path, monkeypatch):
    writer = metrics.Writer(str(tmp_path))
    writer.write(1, {"train/loss": 1.0})
    synced = []
    monkeypatch.setattr(metrics.os, "fsync", synced.append)
    writer.flush()  # what train does before every checkpoint
    assert synced == [writer.file.fileno()]
    writer.file = FullDisk(writer.file)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path}/metrics.jsonl'"):
        writer.write(2, {"train/loss": 2.0})
    writer.file = writer.file.file
    writer.close()
    assert [r["step"] for r in read_rows(tmp_path)] == [1]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")  # no half row


# ------------------------------------------------------------------ safety


def test_no_pickle_anywhere_in_the_package():
    """Loading checkpoints, data, tokenizers or weights must never unpickle (code execution)."""
    banned = ("import pickle", "allow_pickle=True", "torch.load(", "cloudpickle", "import dill")
    for folder, _, files in os.walk(os.path.join(ROOT, "lmjax")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                found = [b for b in banned if b in text]
                assert not found, f"{name} uses {found}"
