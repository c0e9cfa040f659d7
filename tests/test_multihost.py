"""Multi-host training on one machine: real processes on 127.0.0.1, 4 fake CPU devices each.

The slow tests train the smoke config with FSDP spanning two processes, stop it with a
preemption notice, resume it, and compare every step's loss with one process holding all eight
devices; and kill one process mid-run to check the other stops by itself, in bounded time.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from etils import epath

from lmjax import distributed
from tests import xla
from tests.test_multiprocess_data import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "multiprocess_local.py")
OVERRIDES = {"mesh.data": "1", "mesh.fsdp": "8", "mesh.rules": "fsdp"}  # FSDP over both hosts
CLUSTER_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", *distributed.ENV)


GPU_ENV = ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", distributed.LOCAL_ENV)


@pytest.fixture
def no_cluster(monkeypatch):
    for name in (*CLUSTER_ENV, *GPU_ENV):
        monkeypatch.delenv(name, raising=False)


def test_one_process_without_flags_or_cluster_does_not_initialize(no_cluster):
    assert distributed.detected_cluster() is None
    assert distributed.initialize() is False  # returns at once: nothing to wait for


def test_slurm_environment_is_detected(no_cluster, monkeypatch):
    for name, value in zip(CLUSTER_ENV[:5], ("7", "node[1-2]", "2", "0", "0"), strict=True):
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == "SlurmCluster"


@pytest.mark.parametrize("kwargs, env, message", [
    ({"coordinator": "127.0.0.1:1234"}, {}, "--num_processes, --process_id is missing"),
    ({"num_processes": 2, "process_id": 0}, {}, "--coordinator is missing"),
    ({}, {"JAX_NUM_PROCESSES": "2"}, "--coordinator, --process_id is missing"),
    ({"coordinator": "127.0.0.1", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, r"in \[0, 2\)"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "must be integers"),
])
def test_bad_flags_fail_in_one_sentence(no_cluster, monkeypatch, kwargs, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)


@pytest.mark.parametrize("env, flag, explicit, ids", [
    ({}, "", True, None),  # nothing known: JAX decides (every local device; TPU, CPU)
    ({"CUDA_VISIBLE_DEVICES": "5"}, "", False, [0]),  # --gpus-per-task=1: its GPU is device 0
    ({"CUDA_VISIBLE_DEVICES": "5", "SLURM_LOCALID": "3"}, "", True, [0]),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_LOCALID": "3"}, "", True, [3]),
    ({"SLURM_LOCALID": "2"}, "", True, [2]),  # every GPU of the node visible
    ({"LOCAL_RANK": "1"}, "", True, [1]),  # torchrun-style launchers
    ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_LOCALID": "1"}, "", False, None),  # JAX's own rule
    ({"CUDA_VISIBLE_DEVICES": "", "LOCAL_RANK": "1"}, "", True, None),  # no GPU at all
    ({"CUDA_VISIBLE_DEVICES": "5", "SLURM_LOCALID": "3"}, "2,3", True, [2, 3]),  # flag wins
    ({"CUDA_VISIBLE_DEVICES": "5", distributed.LOCAL_ENV: "1"}, "", False, [1]),
    ({distributed.LOCAL_ENV: "1"}, "0", True, [0]),
])
def test_local_devices(env, flag, explicit, ids):
    assert distributed.local_devices(env, flag, explicit) == ids


@pytest.mark.parametrize("env, flag, message", [
    ({}, "a", r"--local_device_ids='a' must be a device number"),
    ({}, "0,,1", r"--local_device_ids='0,,1' must be"),
    ({}, "-1", r"--local_device_ids='-1' must be"),
    ({distributed.LOCAL_ENV: "x"}, "", r"JAX_LOCAL_DEVICE_IDS='x' must be"),
    ({"LOCAL_RANK": "one"}, "", r"LOCAL_RANK='one' must be"),
])
def test_bad_local_device_ids_fail_in_one_sentence(env, flag, message):
    with pytest.raises(ValueError, match=message):
        distributed.local_devices(env, flag, explicit=True)


@pytest.fixture
def initialize_calls(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    return calls


def test_initialize_passes_local_device_ids(no_cluster, monkeypatch, initialize_calls):
    assert distributed.initialize("h:1", 2, 1, local_device_ids="0,1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed.initialize("h:1", 2, 1)
    monkeypatch.delenv("SLURM_LOCALID")
    assert distributed.initialize("h:1", 2, 1)
    assert [kw["local_device_ids"] for _, kw in initialize_calls] == [[0, 1], [1], None]
    assert initialize_calls[0][0] == ("h:1", 2, 1)


def test_slurm_task_with_one_gpu_drives_its_device_0(no_cluster, monkeypatch, initialize_calls):
    for name, value in zip(CLUSTER_ENV[:5], ("7", "node[1-2]", "16", "3", "3"), strict=True):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # --gpus-per-task=1: not device 3 in here
    assert distributed.initialize()
    assert initialize_calls == [((), {"local_device_ids": [0], "initialization_timeout": 300,
                                      "heartbeat_timeout_seconds": 100})]


def test_a_bad_local_device_ids_flag_fails_before_initialize(no_cluster, initialize_calls):
    with pytest.raises(ValueError, match=r"^--local_device_ids='a' must be .*\.$"):
        distributed.initialize("h:1", 2, 0, local_device_ids="a")
    assert initialize_calls == []


def test_a_failed_device_call_of_a_single_process_keeps_its_traceback():
    import jax

    with pytest.raises(jax.errors.JaxRuntimeError, match="boom"):
        with distributed.stop_on_lost_peer():  # only a multi-process run exits in one line
            raise jax.errors.JaxRuntimeError("UNKNOWN: boom")


def test_restore_refuses_a_checkpoint_of_another_process_count(smoke_workdir, tmp_path):
    """As if two processes had written it: the data item holds one file per process."""
    import shutil

    from lmjax import checkpoint, config

    workdir = tmp_path / "copy"
    shutil.copytree(smoke_workdir, workdir)
    mngr = checkpoint.manager(str(workdir), config.from_workdir(str(workdir)).checkpoint)
    data = workdir / "checkpoints" / str(mngr.latest_step()) / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    with pytest.raises(ValueError, match=f"Checkpoint step {mngr.latest_step()} in .* was written "
                                         "by 2 processes but this run has 1; resume with 2"):
        checkpoint.restore(mngr, abstract_state=None)  # refused before anything is read
    mngr.close()


def _launch(*args: str, env: dict | None = None, timeout: float = 600):
    """The launcher adds each process's device count to the XLA flags it is given."""
    env = {**os.environ, "XLA_FLAGS": xla.FAST_COMPILE, **(env or {})}
    return subprocess.run([sys.executable, LAUNCH, *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def test_launcher_dry_run_prints_each_process_command():
    out = _launch("3", "--devices_per_process=2", "--port=4321", "--logdir=L", "--dry_run", "--",
                  "lmjax", "train", "--config=configs/smoke.py", "--workdir=/tmp/w",
                  env={"XLA_FLAGS": "--xla_dump_to=D --xla_force_host_platform_device_count=8"},
                  timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"JAX_COORDINATOR_ADDRESS=127.0.0.1:4321 JAX_NUM_PROCESSES=3 "
                               f"JAX_PROCESS_ID={i} JAX_PLATFORMS=cpu "
                               "XLA_FLAGS='--xla_dump_to=D "
                               "--xla_force_host_platform_device_count=2' ")
        assert " train --config=configs/smoke.py --workdir=/tmp/w > L/process_" in line
        assert line.endswith(f"process_{i}.log")


def test_launcher_stops_the_others_and_names_the_failed_process(tmp_path):
    code = ("import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); print('hello', i); "
            "time.sleep(0.5) if i == 1 else time.sleep(300); sys.exit(3)")
    start = time.monotonic()
    out = _launch("2", f"--logdir={tmp_path}", "--", sys.executable, "-c", code, timeout=120)
    assert out.returncode == 1
    assert time.monotonic() - start < 100  # process 0 was killed, not waited for
    assert "process 1 of 2 failed with exit code 3; stopped the others" in out.stderr
    assert (tmp_path / "process_0.log").read_text() == "hello 0\n"
    assert (tmp_path / "process_1.log").read_text() == "hello 1\n"


def _losses(workdir: str) -> dict[int, float]:
    rows = (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["train/loss"] for row in map(json.loads, rows)}


def _train_args(workdir: str) -> list[str]:
    return ["-m", "lmjax", "train", "--config=configs/smoke.py", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def _hosts(workdir: str, folder, faults: dict[int, str] | None = None, timeout: float = 600,
           extra: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """Two processes as two hosts of a pod: 4 devices each, each in its own empty local
    folder (no disk shared), meeting through a coordinator on 127.0.0.1; (exit code, output)
    of each. `faults`: process -> its LMJAX_FAULT."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla.flags(4),
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    env.pop("LMJAX_FAULT", None)
    procs = []
    for i in range(2):
        cwd = folder / f"host{i}"
        cwd.mkdir(parents=True, exist_ok=True)
        fault = {"LMJAX_FAULT": (faults or {})[i]} if i in (faults or {}) else {}
        procs.append(subprocess.Popen(
            [sys.executable, *_train_args(workdir), *extra], cwd=cwd, text=True,
            env={**env, "JAX_PROCESS_ID": str(i), "PYTHONPATH": ROOT, **fault},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def _succeed(results: list[tuple[int, str]], code_wanted: int = 0) -> None:
    for code, out in results:
        assert code == code_wanted, out[-3000:]


@pytest.mark.slow
def test_two_hosts_sharing_no_disk_train_checkpoint_resume_on_gs_equal_one_process(
        tmp_path, bucket):
    """Two hosts on a gs:// workdir, each in its own empty folder, through two faults and
    three starts of the same command: host 1 SIGKILLed mid-save, then SIGTERMed alone; the
    finished run equals one process holding all eight devices."""
    from lmjax import checkpoint, config, train

    cfg = config.load(os.path.join(ROOT, "configs", "smoke.py"),
                      [f"{k}={v}" for k, v in OVERRIDES.items()])
    train.run(cfg, str(tmp_path / "one"))  # one process, all 8 devices
    reference = _losses(str(tmp_path / "one"))
    assert sorted(reference) == list(range(1, cfg.train.steps + 1))

    two, every = f"{bucket}/two", ("--config.checkpoint.every=5",)
    # 1. Host 1 is SIGKILLed as its part of step 10's async save is in flight (the OOM killer,
    # a lost VM). Host 0, left in a collective or a save barrier, exits non-zero by itself
    # (bounded by the timeout), and step 10 is never committed: step 5 is the newest.
    killed = _hosts(two, tmp_path, faults={1: "save:10"}, timeout=300,
                    extra=(*every, "--heartbeat_timeout=10"))
    assert killed[1][0] == -9, killed[1][1][-2000:]
    assert killed[0][0] != 0 and ("lmjax: process 0 of 2 stops: a device call failed" in
                                  killed[0][1] or "another task died" in killed[0][1]), \
        killed[0][1][-2000:]
    # (no listing of checkpoints/ here: gcsfs would serve this process the stale list later)
    assert checkpoint.is_complete(two, 5) and not checkpoint.is_complete(two, 10)
    first = _losses(two)
    assert 10 <= max(first) < cfg.train.steps

    # 2. A preemption notice (SIGTERM) reaches host 1 alone, after step 13 (a maintenance event
    # on one host): through JAX's preemption sync point both agree on a step, both write their
    # part of its checkpoint to the bucket, and both exit with PREEMPTED (75), not 0.
    results = _hosts(two, tmp_path, faults={1: "term:13"}, extra=every)
    _succeed(results, distributed.PREEMPTED)
    said = [re.findall(r"Preempted: saved step (\d+) in ", out) for _, out in results]
    assert said[0] == said[1] and len(said[0]) == 1, results[0][1][-3000:]
    stopped = int(said[0][0])  # the unsignalled host stopped at the same step
    assert 13 <= stopped < cfg.train.steps and checkpoint.is_complete(two, stopped)
    before = _losses(two)
    assert sorted(before) == list(range(1, stopped + 1))
    assert all(before[step] == first[step] for step in first)  # resumed from 5: bitwise

    # 3. The same command finishes the run.
    _succeed(_hosts(two, tmp_path, extra=every))
    after = _losses(two)
    assert sorted(after) == sorted(reference)
    for step, loss in reference.items():
        assert after[step] == pytest.approx(loss, rel=1e-5), step
        if step <= stopped:
            assert before[step] == after[step]  # rows before the stop are kept as written
    assert after[cfg.train.steps] < after[1] - 0.5  # it learned
    for host in ("host0", "host1"):  # neither host kept anything on its own disk
        assert not any((tmp_path / host).iterdir())

    # One process cannot take over what two wrote: their data positions are per process.
    with pytest.raises(ValueError, match="written by 2 processes but this run has 1; resume "
                                         "with 2 processes"):
        train.run(cfg, two)


def test_a_local_workdir_that_hosts_do_not_share_is_refused_before_any_step(tmp_path):
    """`--workdir=run` on two hosts is two folders: both refuse, in one sentence."""
    for code, out in _hosts("run", tmp_path, timeout=300):
        assert code == 1, out[-3000:]
        assert "lmjax train: Workdir run is not one folder shared by all 2 processes: " \
               "process(es) [1] cannot read the lease process 0 wrote there" in out, out[-3000:]
        assert "Traceback" not in out
    assert not (tmp_path / "host1" / "run" / "checkpoints").exists()
