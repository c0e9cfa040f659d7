"""The cluster launchers, through their --dry_run: the exact commands they would run."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from etils import epath

from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_gcloud.py")
MESH = {"mesh.data": "1", "mesh.fsdp": "8", "mesh.rules": "fsdp"}  # FSDP over both hosts
TRAIN = ["lmjax", "train", "--config=configs/llama.py:1b", "--workdir=gs://bucket/run",
         "--config.mesh.fsdp=-1"]


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_tpu_pod_dry_run_prints_create_copy_setup_start_watch_delete():
    out = launch("tpu_pod.py", "--tpu=pod", "--zone=us-east5-a", "--project=p",
                 "--accelerator=v5p-64", "--version=v2-alpha-tpuv5", "--create", "--queued",
                 "--spot", "--delete", "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=1", "--dry_run", "--",
                 *TRAIN)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    where = ["--zone=us-east5-a", "--project=p"]
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert shlex.split(lines[0]) == [*qr, "create", "pod", "--node-id=pod",
                                     "--accelerator-type=v5p-64",
                                     "--runtime-version=v2-alpha-tpuv5", "--spot", *where]
    assert lines[1].endswith("# until it prints ACTIVE")
    assert shlex.split(lines[1].split("  #")[0]) == [*qr, "describe", "pod",
                                                     "--format=value(state.state)", *where]
    assert lines[2].startswith("bash -c 'set -o pipefail && ") and "git rev-parse" in lines[2]
    assert shlex.split(lines[3]) == [*vm, "scp", "/tmp/lmjax-pod.tar.gz", "pod:lmjax.tar.gz",
                                     "--worker=all", *where]
    setup, begin = (shlex.split(line) for line in lines[4:6])
    assert setup[:7] == begin[:7] == [*vm, "ssh", "pod", "--worker=all"]
    setup, begin = setup[7].removeprefix("--command="), begin[7].removeprefix("--command=")
    assert "uv venv -q --python 3.11 ~/lmjax/venv" in setup and "-c constraints.txt" in setup
    assert "rm -f /tmp/libtpu_lockfile" in setup and "kill -9 -$(cat ~/lmjax/pid" in setup
    assert begin.startswith(
        "printf %s 'export LIBTPU_INIT_ARGS=--xla_tpu_x=1; ~/lmjax/venv/bin/python -m lmjax "
        "train --config=configs/llama.py:1b --workdir=gs://bucket/run --config.mesh.fsdp=-1; "
        "echo $? > ~/lmjax/RUN.rc' > ~/lmjax/RUN.sh && ")
    assert "setsid nohup bash ~/lmjax/RUN.sh > ~/lmjax/RUN.log" in begin
    watch = [line for line in lines if line.endswith("  # polled")]
    assert len(watch) == 3 and "cat ~/lmjax/RUN.rc" in watch[1]
    assert shlex.split(lines[-1]) == [*qr, "delete", "pod", "--force", "--quiet", *where]
    assert len(lines) == 10


def test_tpu_pod_on_an_existing_slice_only_copies_runs_and_watches():
    out = launch("tpu_pod.py", "--tpu=pod", "--dry_run", "--", *TRAIN)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 7  # pack, scp, setup, start, 3 watched
    assert not any("create" in line or "delete" in line or "--zone" in line for line in lines)


def test_tpu_pod_passes_quotes_and_dollars_as_typed():
    out = launch("tpu_pod.py", "--tpu=pod", "--dry_run", "--", "lmjax", "train", "--x=$HOME",
                 "--y=it's \"q\"")
    [begin] = [shlex.split(line)[7] for line in out.stdout.splitlines() if "setsid" in line]
    script = shlex.split(begin.removeprefix("--command="))[2]  # printf %s SCRIPT
    assert shlex.split(script.split("; ")[0])[3:] == ["train", "--x=$HOME", "--y=it's \"q\""]


def test_sweep_tpu_runner_commands_run_the_pod_launcher(tmp_path, bucket):
    """`lmjax sweep --runner=tpu --dry_run` prints one tpu_pod.py command per member; each,
    given --dry_run, is accepted by the launcher and starts that member's train on every host.
    The root is on the test GCS server: the sweep looks there for finished members."""
    local = tmp_path / "sweep.py"
    local.write_text("from configs import smoke\n\ndef get_config(arg=None):\n"
                     "    return smoke.get_config()\n\ndef get_sweep():\n"
                     "    return [{'model.d_model': 16}, {'model.d_model': 32}]\n")
    out = subprocess.run([sys.executable, "-m", "lmjax", "sweep", f"--sweep={local}",
                          f"--root={bucket}/sweep", "--runner=tpu", "--tpu=pod", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == (  # the hosts get only the checkout
        f"lmjax sweep: --sweep={local} is outside this checkout, which is all the TPU hosts "
        f"receive: move it inside, or onto gs://.")
    sweep = f"{bucket}/sweep.py"
    epath.Path(sweep).write_text(local.read_text())
    out = subprocess.run([sys.executable, "-m", "lmjax", "sweep", f"--sweep={sweep}",
                          f"--root={bucket}/sweep", "--runner=tpu", "--tpu=pod", "--dry_run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines() if "tpu_pod.py" in line]
    assert len(commands) == 2
    for command, width in zip(commands, (16, 32), strict=True):
        assert command[1:3] == ["launch/tpu_pod.py", "--tpu=pod"]
        cut = command.index("--")
        pod = subprocess.run([*command[:cut], "--dry_run", *command[cut:]], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert pod.returncode == 0, pod.stderr
        start = [line for line in pod.stdout.splitlines() if "setsid" in line]
        assert len(start) == 1
        assert (f"~/lmjax/venv/bin/python -m lmjax train --config={sweep} "
                f"--workdir={bucket}/sweep/d_model={width} --config.model.d_model={width};"
                in shlex.split(start[0])[7])


@pytest.mark.parametrize("partition", ["", "gpu"])
def test_slurm_script_runs_one_task_per_gpu(partition):
    out = launch("slurm.py", "--nodes=4", "--gpus_per_node=8", f"--partition={partition}",
                 "--venv=/opt/venv", "--time=2:00:00", "--dry_run", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert script.startswith("#!/bin/bash\n")
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    expected = ["--job-name=lmjax", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                "--cpus-per-task=8", "--time=2:00:00", f"--output={ROOT}/logs/%x-%j.out",
                "--exclusive"] + [f"--partition={partition}"] * bool(partition)
    assert [d.removeprefix("#SBATCH ") for d in directives] == expected
    assert "\nsource /opt/venv/bin/activate\n" in script
    assert ("\nsrun --kill-on-bad-exit=1 python -m lmjax train --config=configs/llama.py:1b "
            "--workdir=gs://bucket/run --config.mesh.fsdp=-1\n") in script
    assert "\nexport SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-8}\n" in script
    assert "{" not in script.replace("${SLURM_CPUS_PER_TASK:-8}", "").replace(
        "${XLA_FLAGS:-}", "")  # every placeholder filled


def test_slurm_overlap_flags_are_ones_xla_knows():
    """The script exports XLA:GPU's collective-overlap flags ahead of the user's XLA_FLAGS
    (--plain_xla: none); XLA aborts a process at start on a flag it does not know, and it
    parses every backend's flags, so a CPU process checks them."""
    [export] = [line for line in launch("slurm.py", "--dry_run", "--", *TRAIN).stdout.splitlines()
                if line.startswith("export XLA_FLAGS=")]
    flags = shlex.split(export.removeprefix("export XLA_FLAGS="))[0].split()
    assert flags[-1] == "${XLA_FLAGS:-}" and len(flags) > 5
    assert all(f.startswith("--xla_gpu_") for f in flags[:-1])
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                         env={**os.environ, "XLA_FLAGS": " ".join(flags[:-1]),
                              "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(3)"],
                         env={**os.environ, "XLA_FLAGS": "--xla_gpu_no_such_flag=true",
                              "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr
    plain = launch("slurm.py", "--plain_xla", "--dry_run", "--", *TRAIN).stdout
    assert "XLA_FLAGS" not in plain


@pytest.mark.parametrize("requeue, srun_exit", [(True, 75), (True, 1), (False, 75)])
def test_slurm_requeues_a_job_whose_tasks_saved_at_sigterm(tmp_path, requeue, srun_exit):
    """The rendered script, run by bash with stand-ins for srun and scontrol: only a job whose
    tasks exited 75 (saved at SIGTERM) with --requeue asks Slurm to requeue it."""
    out = launch("slurm.py", "--nodes=1", *["--requeue"] * requeue, "--dry_run", "--", "true")
    script = out.stdout
    assert ("#SBATCH --requeue\n#SBATCH --signal=TERM@300\n" in script) == requeue
    for name, body in (("srun", f"exit {srun_exit}"), ("scontrol", f'echo "$@" > {tmp_path}/c')):
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    ran = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert ran.returncode == srun_exit, ran.stderr
    requeued = (tmp_path / "c").read_text() if (tmp_path / "c").exists() else ""
    assert requeued == ("requeue 42\n" if requeue and srun_exit == 75 else "")


def test_slurm_needs_a_command():
    out = launch("slurm.py", "--nodes=2", "--dry_run")
    assert out.returncode == 1 and "give the command after --" in out.stderr




# ------------------------------------------------------------------ whole launches, fake gcloud


@pytest.fixture
def cloud(tmp_path):
    """A `gcloud` on PATH that is tests/fake_gcloud.py, keeping its slices under tmp_path."""
    state, bin_dir = tmp_path / "cloud", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/bash\nexec {sys.executable} {FAKE} "$@"\n')
    (bin_dir / "gcloud").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD": str(state),
            "XLA_FLAGS": xla.flags(4), "JAX_PLATFORMS": "cpu"}


def cloud_state(env) -> dict:
    """The slices and queued resources that exist."""
    with open(os.path.join(env["FAKE_GCLOUD"], "state.json")) as f:
        state = json.load(f)
    return {"nodes": state["nodes"], "queued": state["queued"]}


def pod(env, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "tpu_pod.py"),
                             "--tpu=pod", "--poll=0.5", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_tpu_pod_reports_the_failing_host_keeps_every_log_and_deletes_the_slice(cloud,
                                                                                tmp_path):
    code = "import os, sys; print('host', os.environ['JAX_PROCESS_ID']); sys.exit(" \
           "3 if os.environ['JAX_PROCESS_ID'] == '1' else 0)"
    workdir = tmp_path / "run"
    proc = pod(cloud, "--create", "--accelerator=v5p-16", "--delete", "--", "python3", "-c",
               code, f"--workdir={workdir}")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3, out
    assert "tpu_pod: host 1 of pod exited 3" in out
    [run] = os.listdir(workdir / "logs")
    assert [(workdir / "logs" / run / f"worker-{i}.log").read_text() for i in (0, 1)] == [
        "host 0\n", "host 1\n"]
    assert cloud_state(cloud) == {"nodes": {}, "queued": {}}  # deleted although it failed


def test_tpu_pod_multislice_refuses_a_mesh_that_does_not_span_the_slices():
    out = launch("tpu_pod.py", "--tpu=pod", "--num_slices=2", "--dry_run", "--", "lmjax",
                 "train", "--config=configs/smoke.py", "--workdir=gs://b/r")
    assert out.returncode == 2 and out.stderr.strip().endswith(
        "--num_slices=2 but the command's mesh.dcn_* multiply to 1 (all 1); set e.g. "
        "--config.mesh.dcn_data=2.")


def test_tpu_pod_multislice_gives_every_host_its_slice(cloud, tmp_path):
    """Two v5p-16 slices (2 hosts each) from one queued resource: every host gets the
    MEGASCALE_* of its slice, slice 0's host 0 as the coordinator; the mesh spans both."""
    workdir = tmp_path / "run"
    args = ["--create", "--queued", "--accelerator=v5p-16", "--num_slices=2", "--delete"]
    dry = launch("tpu_pod.py", "--tpu=pod", *args, "--dry_run", "--", "true")
    assert shlex.split(dry.stdout.splitlines()[0])[4:9] == [
        "create", "pod", "--node-count=2", "--node-prefix=pod", "--accelerator-type=v5p-16"]
    code = ("import os; print(*(os.environ[k] for k in ('MEGASCALE_SLICE_ID', "
            "'MEGASCALE_NUM_SLICES', 'MEGASCALE_COORDINATOR_ADDRESS')))")
    proc = pod(cloud, *args, "--", "python3", "-c", code, f"--workdir={workdir}")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    [run] = os.listdir(workdir / "logs")
    logs = {name: (workdir / "logs" / run / name).read_text() for name in
            os.listdir(workdir / "logs" / run)}
    assert logs == {f"slice-{i}-worker-{w}.log": f"{i} 2 10.0.0.0:8080\n" for i in (0, 1)
                    for w in (0, 1)}
    assert cloud_state(cloud) == {"nodes": {}, "queued": {}}


def test_a_pool_slice_is_made_once_kept_for_the_next_member_and_deleted_at_the_end(cloud):
    """What `lmjax sweep --tpu_count` asks of the launcher: `--create --reuse` makes the queued
    slice for the first member and keeps it for the next (gcloud refuses a name that exists:
    without --reuse the second launch fails); `--delete --`, no command, only deletes."""
    def launch(*flags):
        proc = pod(cloud, *flags, "--queued", "--spot", "--", "true")
        return proc.communicate(timeout=120)[0], proc.returncode

    first, code = launch("--create", "--reuse")
    assert code == 0 and first.count("queued-resources create pod") == 1, first
    second, code = launch("--create", "--reuse")
    assert code == 0 and "queued-resources create" not in second, second
    assert launch("--create")[1] == 1  # ALREADY_EXISTS
    assert list(cloud_state(cloud)["queued"]) == ["pod"]
    proc = pod(cloud, "--queued", "--delete", "--")
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "queued-resources delete pod" in out, out
    assert cloud_state(cloud) == {"nodes": {}, "queued": {}}


def test_tpu_pod_deletes_the_slice_on_ctrl_c(cloud):
    """Also when its parent left SIGINT blocked (children inherit the mask; something in a
    long pytest-xdist worker does it): the launcher unblocks it."""
    proc = pod(cloud, "--create", "--queued", "--delete", "--", "sleep", "300",
               preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}))
    deadline = time.monotonic() + 120
    while "sleep 300" not in proc.stdout.readline():  # the start command was sent
        assert time.monotonic() < deadline
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert cloud_state(cloud) == {"nodes": {}, "queued": {}}


@pytest.mark.slow
def test_tpu_pod_survives_a_spot_preemption_and_finishes_the_run(cloud, tmp_path):
    """Two hosts train the smoke model from a queued spot slice; after step 8 the slice is
    preempted (SIGTERM to both hosts, its disks gone, the queued resource SUSPENDED). The
    launcher re-creates it, copies the code again and starts the same command, which resumes
    from the workdir's checkpoint: every step logged once, the rows up to the checkpoint as
    first written, the slice deleted at the end."""
    workdir = tmp_path / "run"
    proc = pod(cloud, "--create", "--queued", "--spot", "--accelerator=v5p-16", "--delete",
               "--max_restarts=2", "--", "lmjax", "train", "--config=configs/smoke.py",
               f"--workdir={workdir}", "--config.checkpoint.every=5",
               *(f"--config.{k}={v}" for k, v in MESH.items()))
    deadline = time.monotonic() + 400
    while max(steps(workdir), default=0) < 8:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.5)
    subprocess.run([sys.executable, FAKE, "preempt", "pod"], env=cloud, check=True)
    first = steps(workdir)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "tpu_pod: TPU pod is SUSPENDED" in out
    # The hosts had 20 s after SIGTERM: they agreed on a step and saved it, so nothing is lost
    # (a preemption without that grace loses the steps after the newest checkpoint, and says so).
    said = re.search(r"tpu_pod: preempted \(newest checkpoint step (\d+), (nothing lost|steps "
                     r"\d+-\d+ logged since are lost)\); restart 1 of 2", out)
    assert said, out
    saved = int(said.group(1))
    assert 5 <= saved < 20
    final = steps(workdir)
    assert sorted(final) == list(range(1, 21))
    assert all(final[s] == first[s] for s in first if s <= saved)  # kept as written
    assert final[20] < final[1] - 0.5
    assert len(os.listdir(workdir / "logs")) == 1  # the finished attempt's logs
    assert cloud_state(cloud) == {"nodes": {}, "queued": {}}


@pytest.mark.slow
def test_a_sweep_on_a_counted_pool_survives_a_preemption(cloud, tmp_path):
    """`lmjax sweep --tpu=pool --tpu_count=2` on the fake cloud: three members on two queued
    spot slices the members' launches create; the first member's slice is preempted at step 6,
    its launcher re-creates it and resumes. Every member finishes once, every step of each is
    logged once, and the pool is deleted at the end."""
    root = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmjax", "sweep", "--sweep=tests/sweeps/pool.py",
         f"--root={root}", "--runner=tpu", "--tpu=pool", "--tpu_count=2",
         "--tpu_flags=--queued --spot --accelerator=v5p-8 --poll=0.5"],
        cwd=ROOT, env=cloud, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = root / "d_model=16"
    deadline = time.monotonic() + 400
    while max(steps(first), default=0) < 6:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.5)
    subprocess.run([sys.executable, FAKE, "preempt", "pool-0"], env=cloud, check=True)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "tpu_pod: preempted" in (first / "train.log").read_text()
    for width in (16, 32, 48):
        with open(root / f"d_model={width}" / "metrics.jsonl") as f:
            logged = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
        assert sorted(logged) == list(range(1, 13)), width  # each step once
    assert out.count("done d_model=") == 3 and "failed" not in out
    assert cloud_state(cloud) == {"nodes": {}, "queued": {}}


def steps(workdir) -> dict[int, float]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]
    except OSError:
        return {}
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
