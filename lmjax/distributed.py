"""Join the other processes of a multi-host run, before JAX's backend starts.

Every host runs the same `lmjax train` command. `jax.distributed.initialize()` connects them
through a coordinator (process 0): after it, `jax.devices()` lists every host's devices, the
mesh spans them all, and each process feeds its own rows of the batch (sharding.to_global).

How a process learns its place, first match wins:
  1. flags `--coordinator=HOST:PORT --num_processes=N --process_id=I`;
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what
     launch/multiprocess_local.py sets, and JAX itself reads the first);
  3. a cluster JAX recognises by itself: a Cloud TPU pod, SLURM (srun), Open MPI (mpirun).
Otherwise the run is one process and nothing is called: `initialize` would wait for peers that
never come. Which GPUs each process drives: `local_devices`.

A dead peer must not hang the others: every process sends heartbeats to the coordinator, and
when one stops (`heartbeat_timeout` seconds) the coordination service aborts the rest with
"Terminating process because the JAX distributed service detected fatal errors ... another
task died". A peer that never arrives fails start-up after `init_timeout` seconds.

A preemption notice (SIGTERM, a TPU maintenance event) reaches the training loop through
`preemption_notice`, on one process or many. The loop saves, then raises `Preempted`, and the
command exits with `PREEMPTED` (75) on every host: not 0, so a launcher or a sweep can tell a
run that must be resumed from one that finished.
"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmjax import lease

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
LOCAL_ENV = "JAX_LOCAL_DEVICE_IDS"  # JAX reads it too, but only when given no ids
LOCAL_RANK = ("SLURM_LOCALID", "LOCAL_RANK")  # a process's index on its node: srun, torchrun
PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; the same command resumes


class Preempted(SystemExit):
    """The run saved its step at a preemption notice and stopped; the same command resumes.
    A SystemExit: the command's exit status is PREEMPTED, with no further message."""

    def __init__(self):
        super().__init__(PREEMPTED)


@contextlib.contextmanager
def stop_on_lost_peer():
    """Turn a failed collective of a multi-process run into one line and an immediate exit.

    When a peer dies, the survivors' next collective fails (gloo: "Connection closed by peer")
    deep in a traceback, and the normal exit then waits on a shutdown barrier the dead peer
    never reaches. Exiting at once instead stops this process's heartbeats, so any peer still
    waiting is released within the heartbeat timeout too.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        print(f"lmjax: process {jax.process_index()} of {jax.process_count()} stops: a device "
              f"call failed ({str(e).splitlines()[0][:300]}); in a multi-process run this "
              f"usually means another process died, see its log.", file=sys.stderr, flush=True)
        os._exit(1)


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX would bootstrap from here, or None.

    JAX keeps its detectors (TPU pod metadata, SLURM_*, OMPI_*) in a private registry; asking it
    keeps our notion of "a cluster" identical to the one `initialize()` acts on. Opt-in ones
    (mpi4py: merely installed) do not count. The one private import of lmjax: JAX has no public
    "would initialize() find a cluster here" (jax.distributed only initializes, or fails after
    its timeout when no peer comes).
    """
    from jax._src.clusters import ClusterEnv

    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def _from_env(coordinator: str, num_processes: int, process_id: int) -> tuple[str, int, int]:
    """Flags win; unset ones (empty, 0, -1) are read from the JAX_* environment."""
    try:
        coordinator = coordinator or os.environ.get(ENV[0], "")
        num_processes = num_processes or int(os.environ.get(ENV[1], 0))
        process_id = process_id if process_id >= 0 else int(os.environ.get(ENV[2], -1))
    except ValueError:
        raise ValueError(f"{ENV[1]}={os.environ.get(ENV[1])!r} and {ENV[2]}="
                         f"{os.environ.get(ENV[2])!r} must be integers.") from None
    return coordinator, num_processes, process_id


def _device_numbers(text: str, name: str) -> list[int]:
    """`0,1` -> [0, 1]; anything else is refused in one sentence naming where it came from."""
    try:
        numbers = [int(x) for x in text.split(",")]
    except ValueError:
        numbers = [-1]
    if min(numbers) < 0:
        raise ValueError(f"{name}={text!r} must be a device number, or several separated by "
                         f"commas (e.g. 0 or 0,1).")
    return numbers


def local_devices(env: Mapping[str, str], flag: str = "", explicit: bool = False
                  ) -> list[int] | None:
    """The devices this process drives (jax.distributed.initialize's local_device_ids), or None
    to let JAX choose: every local device, or on SLURM / Open MPI the one numbered by the task's
    local rank. JAX applies the ids to GPUs only; TPU and CPU ignore them.

    `--local_device_ids` (else $JAX_LOCAL_DEVICE_IDS) wins. Otherwise a process whose
    CUDA_VISIBLE_DEVICES names one GPU (SLURM's --gpus-per-task=1) gets [0]: that GPU is its
    device 0, while JAX's SLURM detection would ask for device SLURM_LOCALID, which no task but
    a node's first has. With an `explicit` coordinator (flags or JAX_*), JAX numbers a GPU only
    in a cluster it recognises, so elsewhere every process would claim all of the node's: the
    local rank (SLURM_LOCALID, else LOCAL_RANK) picks one, one process per GPU, unless
    CUDA_VISIBLE_DEVICES leaves none.
    """
    if flag or env.get(LOCAL_ENV):
        name = "--local_device_ids" if flag else LOCAL_ENV
        return _device_numbers(flag or env[LOCAL_ENV], name)
    cuda = env.get("CUDA_VISIBLE_DEVICES")
    gpus = None if cuda is None else len([d for d in cuda.split(",") if d.strip()])  # None: all
    if gpus == 1:
        return [0]
    rank = next((name for name in LOCAL_RANK if env.get(name)), None)
    if explicit and rank and gpus != 0:
        return _device_numbers(env[rank], rank)
    return None


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               init_timeout: int = 300, heartbeat_timeout: int = 100,
               local_device_ids: str = "") -> bool:
    """Connect this process to its peers if it is one of several; returns whether it did.

    Call before anything touches a device (jax.devices(), a jit): the backend is created once.
    `local_device_ids`: comma-separated device numbers, "" for `local_devices`' choice.
    """
    coordinator, num_processes, process_id = _from_env(coordinator, num_processes, process_id)
    have = {"--coordinator": bool(coordinator), "--num_processes": num_processes > 0,
            "--process_id": process_id >= 0}
    if any(have.values()) and not all(have.values()):
        missing = ", ".join(flag for flag, ok in have.items() if not ok)
        raise ValueError(f"Multi-process training needs --coordinator, --num_processes and "
                         f"--process_id together (or {', '.join(ENV)}); {missing} is missing.")
    devices = local_devices(os.environ, local_device_ids, explicit=bool(coordinator))
    if coordinator:
        if ":" not in coordinator:
            raise ValueError(f"--coordinator={coordinator!r} must be HOST:PORT.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}) for "
                             f"--num_processes={num_processes}.")
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   local_device_ids=devices,
                                   initialization_timeout=init_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
        return True
    if detected_cluster() is None:
        return False
    jax.distributed.initialize(local_device_ids=devices, initialization_timeout=init_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    return True


def _sync_point(step: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False


@contextlib.contextmanager
def preemption_notice():
    """Yield `preempted(step) -> bool`, to be asked once a step.

    One process: SIGTERM sets a flag, and so does a first SIGINT (Ctrl-C): the loop saves the
    step in flight and raises Preempted, and for Ctrl-C this context raises the interrupt
    (KeyboardInterrupt: the CLI exits 130, as a shell does). The first Ctrl-C also hands SIGINT
    back to the operating system, so a second one ends the process at once, mid-save or not:
    the step before is intact, and an unfinished write is removed on the next start.
    Several processes: JAX's preemption sync point (its coordination service hears SIGTERM and,
    on Cloud TPU, maintenance notices), which tells every host the same step to stop at, so all
    of them take part in the same save; Ctrl-C there stops at once, as Python's default.
    """
    if jax.process_count() > 1:
        yield _sync_point
    elif threading.current_thread() is not threading.main_thread():  # signals need the main one
        yield lambda step: False
    else:
        notice, interrupted = threading.Event(), threading.Event()

        def interrupt(signum, frame) -> None:
            notice.set()
            interrupted.set()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            with contextlib.suppress(OSError):  # a raw write: no buffer to re-enter
                os.write(2, b"\nInterrupted: saving at the end of this step (Ctrl-C again to "
                         b"quit at once, without saving).\n")

        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: notice.set()),
                    signal.SIGINT: signal.signal(signal.SIGINT, interrupt)}
        try:
            yield lambda step: notice.is_set()
        except Preempted:
            if not interrupted.is_set():
                raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if interrupted.is_set():  # Ctrl-C's save is done: now the interrupt (exit 130)
            raise KeyboardInterrupt


class _NoLease:
    """What processes other than 0 hold: process 0 alone keeps (and checks) the lease."""

    lost = ""

    def check(self) -> None:
        pass


@contextlib.contextmanager
def workdir_lease(workdir: str, timeout: float):
    """Hold the workdir's lease (lmjax/lease.py) for the run, on behalf of every process.

    Process 0 takes it and tells the others its number and run id; each reads that record back
    from the workdir. A process that cannot is looking at another folder (a local path on a pod
    whose hosts share no disk), so the run is refused, by every process, before any step.
    """
    held, refused = None, ""
    if jax.process_index() == 0:
        try:
            held = lease.acquire(workdir, timeout, jax.process_count())
        except lease.Busy as e:
            refused = str(e)
    try:
        if jax.process_count() > 1:
            _check_shared(workdir, held, refused)
        if refused:
            raise lease.Busy(refused)
        yield held or _NoLease()
    finally:
        if held is not None:
            held.release()


def _check_shared(workdir: str, held: lease.Lease | None, refused: str) -> None:
    """Every process reads process 0's lease record from the workdir, or all refuse."""
    mine = np.array([held.number, held.run_id] if held else [-1, 0], np.int32)
    number, run_id = (int(x) for x in multihost_utils.broadcast_one_to_all(mine))
    if number < 0:
        raise lease.Busy(refused or f"Process 0 could not take the lease of workdir {workdir}; "
                                    f"its log says why.")
    sees = lease.holds(workdir, number, run_id) if held is None else True
    seen = multihost_utils.process_allgather(np.array(sees))
    blind = [i for i, ok in enumerate(np.ravel(seen)) if not ok]
    if blind:
        raise ValueError(f"Workdir {workdir} is not one folder shared by all "
                         f"{jax.process_count()} processes: process(es) {blind} cannot read "
                         f"the lease process 0 wrote there (a local path on hosts that share "
                         f"no disk?); use a gs:// workdir.")
