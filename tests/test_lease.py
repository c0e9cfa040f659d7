"""The workdir lease (lmjax/lease.py): one run per workdir, on a disk and on a bucket (the GCS
API server of tests/gcs.py, which honours create-if-absent as GCS does)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from etils import epath

from lmjax import inference, lease
from tests.test_reliability import ROOT, subprocess_env


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("bucket") + "/run"


def _listing(workdir: str) -> list[str]:
    return sorted(p.name for p in (epath.Path(workdir) / "lease").iterdir())


def _stale(held: lease.Lease, seconds_ago: float, **changes) -> None:
    """As if the holder had stopped (killed, preempted) `seconds_ago`: no more heartbeats."""
    held._stop.set()
    held._thread.join()
    held.record.update(heartbeat=time.time() - seconds_ago, **changes)
    held.path.write_text(json.dumps(held.record))


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(workdir):
    first = lease.acquire(workdir, timeout=60)
    with pytest.raises(lease.Busy, match=f"Workdir {workdir} is in use by the run of pid "
                                         f"{os.getpid()} on host {socket.gethostname()}"):
        lease.acquire(workdir, timeout=60)
    first.check()  # still its own
    first.release()
    second = lease.acquire(workdir, timeout=60)  # a released lease is free at once
    assert second.number == first.number + 1
    assert _listing(workdir) == [f"{second.number}.json"]  # the older record is gone
    second.release()
    assert json.loads((epath.Path(workdir) / "lease" / f"{second.number}.json").read_text())[
        "released"]


def test_a_stale_lease_is_taken_over_and_its_holder_stops(workdir, capsys):
    old = lease.acquire(workdir, timeout=2)
    _stale(old, seconds_ago=10, host="elsewhere")
    with pytest.warns(UserWarning, match="taking over workdir .* from the run of pid .* on host "
                                         "elsewhere: its last heartbeat was 10 s ago"):
        new = lease.acquire(workdir, timeout=2)
    # the old run wakes (its heartbeat overdue): it looks at the store before going on
    with pytest.raises(lease.Busy, match="took over workdir .*; this run stops without saving"):
        old.check()
    old.release()  # marks nothing: the lease is not its own any more
    new.check()
    assert not json.loads(new.path.read_text()).get("released")
    new.release()


def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    held = lease.acquire(tmp_path, timeout=3600)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _stale(held, seconds_ago=0, pid=int(gone.stdout))  # fresh heartbeat, but no such process
    with pytest.warns(UserWarning, match="that process is no longer running"):
        lease.acquire(tmp_path, timeout=3600).release()


def test_the_heartbeat_keeps_a_live_run_from_being_taken_over(tmp_path):
    held = lease.acquire(tmp_path, timeout=0.5)  # a beat every 0.1 s
    time.sleep(1.0)  # twice the timeout: without heartbeats it would be stale
    with pytest.raises(lease.Busy, match="is in use"):
        lease.acquire(tmp_path, timeout=0.5)
    held.release()


def test_of_runs_racing_for_one_workdir_exactly_one_wins(workdir):
    won, refused = [], []

    def race():
        try:
            won.append(lease.acquire(workdir, timeout=60))
        except lease.Busy:
            refused.append(1)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    won[0].release()


def test_eval_and_sample_read_a_workdir_whose_lease_is_held(smoke_workdir, tmp_path):
    """They load through inference.load, which takes no lease: a running job can be read."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(smoke_workdir, workdir)
    held = lease.acquire(workdir, timeout=60)
    model, _, _ = inference.load(workdir)
    reference, _, _ = inference.load(smoke_workdir)
    held.release()
    assert np.array_equal(model.embed.embedding[...], reference.embed.embedding[...])


def _train(workdir: str, cache, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmjax", "train", "--config=configs/smoke.py",
         f"--workdir={workdir}", *overrides], cwd=ROOT, env=subprocess_env(str(cache)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_train_refuses_a_gs_workdir_in_use_in_one_sentence(bucket, tmp_path):
    workdir = f"{bucket}/busy"
    held = lease.acquire(workdir, timeout=60)
    out = _train(workdir, tmp_path).communicate(timeout=300)[0]
    held.release()
    assert f"lmjax train: Workdir {workdir} is in use by the run of pid {os.getpid()}" in out
    assert "Traceback" not in out
    assert _listing(workdir) == [f"{held.number}.json"]  # nothing else written
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.mark.slow
def test_two_runs_started_on_one_workdir_one_refuses_no_row_twice(tmp_path):
    workdir = str(tmp_path / "run")
    runs = [_train(workdir, tmp_path, "--config.train.steps=12") for _ in range(2)]
    outs = [r.communicate(timeout=600)[0] for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes[0] == 0 and codes[1] != 0, outs
    refused = outs[[r.returncode for r in runs].index(codes[1])]
    assert f"lmjax train: Workdir {workdir} is in use by the run of pid" in refused, refused
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert len(steps) == len(set(steps)) and steps[-1] == 12
