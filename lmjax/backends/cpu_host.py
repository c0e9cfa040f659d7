"""XLA:CPU's host process: glibc's malloc set for its per-step buffers, before JAX starts.

Applied at one point, lmjax.cli.main, and only where it pays: a command that runs steps on this
host's CPU (COMMANDS), on Linux, with no accelerator in sight. It imports nothing heavy
(the re-exec happens before anything heavy is loaded).
"""

import glob
import os
import sys

# glibc's malloc hands every buffer over 32 MiB straight back to the kernel when it is freed, so
# XLA:CPU's per-step temporaries (one 445 MB buffer for the bench model) page-fault back in,
# zeroed, 4 KiB at a time, on every step: ~130k faults, a quarter of the step's CPU time
# (strace, perf). Backing them by transparent huge pages makes that 512x fewer faults (bench
# step 450 -> 350 ms, the same peak RSS; docs/performance.md). glibc reads tunables only at
# start-up, hence the re-exec.
HOST_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def tune_host_malloc(argv: list[str]) -> None:
    """Restart this process (same PID, same arguments) with HOST_MALLOC_TUNABLE added to
    GLIBC_TUNABLES, once. LMJAX_HOST_MALLOC=default keeps glibc's defaults."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables
            or os.environ.get("LMJAX_HOST_MALLOC") == "default"):
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HOST_MALLOC_TUNABLE]))}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lmjax", *argv[1:]], env)


COMMANDS = ("train", "bench", "eval", "sample", "coord-check")  # the ones that run XLA:CPU steps
ACCELERATORS = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")  # TPU VMs, GPU hosts


def runs_on_cpu() -> bool:
    """Whether JAX will pick its CPU backend: JAX_PLATFORMS says so, or no TPU or GPU device
    file exists (decided without importing JAX, which the re-exec would load twice)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATORS)


def prepare(argv: list[str]) -> None:
    """tune_host_malloc for a command in COMMANDS that will run on the CPU; else nothing."""
    if len(argv) > 1 and argv[1] in COMMANDS and runs_on_cpu():
        tune_host_malloc(argv)
