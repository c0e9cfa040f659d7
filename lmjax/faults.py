"""Faults on demand for the reliability tests: `LMJAX_FAULT=phase:N` (docs/reliability.md).

  step:N   SIGKILL once step N is dispatched (an OOM killer, a lost VM: no cleanup, no flush)
  term:N   SIGTERM once step N is dispatched (a preemption notice, delivered as by a VM)
  int:N    SIGINT once step N is dispatched (Ctrl-C at the terminal)
  nan:N    step N trains on a batch whose loss is NaN
  spike:N  step N's reported train/loss is 10x what it was (a loss spike, as the guard sees it)
  eval:N   SIGKILL as the evaluation after step N starts
  save:N   SIGKILL once the save of step N is handed to Orbax (mid-write when it is async)

The training loop has no line for any of them: `inject` wraps the three callables the loop is
handed and, with the variable unset, hands them back as they are.
"""

import os
import signal
from collections.abc import Callable

import jax.numpy as jnp

FAULT_ENV = "LMJAX_FAULT"
SIGNALS = {"step": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}  # after step N

Step = Callable[[object, dict], tuple[object, dict]]
Evaluate = Callable[[object, int], dict]
Save = Callable[[int, object], None]


def _at() -> tuple[str, int] | None:
    phase, _, step = os.environ.get(FAULT_ENV, "").partition(":")
    return (phase, int(step)) if step.isdigit() else None


def _signal(signum: int) -> None:
    os.kill(os.getpid(), signum)


def inject(step_fn: Step, eval_fn: Evaluate, save_fn: Save,
           start: int) -> tuple[Step, Evaluate, Save]:
    """The loop's step, evaluation and save, with LMJAX_FAULT's fault at its step (if set).

    Steps are counted from `start` (the step a resumed run begins after), as the loop counts
    them: the k-th call of the step is step start + k."""
    fault = _at()
    if fault is None:
        return step_fn, eval_fn, save_fn
    phase, at = fault
    done = start

    def step(state, batch):
        nonlocal done
        done += 1
        if (phase, done) == ("nan", at):
            batch = {**batch, "weights": batch["weights"] * jnp.nan}
        out = step_fn(state, batch)
        if (phase, done) == ("spike", at):
            out = (out[0], {**out[1], "train/loss": out[1]["train/loss"] * 10})
        if done == at and phase in SIGNALS:
            _signal(SIGNALS[phase])
        return out

    def evaluate(state, step_done):
        if (phase, step_done) == ("eval", at):
            _signal(signal.SIGKILL)
        return eval_fn(state, step_done)

    def save(step_done, state):
        save_fn(step_done, state)
        if (phase, step_done) == ("save", at):
            _signal(signal.SIGKILL)

    return step, evaluate, save
