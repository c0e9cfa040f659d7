"""Where numbers go: metrics.jsonl (the record every tool reads), TensorBoard, Weights & Biases,
and the MFU peak.

MFU needs a peak. Accelerators use their datasheet's dense bf16 figure (chips.py); a CPU has no
honest datasheet figure, so its peak is measured: the rate of a jitted float32 matmul in this
process.
"""

import errno
import importlib.util
import io
import json
import os
import secrets
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import lmjax
from lmjax import chips, paths

# train.loggers' names. metrics.jsonl cannot be turned off: resume truncates it, and sweeps,
# collect and fits read it, so a run without it would be lost to every tool downstream.
LOGGERS = ("jsonl", "tensorboard", "wandb")
DEFAULT_LOGGERS = "tensorboard,jsonl"


def loggers(value: str) -> tuple[str, ...]:
    """train.loggers as names, checked: one sentence for a name that is not a logger, a list
    without 'jsonl', or 'wandb' without the wandb package (validate calls this before compiling)."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"train.loggers={value!r} names {name!r}, which is not one of "
                             f"{LOGGERS}.")
    if "jsonl" not in names:
        raise ValueError(f"train.loggers={value!r} leaves out 'jsonl': metrics.jsonl is the run's "
                         f"record (resume, sweeps and fits read it), so it is always written.")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ValueError("train.loggers asks for 'wandb', but the wandb package is not installed: "
                         "pip install 'lmjax[wandb]' (the [wandb] extra).")
    return names


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
    """metrics.jsonl, plus TensorBoard and W&B as train.loggers asks, written by process 0 only.

    On resume, rows past the restored step are dropped: they came from steps that are about to
    be run again, and a step must never appear twice.

    A bucket (gs://) has no append, and tensorboardX writes there only through TensorFlow. So on
    a URL workdir the rows are kept in memory and metrics.jsonl is written again whole, and
    TensorBoard's events go to a local temporary folder copied to WORKDIR/tensorboard: both in
    `flush()`, at most every `upload_every` seconds from `write` (an object takes about one
    write a second), before every checkpoint (train calls flush first, so a restored step never
    misses its rows) and on close. A local workdir is appended to row by row, each row whole
    or not at all (one write of the whole line; one that a full disk cuts short is undone), and
    made durable (fsync) by `flush()`, before every checkpoint: so a row torn by a crash (the
    machine's, mid-write) can only be the last, past the newest checkpoint. On resume it is
    dropped with a warning, and its step is logged again.

    `cfg` (a run's config) picks the loggers and holds W&B's settings; without it, the default.
    """

    def __init__(self, workdir: str, resume_step: int = 0, upload_every: float = 30.0,
                 cfg: ml_collections.ConfigDict | None = None):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        names = loggers(cfg.train.loggers if cfg is not None else DEFAULT_LOGGERS)
        self.tb = self.tb_dir = self.wandb = None
        root = paths.resolve(workdir)
        self.path, self.remote = root / "metrics.jsonl", paths.is_url(root)
        kept = []
        if self.path.exists():
            kept = _rows_until(self.path, resume_step)
            if not self.remote:  # written aside, then renamed over: a crash keeps one whole
                aside = self.path.parent / f".{self.path.name}.tmp"
                aside.write_text("".join(kept))
                aside.replace(self.path)
        if self.remote:
            self.rows, self.upload_every = kept, upload_every
            if "tensorboard" in names:
                self.tb_dir = tempfile.mkdtemp(prefix="lmjax-tensorboard-")
            self.tb_remote = root / "tensorboard"
            self.flush_files()
        else:
            self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
            if "tensorboard" in names:
                self.tb_dir = str(root / "tensorboard")
        if self.tb_dir is not None:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)
        if "wandb" in names:
            self.wandb = WandbRun(cfg, root, resume_step)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if self.remote:
            self.rows.append(json.dumps(row) + "\n")
        else:
            self._append((json.dumps(row) + "\n").encode())
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.run.log(scalars, step=int(step))
        if self.remote and time.monotonic() - self.flushed >= self.upload_every:
            self.flush()

    def _append(self, line: bytes) -> None:
        """One row in one write, whole or not at all: a write a full disk cut short is undone."""
        start = os.lseek(self.file.fileno(), 0, os.SEEK_END)
        try:
            if self.file.write(line) < len(line):  # a full disk takes what fits, then refuses
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            os.ftruncate(self.file.fileno(), start)
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def flush(self) -> None:
        """Make every row written so far durable in the workdir: train calls this before every
        checkpoint, so no checkpoint is ever newer than the rows on disk."""
        if not self.enabled:
            return
        if self.remote:
            if self.tb is not None:
                self.tb.flush()
            self.flush_files()
        else:
            os.fsync(self.file.fileno())

    def flush_files(self) -> None:
        self.path.write_text("".join(self.rows))
        if self.tb_dir is not None:
            paths.upload_tree(self.tb_dir, self.tb_remote)
        if self.wandb is not None:
            self.wandb.upload()
        self.flushed = time.monotonic()

    def close(self, keep: bool = True) -> None:
        """`keep=False`: write nothing more to the workdir (it is another run's now)."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.remote:
            if keep:
                self.flush_files()
            if self.tb_dir is not None:
                shutil.rmtree(self.tb_dir)
            if self.wandb is not None and self.wandb.local is not None:
                shutil.rmtree(self.wandb.local)
        else:
            self.file.close()


class WandbRun:
    """One W&B run per training run, continued across resumes.

    Its id is drawn once and kept in WORKDIR/wandb.json with the steps each start began at (the
    run's lineage), so every resume reopens the same run (`resume='allow'`); a start from step
    0 (no checkpoint yet) draws a new one, since a W&B run refuses steps below its last (so on
    a resume it keeps the crashed run's rows past the checkpoint, where metrics.jsonl keeps the
    rerun's: the same numbers, resume being exact, but for timings). An id hashed from the
    workdir's path would instead change when a workdir is copied (gs:// to a laptop) and be
    reused by a fresh run in a reused folder.

    W&B's mode is W&B's own (WANDB_MODE=offline logs without network, `wandb sync` uploads
    later); its folder is WANDB_DIR if set, else the workdir. On a gs:// workdir, W&B writes a
    local temporary folder that `upload` copies to WORKDIR/wandb with the other files.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, root, resume_step: int):
        import wandb

        record = root / "wandb.json"
        saved = _read_json(record) if resume_step else {}
        run_id, starts = saved.get("id") or secrets.token_hex(4), saved.get("starts", [])
        starts = [*starts, resume_step]
        record.write_text(json.dumps({"id": run_id, "starts": starts}) + "\n")
        self.local, self.remote = None, root / "wandb"
        folder = None  # WANDB_DIR, read by wandb itself
        if "WANDB_DIR" not in os.environ:
            is_url = paths.is_url(root)
            self.local = tempfile.mkdtemp(prefix="lmjax-wandb-") if is_url else None
            folder = self.local or str(root)
        lineage = {"workdir": str(root), "start_step": resume_step, "resumes": len(starts) - 1,
                   "starts": starts, "lmjax_version": lmjax.__version__,
                   "process_count": jax.process_count()}
        try:
            self.run = wandb.init(project=cfg.train.wandb_project or None,
                                  entity=cfg.train.wandb_entity or None, id=run_id,
                                  resume="allow", name=root.name, dir=folder,
                                  config={**cfg.to_dict(), "lineage": lineage})
        except wandb.errors.Error as e:  # no API key, no network: before any step has run
            reason = " ".join(str(e).split())
            raise ValueError(f"train.loggers has 'wandb', but W&B could not start a run "
                             f"({reason}); WANDB_MODE=offline logs without network, for a later "
                             f"`wandb sync`.") from None

    def finish(self) -> None:
        """Finish the run and wait until its folder is whole: an offline run's `finish` returns
        before W&B's service has written the .wandb file, which `teardown` waits for."""
        import wandb

        self.run.finish()
        wandb.teardown()

    def upload(self) -> None:
        if self.local is not None:
            paths.upload_tree(os.path.join(self.local, "wandb"), self.remote)


def _read_json(path) -> dict:
    """A small JSON record, or {} when it is missing or torn (then its run starts afresh)."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def _rows_until(path, resume_step: int) -> list[str]:
    """metrics.jsonl's rows up to `resume_step`, as lines. A row a crash cut short (no newline,
    or not JSON: a disk that lost the end of a write) cannot be completed; it is dropped with a
    one-line warning. Rows past `resume_step` are dropped silently: their steps run again."""
    kept, torn = [], []
    for number, line in enumerate(io.StringIO(path.read_bytes().decode(errors="replace")), 1):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            torn.append(number)
        elif row["step"] <= resume_step:
            kept.append(line)
    if torn:
        print(f"warning: dropped line {', '.join(map(str, torn))} of {path}: a row cut short "
              f"by a crash mid-write; its step is logged again.")
    return kept


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
