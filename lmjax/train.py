"""The training loop: mesh -> data -> state -> restore -> loop, around a pure, jitted step.

`train_step(state, batch) -> (state, metrics)` is jitted once with explicit shardings and the
state donated, so parameters are updated in place. The loop never waits on the device: it
dispatches step n, then reads step n-1's metrics (nanodo), except where it must (a save).
"""

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from lmjax import checkpoint, flops, loss, metrics, optim, sharding
from lmjax import config as config_lib
from lmjax.data import pipeline
from lmjax.model import Transformer


def create(cfg: ml_collections.ConfigDict) -> tuple[Transformer, nnx.Optimizer]:
    model = Transformer(cfg.model, nnx.Rngs(params=cfg.seed))
    tx = optim.make(cfg.optim, cfg.train.steps)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _loss_and_grads(graphdef, params, rest, batch, num_tokens, key, cfg):
    """Gradient of sum(nll) / num_tokens, so micro-batch gradients add up to the batch's."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=key) if cfg.model.dropout > 0 else None
        logits_BLV = model(batch["inputs"], rngs=rngs)
        share = batch["weights"].sum() / num_tokens  # this micro-batch's share of all tokens
        total, aux = loss.cross_entropy(logits_BLV, batch["targets"], batch["weights"],
                                        cfg.optim.z_loss)
        return total * share, {k: v * share for k, v in aux.items() if k != "num_tokens"}

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict, *,
               cfg: ml_collections.ConfigDict) -> tuple[nnx.State, dict]:
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    num_tokens = jnp.maximum(batch["weights"].sum(), 1.0)
    accum = cfg.train.grad_accum
    grad_fn = functools.partial(_loss_and_grads, model_def, rest=rest, num_tokens=num_tokens,
                                cfg=cfg)
    if accum == 1:
        (_, aux), grads = grad_fn(params, batch=batch, key=key)
    else:  # scan over micro-batches: one micro-batch of activations alive at a time
        micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

        def body(carry, inputs):
            i, mb = inputs
            (_, aux), grads = grad_fn(params, batch=mb, key=jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (aux, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: grad_fn(params, batch=jax.tree.map(lambda x: x[0], micro), key=key)))
        (aux, grads), _ = jax.lax.scan(body, (zeros[0][1], zeros[1]),
                                       (jnp.arange(accum), micro))
    optimizer.update(model, grads)
    out = {f"train/{k}": v for k, v in aux.items()}
    out["train/grad_norm"] = optax.tree.norm(grads)
    out["lr"] = optim.schedule(cfg.optim, cfg.train.steps)(step)
    return nnx.state((model, optimizer)), out


def eval_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> dict:
    """Sums over a batch, so several batches combine into one exact mean."""
    model, _ = nnx.merge(graphdef, state)
    _, aux = loss.cross_entropy(model(batch["inputs"]), batch["targets"], batch["weights"])
    n = aux["num_tokens"]
    return {"loss": aux["loss"] * n, "accuracy": aux["accuracy"] * n, "num_tokens": n}


def evaluate(eval_fn, state, batches: list[dict], mesh) -> dict:
    sums = [eval_fn(state, sharding.to_global(b, mesh)) for b in batches]
    total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums))
    mean_loss = float(total["loss"] / total["num_tokens"])
    return {"eval/loss": mean_loss, "eval/perplexity": float(np.exp(mean_loss)),
            "eval/accuracy": float(total["accuracy"] / total["num_tokens"])}


def _check_finite(step: int, values: dict) -> None:
    for key, value in values.items():
        if not np.all(np.isfinite(value)):
            raise FloatingPointError(f"{key} is {value} at step {step}; stopping the run.")


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Train (or resume training) in `workdir`; returns the last logged metrics.

    `devices` (default: all) lets one process train on a subset, e.g. a 1-device baseline.
    """
    devices = jax.devices() if devices is None else devices
    config_lib.validate(cfg, len(devices))
    mesh = sharding.make_mesh(cfg, devices)
    data = pipeline.build(cfg, jax.process_index(), jax.process_count())  # checks data, tokenizer
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        config_lib.save(cfg, os.path.join(workdir, "config.json"))
    if data.tokenizer is not None and jax.process_index() == 0:
        with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
            f.write(data.tokenizer.serialized())

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = compile_fns(cfg, mesh)
        ckpt = checkpoint.manager(workdir, cfg.checkpoint)
        restored = checkpoint.restore(ckpt, fns.abstract_state)
        if restored is None:
            state, start = fns.init(), 0
        else:
            state, data_state, start = restored
            data.train.set_state(data_state)
        for problem in sharding.assert_sharded(state, cfg.mesh.rules):
            print(f"warning: {problem}")
        return _loop(cfg, workdir, mesh, fns, state, data, ckpt, start, len(devices))


@dataclasses.dataclass(frozen=True)
class Functions:
    """The jitted programs of a run, all laid out for one mesh."""

    abstract_state: nnx.State  # shapes, dtypes and logical names; no memory
    init: Callable[[], nnx.State]
    step: Callable[[nnx.State, dict], tuple[nnx.State, dict]]
    eval: Callable[[nnx.State, dict], dict]


def compile_fns(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Functions:
    """Jit init, train and eval steps with explicit shardings; call under the mesh and rules."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: create(cfg)))
    sharding.check_divisible(abstract_state, mesh, cfg.mesh.rules)
    state_shardings = nnx.get_named_sharding(abstract_state, mesh)
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


def _loop(cfg, workdir, mesh, fns, state, data, ckpt, start, num_devices) -> dict:
    writer = metrics.Writer(workdir, resume_step=start)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = flops.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = metrics.peak_flops_per_device() * num_devices
    bar = tqdm(total=cfg.train.steps, initial=start, disable=jax.process_index() != 0,
               unit="step", dynamic_ncols=True)
    pending, last = None, {}
    window_start, window_steps = time.perf_counter(), 0

    def log(step_done, values, extra):
        nonlocal window_start, window_steps, last
        _check_finite(step_done, values)
        if step_done % cfg.train.log_every and step_done != cfg.train.steps and not extra:
            return
        if window_steps:  # else: a second row for the same window (an eval), same rate
            elapsed = time.perf_counter() - window_start
            rate = window_steps * tokens_per_step / elapsed
            window_start, window_steps = time.perf_counter(), 0
        else:
            rate = last.get("tokens_per_s", 0.0)
        row = {**values, **extra, "tokens": step_done * tokens_per_step, "tokens_per_s": rate,
               "flops": step_done * flops_per_step,
               "mfu": rate * flops_per_step / tokens_per_step / peak}
        writer.write(step_done, row)
        last = row
        bar.set_postfix(loss=f"{values['train/loss']:.3f}", tok_s=f"{rate:,.0f}")

    try:
        for step in range(start, cfg.train.steps):
            batch = sharding.to_global(next(data.train), mesh)
            state, step_metrics = fns.step(state, batch)
            window_steps += 1
            if pending is not None:  # step n-1's numbers, read while step n runs
                log(pending[0], jax.device_get(pending[1]), {})
            pending = (step + 1, step_metrics)
            bar.update(1)
            done = step + 1
            is_eval = cfg.train.eval_every and done % cfg.train.eval_every == 0
            is_save = done % cfg.checkpoint.every == 0 or done == cfg.train.steps
            if is_eval or is_save or done == cfg.train.steps:
                extra = evaluate(fns.eval, state, data.eval_batches, mesh) if (
                    is_eval or done == cfg.train.steps) else {}
                log(done, jax.device_get(step_metrics), extra)  # checks finiteness before a save
                pending = None
            if is_save:
                checkpoint.save(ckpt, done, state, data.train.get_state())
        ckpt.wait_until_finished()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return last
