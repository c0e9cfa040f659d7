"""A profiler window over a few training steps, and the persistent compilation cache.

    lmjax train ... --config.profile.start_step=20 --config.profile.num_steps=5
    tensorboard --logdir=WORKDIR/profile      # or open the .trace.json.gz in ui.perfetto.dev

The trace covers steps start_step .. start_step + num_steps - 1 (1-based, as metrics.jsonl
counts them): it starts before the first is dispatched and stops once the last has finished
on the device, so asynchronous dispatch cannot cut a step in half. Start after the first
steps: they hold compilation and warm-up, which a trace of the steady state should not.
"""

import shutil
import tempfile

import jax
import ml_collections

from lmjax import paths
from lmjax.data import sources


class Window:
    """Call `before(step)` ahead of dispatching `step` and `after(step, outputs)` once it is
    dispatched; the trace lands in `workdir/profile` (jax.profiler's TensorBoard layout). On a
    gs:// workdir it is written to a local temporary folder first and copied there on stop."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
        self.first = cfg.profile.start_step
        self.last = cfg.profile.start_step + cfg.profile.num_steps - 1
        self.enabled = cfg.profile.num_steps > 0 and jax.process_index() == 0
        self.target = paths.resolve(workdir) / "profile"
        self.remote = paths.is_url(self.target)
        self.logdir = str(self.target)
        self.active = False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            if self.remote:
                self.logdir = tempfile.mkdtemp(prefix="lmjax-profile-")
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        """End the trace (also on an early exit: a run shorter than the window)."""
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            if self.remote:
                paths.upload_tree(self.logdir, self.target)
                shutil.rmtree(self.logdir)


def compilation_cache_dir(cfg: ml_collections.ConfigDict) -> str:
    """Where train.compilation_cache_dir points: 'auto' is beside the tokenized-data cache; a
    gs:// folder is kept as it is (JAX reads and writes its cache through epath)."""
    folder = cfg.train.compilation_cache_dir
    if folder == "auto":
        return str(sources.cache_dir() / "xla")
    return str(paths.resolve(folder)) if folder else ""


def use_compilation_cache(cfg: ml_collections.ConfigDict) -> None:
    """Point JAX's persistent cache at train.compilation_cache_dir ('' leaves it as it is).

    Every program is cached, however quick to compile (JAX's default skips those under 1 s):
    a rerun of a small model on CPU otherwise compiles its train step again.
    """
    folder = compilation_cache_dir(cfg)
    if not folder:
        return
    paths.resolve(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
