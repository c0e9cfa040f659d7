"""Orbax checkpoints of {train state, data-iterator position}, saved together.

Saving the iterator with the weights makes resume exact by construction (nanodo): the batch
after a restore is the one that would have come next. Restoring passes abstract targets that
carry the current mesh's shardings, so a checkpoint written on one mesh loads onto any other.

A step directory only appears once Orbax has renamed it from its temporary name, so a crash
mid-write leaves no half step behind. What can still go wrong after that (a truncated file, a
disk that lied, a copy that stopped short) is caught by a third item, `integrity`: a per-leaf
checksum of the state and a copy of the data position, compared on restore. Restore then falls
back to the newest step that reads back whole. Nothing is ever deleted for being unreadable;
steps newer than the one restored are moved to `corrupt_checkpoints/` so their step numbers can
be saved again. Checkpoints are tensorstore arrays and JSON: loading one runs no code or pickle.
"""

import contextlib
import errno
import gc
import inspect
import json
import logging
import sys

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from lmjax import paths


def manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    quiet_abandoned_io()
    kept = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=kept.AnyPreservationPolicy(
            [kept.LatestN(cfg.max_to_keep), kept.CustomSteps(sorted(keep_steps(cfg)))]),
        enable_async_checkpointing=cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,  # unfinished writes of a killed run; never a whole step
    )
    return _Manager(paths.resolve(workdir) / "checkpoints",  # gs:// to TensorStore
                    options=options, item_names=("state", "data", "integrity"))


def keep_steps(cfg: ml_collections.ConfigDict) -> frozenset[int]:
    """checkpoint.keep_steps as steps; one sentence naming the key if it is not a list of
    positive integers."""
    text = cfg.keep_steps.replace(" ", "")
    items = text.split(",") if text else []
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"checkpoint.keep_steps={cfg.keep_steps!r} must be comma-separated "
                         "positive steps ('' = none).")
    return frozenset(int(item) for item in items)


class DiskFull(OSError):
    """A checkpoint could not be written for want of space; the steps before it are intact."""


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, telling a full disk in one sentence. Orbax itself logs the failed write
    from each of its threads, traceback and all, then raises TensorStore's RESOURCE_EXHAUSTED
    from whichever call next waits on the write: this save, the next one, or the final wait."""

    _writing: int | None = None  # the step of the save in flight, if asynchronous

    def save(self, step: int, *args, **kwargs) -> bool:
        with _naming_a_full_disk(self, step):
            saved = super().save(step, *args, **kwargs)
        self._writing = step
        return saved

    def wait_until_finished(self) -> None:  # Orbax's save and close call it too
        with _naming_a_full_disk(self, self._writing):
            super().wait_until_finished()


@contextlib.contextmanager
def _naming_a_full_disk(mngr: ocp.CheckpointManager, step: int | None):
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not _is_disk_full(e):
            raise
    else:
        return
    done = [int(p.name) for p in epath.Path(str(mngr.directory)).iterdir()
            if p.name.isdigit() and int(p.name) != step and ocp.step.is_path_finalized(p)]
    kept = (f"step {max(done)}, the newest complete checkpoint, is intact: free space and run "
            f"the same command to resume from it" if done else
            "no checkpoint was complete before it: free space and run the same command")
    raise DiskFull(f"No space left to write checkpoint step {step} in {mngr.directory}; "
                   f"{kept}.") from None


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, as an OSError or in the text of TensorStore's error, or their cause."""
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
                text in str(e) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full_logs(record: logging.LogRecord) -> bool:
    """Drop Orbax's own reports of a full disk (one per writing thread): DiskFull tells it."""
    return not ("orbax" in record.pathname and record.exc_info
                and _is_disk_full(record.exc_info[1]))


def is_complete(workdir: str, step: int) -> bool:
    """Step `step` of the workdir's checkpoints is written whole: on a disk Orbax renames a
    step into place when done; on gs:// (no rename) it writes commit_success.txt into it last."""
    path = paths.resolve(workdir) / "checkpoints" / str(step)
    return path.is_dir() and ocp.step.is_path_finalized(path)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Wrapping uint32 sum of the bit patterns: exact in any order, so equal on any mesh."""
    bits = jnp.dtype(f"uint{8 * min(x.dtype.itemsize, 4)}")  # 8-byte leaves: two words each
    return jnp.sum(jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32), dtype=jnp.uint32)


def _leaf_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _fingerprint(pure_state: dict) -> tuple[dict, dict]:
    return jax.tree.map(_leaf_checksum, pure_state), jax.tree.map(_leaf_finite, pure_state)


def _named(tree: dict) -> dict[str, object]:
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def fingerprint(state: nnx.State) -> tuple[dict[str, int], list[str]]:
    """Per-leaf checksums ('path/to/leaf' -> int) and the paths of leaves holding NaN or Inf."""
    checksums, finite = jax.device_get(_fingerprint(nnx.to_pure_dict(state)))
    return ({k: int(v) for k, v in _named(checksums).items()},
            [k for k, ok in _named(finite).items() if not ok])


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, data_state: dict) -> None:
    """Start writing (asynchronously if configured); the train loop keeps going meanwhile.

    Refuses a state with NaN or Inf anywhere: a checkpoint must always be a safe place to resume.
    """
    checksums, nonfinite = fingerprint(state)
    copy = {"data": data_state} if jax.process_count() == 1 else {}  # else one file per process
    if nonfinite:
        raise FloatingPointError(f"Not saving step {step}: {len(nonfinite)} state leaves hold "
                                 f"NaN or Inf, first {nonfinite[0]!r}.")
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        data=grain.checkpoint.CheckpointSave(ProcessData(data_state)),
        integrity=ocp.args.JsonSave({"checksums": checksums, **copy})), force=True)


class ProcessData:
    """This process's data-iterator state, in the form grain's Orbax handler saves: one JSON
    file per process (`process_i-of-n.json`), because packed sources stand at a different
    document on each process. Restoring therefore needs the same process count."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:  # grain's handler calls it after set_state
        pass


def _check_shapes(mngr: ocp.CheckpointManager, step: int, target: dict) -> None:
    """Compare stored shapes with the config's before reading any array: a changed model is
    named plainly, and no half-started read is left behind."""
    path = epath.Path(str(mngr.directory)) / str(step) / "state"
    for name in ("_METADATA", "manifest.ocdbt"):  # checked here: tensorstore's own error is a page
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name} is missing")
    stored = {k: tuple(v.shape) for k, v in
              _named(ocp.StandardCheckpointHandler().metadata(path)).items()}
    for name, leaf in _named(target).items():
        if stored.get(name) != tuple(leaf.shape):
            raise ValueError(f"leaf {name!r} is stored with shape {stored.get(name)}, but this "
                             f"config makes {tuple(leaf.shape)}")


def _restore_step(mngr, abstract_state, step) -> tuple[nnx.State, dict]:
    target = nnx.to_pure_dict(abstract_state)
    _check_shapes(mngr, step, target)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(ProcessData()),
        integrity=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill in
    nnx.replace_by_pure_dict(state, restored["state"])
    stored, position = restored["integrity"]["checksums"], restored["data"].state
    if restored["integrity"].get("data", position) != position:  # absent: several processes
        raise ValueError(f"the data position reads back as {position}, not the one written")
    checksums, nonfinite = fingerprint(state)
    for name, value in checksums.items():
        if stored.get(name) != value:
            raise ValueError(f"leaf {name!r} reads back with checksum {value}, "
                             f"not the {stored.get(name)} written")
    if nonfinite:
        raise ValueError(f"leaf {nonfinite[0]!r} holds NaN or Inf")
    return state, position


def _check_process_count(mngr: ocp.CheckpointManager, step: int) -> None:
    """Refuse, in one sentence, a step written by another number of processes: its data
    positions are one file per process (ProcessData), which grain cannot split or merge."""
    data = epath.Path(str(mngr.directory)) / str(step) / "data"
    counts = {int(f.stem.split("-of-")[1]) for f in data.glob("process_*-of-*.json")}
    if counts and counts != {jax.process_count()}:
        raise ValueError(f"Checkpoint step {step} in {mngr.directory} was written by "
                         f"{max(counts)} processes but this run has {jax.process_count()}; "
                         f"resume with {max(counts)} processes (the data position is saved per "
                         f"process).")


def restore(mngr: ocp.CheckpointManager, abstract_state: nnx.State,
            step: int | None = None) -> tuple[nnx.State, dict, int] | None:
    """The newest valid (or the given) checkpoint laid out like `abstract_state`; None if none.

    An unreadable step is reported by a warning naming the problem and skipped. If no step is
    valid the run stops (starting afresh would silently change the result) and nothing moves.
    """
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    problems = {}
    for candidate in steps:
        _check_process_count(mngr, candidate)
        try:
            state, data_state = _restore_step(mngr, abstract_state, candidate)
        except Exception as e:  # noqa: BLE001 - whatever the cause, this step cannot be resumed
            problems[candidate] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"warning: checkpoint step {candidate} in {mngr.directory} is unusable "
                  f"({problems[candidate]}); trying an older one.")
        if candidate in problems:
            gc.collect()  # the failed read's buffers, before the next step is read
            continue
        if problems:
            _set_aside(mngr, problems)
        return state, data_state, candidate
    if problems:
        listed = "; ".join(f"step {s}: {p}" for s, p in problems.items())
        raise ValueError(f"No checkpoint in {mngr.directory} can be restored ({listed}).")
    return None


# What asyncio logs of the reads or writes a failed step left behind (futures nobody awaited).
ABANDONED = ("Task was destroyed but it is pending", "Future exception was never retrieved",
             "Task exception was never retrieved")


def quiet_abandoned_io() -> None:
    """Keep the one sentence about a step that could not be read or written its only report.

    A failed read or write ends Orbax's event loop while TensorStore still has other reads or
    writes of the step in flight. Each of those that finishes later calls back into the closed
    loop: an unraisable `RuntimeError: Event loop is closed` traceback apiece, from TensorStore's
    threads (thousands for a large model), and asyncio logs the futures nobody awaited; the
    coroutines of the abandoned writes fail to clean up when the interpreter exits. These
    start before the failure reaches any except clause, so every manager installs these filters
    (once per process) before its first read or write. They drop exactly those reports, and
    Orbax's own logs of a full disk (DiskFull says it once); any other unraisable error or log
    goes on as before.
    """
    if not getattr(sys.unraisablehook, "lmjax_quiet", False):
        previous = sys.unraisablehook

        def hook(report) -> None:
            closed_loop = (isinstance(report.exc_value, RuntimeError)
                           and str(report.exc_value) == "Event loop is closed")
            orbax_write = (inspect.iscoroutine(report.object)
                           and "orbax" in report.object.cr_code.co_filename)
            if not (closed_loop or orbax_write):
                previous(report)

        hook.lmjax_quiet = True
        sys.unraisablehook = hook
    for name, drop in (("asyncio", _abandoned_logs), ("absl", _disk_full_logs),
                       ("absl", _read_only_notes)):
        if drop not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(drop)


def _abandoned_logs(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(ABANDONED)


def _read_only_notes(record: logging.LogRecord) -> bool:
    """Drop Orbax's warnings that a read-only manager (restore_from's) will not save."""
    return not record.getMessage().startswith(("CheckpointManagerOptions.read_only=True",
                                               "Given directory is read only"))


def _set_aside(mngr: ocp.CheckpointManager, problems: dict[int, str]) -> None:
    """Move unusable steps out of the way (never delete them), so they can be written again."""
    if jax.process_index() == 0:
        directory = paths.resolve(str(mngr.directory))
        aside = directory.parent / "corrupt_checkpoints"
        aside.mkdir(parents=True, exist_ok=True)  # on gs:// no object: it exists once filled
        for step in problems:
            taken = len(list(aside.iterdir())) if aside.exists() else 0
            target = aside / f"{step}.{taken}"
            paths.move(directory / str(step), target)
            print(f"warning: moved checkpoint step {step} to {target}.")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lmjax_set_aside_corrupt_checkpoints")
    mngr.reload()


def restore_params(workdir: str, params: dict, step: int | None = None) -> dict:
    """The model's part of `workdir`'s checkpoint (latest or `step`), laid out as `params` is
    (a pure dict of the model's state: arrays or ShapeDtypeStructs, each with its sharding).

    The one partial restore: the 'state' item is `to_pure_dict(state((model, optimizer)))`, so
    only its key 0 is read (Orbax partial restore) and the optimizer's moments never leave the
    disk. Anything that keeps parameter shapes may differ from the source run (lengths, RoPE
    scaling, window, mesh); a shape that differs is named (ValueError) before any array is read.
    """
    quiet_abandoned_io()
    mngr = ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(create=False),
                                 item_names=("state",))
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"{workdir}/checkpoints has no checkpoint "
                                f"{'at all' if step is None else f'for step {step}'}.")
    target = {0: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), params)}
    try:
        _check_shapes(mngr, step, target)
    except FileNotFoundError as e:  # a step without its metadata cannot fit any model
        raise ValueError(str(e)) from None
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    mngr.close()
    return restored["state"][0]


def load_params(workdir: str, state: nnx.State, step: int | None = None) -> nnx.State:
    """`state` ((model, optimizer), fresh from train's init) with the model's weights read from
    `workdir`'s checkpoint by restore_params (train.init_from).

    The optimizer stays fresh and the step at 0: finetuning, or continuing at a longer
    data.seq_len with RoPE scaling, starts from trained weights.
    """
    pure = nnx.to_pure_dict(state)
    try:
        pure[0] = restore_params(workdir, pure[0], step)
    except FileNotFoundError:
        raise FileNotFoundError(f"train.init_from={workdir!r} has no checkpoint to start "
                                "from.") from None
    except ValueError as e:
        raise ValueError(f"train.init_from={workdir!r} does not fit this model: {e}.") from None
    out = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(out, pure)
    return out


def restore_from(workdir: str, abstract_state: nnx.State, step: int) -> tuple[nnx.State, dict]:
    """(state, data position) of another run's checkpoint `step`, laid out like
    `abstract_state` and checked as restore checks its own (train.fork_from). Read-only: the
    manager creates, cleans up and deletes nothing, so the parent stays as it was."""
    quiet_abandoned_io()
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    mngr = ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints", options=options,
                                 item_names=("state", "data", "integrity"))
    try:
        if step not in mngr.all_steps():
            raise FileNotFoundError(
                f"train.fork_from={workdir!r} has no checkpoint for step {step} (it keeps "
                f"{sorted(mngr.all_steps()) or 'none'}); train the parent with that step in "
                "its checkpoint.keep_steps.")
        _check_process_count(mngr, step)
        try:
            return _restore_step(mngr, abstract_state, step)
        except Exception as e:  # noqa: BLE001 - any cause: this step cannot start the fork
            raise ValueError(f"train.fork_from={workdir!r} step {step} cannot be restored "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:300]}).") from None
    finally:
        mngr.close()
