"""Where numbers go: metrics.jsonl (the record every tool reads), TensorBoard, and the MFU peak.

MFU needs a peak. Accelerators use their datasheet's dense bf16 figure (chips.py); a CPU has no
honest datasheet figure, so its peak is measured: the rate of a jitted float32 matmul in this
process.
"""

import io
import json
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import chips, paths


def measured_matmul_flops(n: int = 1024, seconds: float = 0.5, min_repeats: int = 10) -> float:
    """FLOP/s of a jitted f32 n x n matmul on the default device: the fastest of the runs made
    in `seconds` (at least `min_repeats`). The fastest, because anything else the machine does
    only slows a run down; with 5 runs the figure varied 2x between processes on a shared 2-core
    VM, which moved MFU as much (docs/performance.md)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best, repeats, deadline = float("inf"), 0, time.perf_counter() + seconds
    while repeats < min_repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
        repeats += 1
    return 2 * n**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    """Datasheet peak for the accelerators in chips.py; the measured matmul rate otherwise."""
    chip = chips.lookup((device or jax.devices()[0]).device_kind)
    return measured_matmul_flops() if chip is None else chip.peak_flops


def peak_chips(devices: list) -> int:
    """How many device peaks a run's MFU divides by. Fake CPU devices
    (--xla_force_host_platform_device_count) share the host's cores, whose whole rate the
    measured matmul already is: one per process, however many devices."""
    if devices[0].platform == "cpu":
        return len({d.process_index for d in devices})
    return len(devices)


class Writer:
    """metrics.jsonl plus TensorBoard, written by process 0 only.

    On resume, rows past the restored step are dropped: they came from steps that are about to
    be run again, and a step must never appear twice.

    A bucket (gs://) has no append, and tensorboardX writes there only through TensorFlow. So on
    a URL workdir the rows are kept in memory and metrics.jsonl is written again whole, and
    TensorBoard's events go to a local temporary folder copied to WORKDIR/tensorboard: both in
    `flush()`, at most every `upload_every` seconds from `write` (an object takes about one
    write a second), before every checkpoint (train calls flush first, so a restored step never
    misses its rows) and on close. A local workdir is appended to, row by row, as always.
    """

    def __init__(self, workdir: str, resume_step: int = 0, upload_every: float = 30.0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        root = paths.resolve(workdir)
        self.path, self.remote = root / "metrics.jsonl", paths.is_url(root)
        kept = []
        if self.path.exists():
            kept = [line for line in io.StringIO(self.path.read_text())  # no newline: a row
                    if line.endswith("\n") and json.loads(line)["step"] <= resume_step]  # torn
            if not self.remote:
                self.path.write_text("".join(kept))
        if self.remote:
            self.rows, self.upload_every = kept, upload_every
            self.tb_dir = tempfile.mkdtemp(prefix="lmjax-tensorboard-")
            self.tb_remote = root / "tensorboard"
            self.flush_files()
        else:
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
            self.tb_dir = str(root / "tensorboard")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if self.remote:
            self.rows.append(json.dumps(row) + "\n")
        else:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        if self.remote and time.monotonic() - self.flushed >= self.upload_every:
            self.flush()

    def flush(self) -> None:
        """Make every row written so far durable in the workdir (a local file already is)."""
        if self.enabled and self.remote:
            self.tb.flush()
            self.flush_files()

    def flush_files(self) -> None:
        self.path.write_text("".join(self.rows))
        paths.upload_tree(self.tb_dir, self.tb_remote)
        self.flushed = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self.tb.close()
        if self.remote:
            self.flush_files()
            shutil.rmtree(self.tb_dir)
        else:
            self.file.close()


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
