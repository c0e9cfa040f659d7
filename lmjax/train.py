"""The training loop: mesh -> data -> state -> restore -> loop, around a pure, jitted step.

`train_step(state, batch) -> (state, metrics)` is jitted once with explicit shardings and the
state donated, so parameters are updated in place. The loop never waits on the device: it
dispatches step n, then reads step n-1's metrics (nanodo), except where it must (a save).

Reliability (docs/reliability.md): a SIGTERM saves the current step and exits cleanly; a NaN or
Inf stops the run (or skips the update) before any checkpoint can hold it; resuming a workdir
with a config that changes what its checkpoints mean is refused unless forced.
"""

import collections
import copy
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from lmjax import (
    attention,
    checkpoint,
    distributed,
    faults,
    flops,
    loss,
    metrics,
    moe,
    mup,
    optim,
    paths,
    profiler,
    resume,
    sharding,
    validate,
)
from lmjax import config as config_lib
from lmjax.backends import cpu as cpu_backend
from lmjax.data import pipeline
from lmjax.model import DotGeneral, Transformer, forward, forward_with_aux


def create(cfg: ml_collections.ConfigDict, dot_general: DotGeneral = jax.lax.dot_general
           ) -> tuple[Transformer, nnx.Optimizer]:
    """The model and its optimizer; `dot_general` is the dense layers' matmul (a backend's)."""
    model = Transformer(cfg.model, nnx.Rngs(params=cfg.seed), dot_general)
    tx = optim.make(cfg.optim, cfg.train.steps, mup.lr_scales(cfg.model), mup.lr_labels,
                    mup.decay_scales(cfg.model))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _loss_and_grads(graphdef, params, rest, batch, num_tokens, key, cfg):
    """Gradient of sum(nll) / num_tokens, so micro-batch gradients add up to the batch's."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=key) if cfg.model.dropout > 0 else None
        logits_BLV, router = forward_with_aux(model, batch, rngs)  # router: MoE losses or {}
        share = batch["weights"].sum() / num_tokens  # this micro-batch's share of all tokens
        total, aux = loss.cross_entropy(logits_BLV, batch["targets"], batch["weights"],
                                        cfg.optim.z_loss, with_accuracy=False)
        total = total + loss.router_loss(router, cfg.model.moe)
        return total * share, {k: v * share for k, v in (aux | router).items() if k != "num_tokens"}

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _accumulated_grads(graphdef, params, rest, batch, key, *, num_tokens, cfg):
    """(aux, grads) of the whole batch, over train.grad_accum micro-batches if asked."""
    grad_fn = functools.partial(_loss_and_grads, graphdef, rest=rest, num_tokens=num_tokens,
                                cfg=cfg)
    accum = cfg.train.grad_accum
    if accum == 1:
        (_, aux), grads = grad_fn(params, batch=batch, key=key)
        return aux, grads
    # scan over micro-batches: one micro-batch of activations alive at a time
    micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

    def body(carry, inputs):
        i, mb = inputs
        (_, aux), grads = grad_fn(params, batch=mb, key=jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (aux, grads)), None

    shapes = jax.eval_shape(
        lambda: grad_fn(params, batch=jax.tree.map(lambda x: x[0], micro), key=key))
    ref = batch["weights"]  # zeros typed as the batch is: varying over a shard_map's manual axes
    zeros = jax.tree.map(lambda s: jnp.zeros_like(ref, s.dtype, s.shape), shapes)
    (aux, grads), _ = jax.lax.scan(body, (zeros[0][1], zeros[1]), (jnp.arange(accum), micro))
    return aux, grads


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, *,
               cfg: ml_collections.ConfigDict) -> tuple[nnx.State, dict]:
    # merge shares Variables with `state`, so the update below overwrites it: keep the old values
    old = jax.tree.map(lambda x: x, state) if cfg.train.on_nonfinite == "skip" else None
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    num_tokens = jnp.maximum(batch["weights"].sum(), 1.0)
    grads_fn = functools.partial(_accumulated_grads, model_def, num_tokens=num_tokens, cfg=cfg)
    aux, grads = sharding.summed_grads(grads_fn, params, rest, batch, key, cfg)
    optimizer.update(model, grads)
    out = {f"train/{k}": v for k, v in aux.items()}
    out["train/grad_norm"] = optax.tree.norm(grads)
    out["lr"] = optim.schedule(cfg.optim, cfg.train.steps)(step)
    new = nnx.state((model, optimizer))
    if old is None:
        return new, out
    ok = jnp.isfinite(out["train/loss"]) & jnp.isfinite(out["train/grad_norm"])
    out["train/skipped"] = 1.0 - ok.astype(jnp.float32)
    return _keep_if(ok, new, old, step + 1, graphdef), out


def _keep_if(ok: jax.Array, new: nnx.State, old: nnx.State, step: jax.Array,
             graphdef: nnx.GraphDef) -> nnx.State:
    """`new` where `ok`, else `old` (weights and moments untouched) with the count at `step`.

    A select on the state rather than optax.apply_if_finite: it sees the loss as well as the
    gradients and leaves the optimizer's state tree (so every checkpoint) as it is. As with
    apply_if_finite, optax's own counts (bias correction, schedule) stay put on a skipped step;
    the step count (checkpoint number, dropout key) advances, in line with the data position.
    """
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    model, optimizer = nnx.merge(graphdef, kept)
    optimizer.step[...] = step
    return nnx.state((model, optimizer))


def eval_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> dict:
    """Sums over a batch, so several batches combine into one exact mean."""
    model, _ = nnx.merge(graphdef, state)
    logits_BLV = forward(model, batch)
    _, aux = loss.cross_entropy(logits_BLV, batch["targets"], batch["weights"])
    n = aux["num_tokens"]
    return {"loss": aux["loss"] * n, "accuracy": aux["accuracy"] * n, "num_tokens": n}


def evaluate(eval_fn, state, batches: list[dict], mesh) -> dict:
    if not batches:  # train.eval_batches=0 or data.eval_fraction=0: nothing held out
        return {}
    sums = [eval_fn(state, sharding.to_global(b, mesh)) for b in batches]
    total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums))
    mean_loss = float(total["loss"] / total["num_tokens"])
    return {"eval/loss": mean_loss, "eval/perplexity": float(np.exp(mean_loss)),
            "eval/accuracy": float(total["accuracy"] / total["num_tokens"])}


def _check_finite(step: int, values: dict) -> None:
    """Raise naming the step and the metric; a step the jitted guard skipped only warns."""
    bad = [key for key, value in values.items() if not np.all(np.isfinite(value))]
    if not bad:
        return
    named = ", ".join(f"{key}={values[key]}" for key in bad)
    if values.get("train/skipped") and all(key.startswith("train/") for key in bad):
        print(f"warning: {named} at step {step}; the update was skipped.")
        return
    raise FloatingPointError(f"{named} at step {step}; stopping the run "
                             f"(train.on_nonfinite='skip' skips such updates instead).")


def _check_spike(step: int, loss_now: float, recent, factor: float, window: int = 20) -> None:
    """Stop when a loss exceeds `factor` x the mean of the previous `window` (all of `recent`).

    Host-side and one step late, so it can stop but not undo the update; it runs before every
    save, so the newest checkpoint predates the spike (PaLM: resume there, skip the batches).
    """
    if len(recent) >= window and loss_now > factor * np.mean(recent):
        raise FloatingPointError(
            f"train/loss is {loss_now:.4g} at step {step}, over train.spike_factor={factor} x "
            f"the mean {np.mean(recent):.4g} of the previous {len(recent)} steps; "
            f"stopping the run.")


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None,
        force_resume: bool = False) -> dict:
    """Train (or resume training) in `workdir`; returns the last logged metrics.

    `devices` (default: all) lets one process train on a subset, e.g. a 1-device baseline.
    `force_resume` continues a workdir (or forks a train.fork_from) whose config.json differs
    in keys or schedule that lmjax/resume.py does not allow to change.
    """
    devices = jax.devices() if devices is None else devices
    validate.validate(cfg, len(devices))
    paths.check_folder(workdir, "Workdir")
    profiler.use_compilation_cache(cfg)
    mesh = sharding.make_mesh(cfg, devices)
    data = pipeline.build(cfg, jax.process_index(), jax.process_count())  # checks data, tokenizer
    root = paths.resolve(workdir)  # gs://bucket/run as it is; a local folder made absolute
    # the lease before anything is read or written: one run per workdir
    with (distributed.workdir_lease(workdir, cfg.train.lease_timeout) as held,
          jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)),
          distributed.preemption_notice() as preempted):
        resume.check(cfg, workdir, data.tokenizer, force_resume)
        fns = compile_fns(cfg, mesh)
        ckpt = checkpoint.manager(workdir, cfg.checkpoint)
        restored = checkpoint.restore(ckpt, fns.abstract_state)
        if restored is None and cfg.train.fork_from:  # e.g. a cooldown from a constant-LR run
            restored = resume.fork(cfg, fns.abstract_state, data.tokenizer, force_resume)
        if restored is None:
            state, start = fns.init(), 0
            if cfg.train.init_from:  # finetune / extend the context of a trained model
                state = checkpoint.load_params(cfg.train.init_from, state)
        else:
            state, data_state, start = restored
            data.train.set_state(data_state)
        if jax.process_index() == 0:  # only now: a failed restore leaves the workdir as it was
            config_lib.save(cfg, root / "config.json")
            if data.tokenizer is not None:
                (root / "tokenizer.model").write_bytes(data.tokenizer.serialized())
        for problem in sharding.assert_sharded(state, cfg.mesh.rules):
            print(f"warning: {problem}")
        return _loop(cfg, workdir, mesh, fns, state, data, ckpt, start, preempted, held)


@dataclasses.dataclass(frozen=True)
class Functions:
    """The jitted programs of a run, all laid out for one mesh."""

    abstract_state: nnx.State  # shapes, dtypes and logical names; no memory
    init: Callable[[], nnx.State]
    step: Callable[[nnx.State, dict], tuple[nnx.State, dict]]
    eval: Callable[[nnx.State, dict], dict]


def with_kernel(cfg: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
    """`cfg` with model.attention and model.moe.exchange resolved for `platform` ('auto' ->
    what it picks); a kernel the platform lacks fails here, before anything is compiled."""
    if cfg.model.remat == "offload" and platform == "cpu":  # no host transfer is emitted
        warnings.warn("model.remat='offload' on CPU keeps the saved matmul outputs in ordinary "
                      "memory (host and device are one), i.e. it acts as 'dots_saveable'.",
                      stacklevel=2)
    kernel = attention.resolve(cfg.model.attention, platform, cfg.model.dtype)
    exchange = moe.resolve_exchange(cfg.model.moe.exchange, platform)
    if (kernel, exchange) == (cfg.model.attention, cfg.model.moe.exchange):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.attention, cfg.model.moe.exchange = kernel, exchange
    return cfg


def compile_fns(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Functions:
    """Jit init, train and eval steps with explicit shardings; call under the mesh and rules."""
    platform, sizes = mesh.devices.flat[0].platform, dict(mesh.shape)
    cfg = with_kernel(cfg, platform)
    dot_general = cpu_backend.dot_general_for(platform, sizes["fsdp"] * sizes["tensor"] > 1)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: create(cfg, dot_general)))
    sharding.check_divisible(abstract_state, mesh, cfg.mesh.rules)
    state_shardings = nnx.get_named_sharding(abstract_state, mesh)
    if cfg.mesh.shard_optimizer:
        state_shardings = sharding.shard_optimizer_state(state_shardings, abstract_state, mesh)
    abstract_state = jax.tree.map(  # concrete shardings: what a checkpoint restores onto
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, state_shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    return Functions(
        abstract_state=abstract_state,
        init=jax.jit(lambda: nnx.state(create(cfg, dot_general)), out_shardings=state_shardings),
        step=jax.jit(functools.partial(train_step, graphdef, cfg=cfg),
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, None), donate_argnums=0),
        eval=jax.jit(functools.partial(eval_step, graphdef),
                     in_shardings=(state_shardings, batch_sharding)),
    )


class _Log:
    """metrics.jsonl's rows and the progress bar; every logged loss is first checked (finite,
    no spike), and a row is written every train.log_every steps and whenever `extra` (an
    evaluation) comes with it."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, mesh, start: int,
                 train_tokens: int | None = None):
        self.cfg, self.last = cfg, {}
        self.train_tokens = train_tokens  # one pass over the data: rows log their epochs
        self.writer = metrics.Writer(workdir, resume_step=start, cfg=cfg)
        self.tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        seq_len = cfg.data.seq_len
        self.flops_per_token = flops.flops_per_token(cfg.model, seq_len)  # MFU: the project's
        # the `flops` column counts in the run's convention (its budget's)
        self.counted_per_step = self.tokens_per_step * flops.flops_per_token(
            cfg.model, seq_len, cfg.train.flops_convention)
        self.peak = (metrics.peak_flops_per_device()
                     * metrics.peak_chips(mesh.devices.flatten().tolist()))
        self.bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0)
        self.recent = collections.deque(maxlen=20)  # the losses the spike guard compares with
        self.window_start, self.window_steps = time.perf_counter(), 0

    def dispatched(self) -> None:
        self.window_steps += 1
        self.bar.update(1)

    def __call__(self, step_done: int, step_metrics: dict, extra: dict) -> None:
        values, t = jax.device_get(step_metrics), self.cfg.train
        _check_finite(step_done, {**values, **extra})
        loss_now = float(values["train/loss"])
        if t.spike_factor:
            _check_spike(step_done, loss_now, self.recent, t.spike_factor)
        if np.isfinite(loss_now):
            self.recent.append(loss_now)
        if step_done % t.log_every and step_done != t.steps and not extra:
            return
        rate = self.last.get("tokens_per_s", 0.0)  # a second row for one window (an eval)
        if self.window_steps:
            rate = self.window_steps * self.tokens_per_step / (
                time.perf_counter() - self.window_start)
            self.window_start, self.window_steps = time.perf_counter(), 0
        self.last = {**values, **extra, "tokens": step_done * self.tokens_per_step,
                     "tokens_per_s": rate, "flops": step_done * self.counted_per_step,
                     "mfu": rate * self.flops_per_token / self.peak}
        if self.train_tokens:  # repeated data (Muennighoff et al. 2023), for lmjax fit
            self.last["epochs"] = self.last["tokens"] / self.train_tokens
        self.writer.write(step_done, self.last)
        self.bar.set_postfix(loss=f"{values['train/loss']:.3f}", tok_s=f"{rate:,.0f}")

    def close(self, keep: bool = True) -> None:
        self.bar.close()
        self.writer.close(keep)


def _loop(cfg, workdir, mesh, fns, state, data, ckpt, start, preempted, held) -> dict:
    """Dispatch step n, then read step n-1's metrics; evaluate, check and save on cadence.
    Nothing is written once `held`, the workdir lease, is found taken over."""
    def evaluate_at(state, step):
        return evaluate(fns.eval, state, data.eval_batches, mesh)

    def save(step, state):
        held.check()
        log.writer.flush()  # on gs://: the rows up to `step` are in the workdir before its save
        checkpoint.save(ckpt, step, state, data.train.get_state())

    step_fn, eval_fn, save_fn = faults.inject(fns.step, evaluate_at, save, start)
    kept = checkpoint.keep_steps(cfg.checkpoint)  # saved too: where cooldown forks start
    log = _Log(cfg, workdir, mesh, start, data.train_tokens)
    trace, pending = profiler.Window(cfg, workdir), None
    try:
        for done in range(start + 1, cfg.train.steps + 1):
            held.check()
            batch = sharding.to_global(next(data.train), mesh)
            trace.before(done)
            state, step_metrics = step_fn(state, batch)
            trace.after(done, step_metrics)
            log.dispatched()
            if pending is not None:  # step n-1's numbers, read while step n runs
                log(*pending)
            pending, last = (done, step_metrics, {}), done == cfg.train.steps
            is_eval = last or bool(cfg.train.eval_every and done % cfg.train.eval_every == 0)
            is_save = last or done % cfg.checkpoint.every == 0 or done in kept
            if is_eval or is_save:  # the loss is checked before a save can keep it
                log(done, step_metrics, eval_fn(state, done) if is_eval else {})
                pending = None
            if is_save:
                save_fn(done, state)
            if preempted(done):
                if pending is not None:
                    log(*pending)
                if not is_save:
                    save_fn(done, state)
                ckpt.wait_until_finished()
                print(f"Preempted: saved step {done} in {workdir}; the same command resumes.",
                      flush=True)
                raise distributed.Preempted
        ckpt.wait_until_finished()
    finally:
        trace.stop()
        log.close(keep=not held.lost)
        ckpt.close()
    return log.last
