"""The training loop: mesh -> data -> state -> restore -> loop, around a pure, jitted step.

`train_step(state, batch) -> (state, metrics)` is jitted once with explicit shardings and the
state donated, so parameters are updated in place. The loop never waits on the device: it
dispatches step n, then reads step n-1's metrics (nanodo), except where it must (a save).

Reliability (docs/reliability.md): a SIGTERM saves the current step and exits cleanly; a NaN or
Inf stops the run (or skips the update) before any checkpoint can hold it; resuming a workdir
with a config that changes what its checkpoints mean is refused unless forced.
"""

import collections
import contextlib
import copy
import dataclasses
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from flax.core import spmd
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from lmjax import attention, checkpoint, flops, loss, metrics, mup, optim, profiler, sharding
from lmjax import config as config_lib
from lmjax.data import pipeline
from lmjax.model import Transformer


def create(cfg: ml_collections.ConfigDict) -> tuple[Transformer, nnx.Optimizer]:
    model = Transformer(cfg.model, nnx.Rngs(params=cfg.seed))
    tx = optim.make(cfg.optim, cfg.train.steps, mup.lr_scales(cfg.model), mup.lr_labels)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _loss_and_grads(graphdef, params, rest, batch, num_tokens, key, cfg):
    """Gradient of sum(nll) / num_tokens, so micro-batch gradients add up to the batch's."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=key) if cfg.model.dropout > 0 else None
        logits_BLV = model(batch["inputs"], batch.get("positions"), rngs=rngs,
                           segment_ids_BL=batch.get("segment_ids"))  # present when packed
        share = batch["weights"].sum() / num_tokens  # this micro-batch's share of all tokens
        total, aux = loss.cross_entropy(logits_BLV, batch["targets"], batch["weights"],
                                        cfg.optim.z_loss, with_accuracy=False)
        return total * share, {k: v * share for k, v in aux.items() if k != "num_tokens"}

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


def _has_own_shard_map(cfg: ml_collections.ConfigDict, sizes: dict[str, int]) -> bool:
    """Whether the model runs a shard_map of its own (ring or splash attention, a vocab-split
    embedding lookup). Nested in _reduce_scattered_grads' manual 'data' region it fails to lower
    in JAX 0.10 (its jvp residuals are named with the parent's 'data' axis); there ZeRO-1 falls
    back to a sharding constraint on the gradients, which XLA's TPU and GPU partitioners turn
    into the same reduce-scatter."""
    vocab = sharding.axes_of(sharding.RULES[cfg.mesh.rules]["vocab"])
    return cfg.model.attention in ("ring", "splash") or math.prod(sizes[a] for a in vocab) > 1


def _reduce_scattered_grads(grads_fn, params, rest, batch, key):
    """ZeRO-1's gradients: each 'data' replica computes its rows' gradients alone, and one
    reduce-scatter per weight leaves replica i the sum of its 1/data slice (sharding.over_data),
    the slice its Adam moments hold.

    Written by hand (shard_map, manual over 'data' only; FSDP/TP stay XLA's) because XLA:CPU
    lowers the same layout asked for with a sharding constraint as an all-reduce, a slice and
    an all-gather. With grad_accum, micro-batch gradients add up locally: one reduce-scatter a
    step, not one all-reduce per micro-batch. Dropout masks differ per replica (the key is
    folded with the replica index), so they are not the ones a 1-device run draws.
    """
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape)
    leaves, treedef = jax.tree.flatten(params)
    specs = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, P))
    dims = [sharding.data_dim(spec, x.shape, sizes) for spec, x in zip(specs, leaves, strict=True)]
    local_rules = sharding.without_axis(spmd.get_logical_axis_rules(), "data")

    def local(leaves, rest, batch, key):
        # varying over 'data': each replica's gradient stays its own until the reduce-scatter
        leaves = [jax.lax.pcast(x, "data", to="varying") for x in leaves]
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        with nnx.logical_axis_rules(local_rules):
            aux, grads = grads_fn(jax.tree.unflatten(treedef, leaves), rest, batch, key)
        summed = [jax.lax.psum(g, "data") if d is None else
                  jax.lax.psum_scatter(g, "data", scatter_dimension=d, tiled=True)
                  for g, d in zip(jax.tree.leaves(grads), dims, strict=True)]
        return jax.lax.psum(aux, "data"), summed

    out_specs = [P() if d is None else P(*(None,) * d, "data") for d in dims]
    aux, summed = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P()),
                                out_specs=(P(), out_specs), axis_names={"data"})(
        leaves, rest, batch, key)
    return aux, jax.tree.unflatten(treedef, summed)


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
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    zero1 = cfg.mesh.shard_optimizer and sizes.get("data", 1) > 1
    if zero1 and not _has_own_shard_map(cfg, sizes):
        aux, grads = _reduce_scattered_grads(grads_fn, params, rest, batch, key)
    else:
        aux, grads = grads_fn(params, rest, batch, key)
    if zero1:  # (a no-op after _reduce_scattered_grads) each replica updates its 1/data slice
        grads = jax.tree.map(
            lambda g, spec: jax.lax.with_sharding_constraint(
                g, sharding.over_data(spec, g.shape, sizes)),
            grads, nnx.get_partition_spec(grads))
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
    logits_BLV = model(batch["inputs"], batch.get("positions"),
                       segment_ids_BL=batch.get("segment_ids"))
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


FAULT_ENV = "LMJAX_FAULT"  # test hook 'phase:N' (step|eval|save|nan|term): docs/reliability.md


def _fault(phase: str, step: int) -> bool:
    """Whether the fault-injection hook names this point; only reliability tests set it."""
    return os.environ.get(FAULT_ENV) == f"{phase}:{step}"


def _crash_if(phase: str, step: int) -> None:
    if _fault(phase, step):  # as an OOM killer or a lost VM would: no cleanup, no flush
        os.kill(os.getpid(), signal.SIGKILL)


def _sync_point(step: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False


@contextlib.contextmanager
def _preemption_notice():
    """Yield `preempted(step) -> bool`, to be asked once a step.

    One process: SIGTERM sets a flag. Several: JAX's preemption sync point (its coordination
    service hears SIGTERM and, on Cloud TPU, maintenance notices), which tells every host the
    same step to stop at, so all of them take part in the same save.
    """
    if jax.process_count() > 1:
        yield _sync_point
    elif threading.current_thread() is not threading.main_thread():  # signals need the main one
        yield lambda step: False
    else:
        notice = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: notice.set())
        try:
            yield lambda step: notice.is_set()
        finally:
            signal.signal(signal.SIGTERM, previous)


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None,
        force_resume: bool = False) -> dict:
    """Train (or resume training) in `workdir`; returns the last logged metrics.

    `devices` (default: all) lets one process train on a subset, e.g. a 1-device baseline.
    `force_resume` continues a workdir whose config.json differs in keys that config.RESUMABLE
    does not allow to change.
    """
    devices = jax.devices() if devices is None else devices
    config_lib.validate(cfg, len(devices))
    profiler.use_compilation_cache(cfg)
    mesh = sharding.make_mesh(cfg, devices)
    data = pipeline.build(cfg, jax.process_index(), jax.process_count())  # checks data, tokenizer
    _check_resumable(cfg, workdir, data.tokenizer, force_resume)
    os.makedirs(workdir, exist_ok=True)

    with (jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)),
          _preemption_notice() as preempted):
        fns = compile_fns(cfg, mesh)
        ckpt = checkpoint.manager(workdir, cfg.checkpoint)
        restored = checkpoint.restore(ckpt, fns.abstract_state)
        if restored is None:
            state, start = fns.init(), 0
            if cfg.train.init_from:  # finetune / extend the context of a trained model
                state = checkpoint.load_params(cfg.train.init_from, state)
        else:
            state, data_state, start = restored
            data.train.set_state(data_state)
        if jax.process_index() == 0:  # only now: a failed restore leaves the workdir as it was
            config_lib.save(cfg, os.path.join(workdir, "config.json"))
            if data.tokenizer is not None:
                with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
                    f.write(data.tokenizer.serialized())
        for problem in sharding.assert_sharded(state, cfg.mesh.rules):
            print(f"warning: {problem}")
        return _loop(cfg, workdir, mesh, fns, state, data, ckpt, start, preempted)


def _check_resumable(cfg, workdir: str, tokenizer, force: bool) -> None:
    """Refuse a workdir written with another config or tokenizer, naming what differs."""
    differ = []
    if os.path.exists(os.path.join(workdir, "config.json")):
        differ = config_lib.resume_conflicts(os.path.join(workdir, "config.json"), cfg)
    saved_tokenizer = os.path.join(workdir, "tokenizer.model")
    if tokenizer is not None and os.path.exists(saved_tokenizer):
        with open(saved_tokenizer, "rb") as f:
            if f.read() != tokenizer.serialized():
                differ.append("tokenizer model file")
    if differ and not force:
        raise ValueError(f"Workdir {workdir} holds a run with a different {', '.join(differ)}; "
                         f"use another --workdir, or --force_resume to continue it anyway.")
    if differ:
        print(f"warning: continuing {workdir} with a different {', '.join(differ)}.")


@dataclasses.dataclass(frozen=True)
class Functions:
    """The jitted programs of a run, all laid out for one mesh."""

    abstract_state: nnx.State  # shapes, dtypes and logical names; no memory
    init: Callable[[], nnx.State]
    step: Callable[[nnx.State, dict], tuple[nnx.State, dict]]
    eval: Callable[[nnx.State, dict], dict]


def with_kernel(cfg: ml_collections.ConfigDict, platform: str,
                weights_sharded: bool = False) -> ml_collections.ConfigDict:
    """`cfg` with model.attention and model.weight_grad resolved for `platform` ('auto' -> what
    it picks); an attention kernel the platform lacks fails here, before anything is compiled.

    weight_grad 'auto' is 'transposed' on CPU with whole weights on every device: where FSDP or
    tensor parallelism splits them, XLA gathers each weight again for the custom backward
    instead of keeping the forward's gather (lmjax plan, bench on 4-way FSDP: all-gather bytes
    +62% unrolled, +17% scanned)."""
    kernel = attention.resolve(cfg.model.attention, platform, cfg.model.dtype)
    weight_grad = cfg.model.weight_grad
    if weight_grad == "auto":
        weight_grad = "transposed" if platform == "cpu" and not weights_sharded else "xla"
    if (kernel, weight_grad) == (cfg.model.attention, cfg.model.weight_grad):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.attention, cfg.model.weight_grad = kernel, weight_grad
    return cfg


def compile_fns(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Functions:
    """Jit init, train and eval steps with explicit shardings; call under the mesh and rules."""
    sizes = dict(mesh.shape)
    cfg = with_kernel(cfg, mesh.devices.flat[0].platform,
                      weights_sharded=sizes.get("fsdp", 1) * sizes.get("tensor", 1) > 1)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: create(cfg)))
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
        init=jax.jit(lambda: nnx.state(create(cfg)), out_shardings=state_shardings),
        step=jax.jit(functools.partial(train_step, graphdef, cfg=cfg),
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, None), donate_argnums=0),
        eval=jax.jit(functools.partial(eval_step, graphdef),
                     in_shardings=(state_shardings, batch_sharding)),
    )


def _loop(cfg, workdir, mesh, fns, state, data, ckpt, start, preempted) -> dict:
    writer = metrics.Writer(workdir, resume_step=start)
    trace = profiler.Window(cfg, workdir)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = flops.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    # the `flops` column counts in the run's convention (its budget's); MFU always in the project's
    counted_per_step = tokens_per_step * flops.flops_per_token(cfg.model, cfg.data.seq_len,
                                                               cfg.train.flops_convention)
    peak = metrics.peak_flops_per_device() * metrics.peak_chips(mesh.devices.flatten().tolist())
    bar = tqdm(total=cfg.train.steps, initial=start, disable=jax.process_index() != 0,
               unit="step", dynamic_ncols=True)
    pending, last = None, {}
    recent = collections.deque(maxlen=20)  # train losses the spike guard compares against
    window_start, window_steps = time.perf_counter(), 0

    def log(step_done, values, extra):
        nonlocal window_start, window_steps, last
        _check_finite(step_done, {**values, **extra})
        loss_now = float(values["train/loss"])
        if cfg.train.spike_factor:
            _check_spike(step_done, loss_now, recent, cfg.train.spike_factor)
        if np.isfinite(loss_now):
            recent.append(loss_now)
        if step_done % cfg.train.log_every and step_done != cfg.train.steps and not extra:
            return
        if window_steps:  # else: a second row for the same window (an eval), same rate
            elapsed = time.perf_counter() - window_start
            rate = window_steps * tokens_per_step / elapsed
            window_start, window_steps = time.perf_counter(), 0
        else:
            rate = last.get("tokens_per_s", 0.0)
        row = {**values, **extra, "tokens": step_done * tokens_per_step, "tokens_per_s": rate,
               "flops": step_done * counted_per_step,
               "mfu": rate * flops_per_step / tokens_per_step / peak}
        writer.write(step_done, row)
        last = row
        bar.set_postfix(loss=f"{values['train/loss']:.3f}", tok_s=f"{rate:,.0f}")

    try:
        for step in range(start, cfg.train.steps):
            local = next(data.train)
            if _fault("nan", step + 1):  # test hook: a batch whose loss is NaN
                local = {**local, "weights": local["weights"] * np.nan}
            batch = sharding.to_global(local, mesh)
            trace.before(step + 1)
            state, step_metrics = fns.step(state, batch)
            trace.after(step + 1, step_metrics)
            _crash_if("step", step + 1)
            if _fault("term", step + 1):  # test hook: a preemption notice, delivered as by a VM
                os.kill(os.getpid(), signal.SIGTERM)
            window_steps += 1
            if pending is not None:  # step n-1's numbers, read while step n runs
                log(pending[0], jax.device_get(pending[1]), {})
            pending = (step + 1, step_metrics)
            bar.update(1)
            done = step + 1
            is_eval = cfg.train.eval_every and done % cfg.train.eval_every == 0
            is_save = done % cfg.checkpoint.every == 0 or done == cfg.train.steps
            if is_eval or is_save or done == cfg.train.steps:
                extra = {}
                if is_eval or done == cfg.train.steps:
                    _crash_if("eval", done)
                    extra = evaluate(fns.eval, state, data.eval_batches, mesh)
                log(done, jax.device_get(step_metrics), extra)  # checks finiteness before a save
                pending = None
            if is_save:
                checkpoint.save(ckpt, done, state, data.train.get_state())
                _crash_if("save", done)  # with an async save, while it is being written
            if preempted(done):
                if pending is not None:
                    log(done, jax.device_get(step_metrics), {})
                if not is_save:
                    checkpoint.save(ckpt, done, state, data.train.get_state())
                ckpt.wait_until_finished()
                print(f"Preempted: saved step {done} in {workdir}; the same command resumes.")
                break
        ckpt.wait_until_finished()
    finally:
        trace.stop()
        bar.close()
        writer.close()
        ckpt.close()
    return last
