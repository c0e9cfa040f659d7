"""`lmjax coord-check`: is the parametrization right? Activation scales vs width, step by step.

The coordinate check of Yang et al. 2022 (Tensor Programs V, Fig. 5 and Appendix D.1): train
the same config at several widths for a few steps and record the mean |x| of each activation.
Under μP every curve is flat in width at every step; under SP the logits (and, with Adam, the
hidden outputs) grow with width as soon as training starts, which is why SP's best learning
rate shifts with width. A curve that grows under μP is a bug in lmjax/mup.py or the model.

Each width keeps head_dim and scales d_model, heads and mlp_dim by width / d_model; layers are
unrolled (model.scan_layers=False) so each block's outputs can be captured, and the learning
rate is constant (no warmup) so a few steps move the weights. Measured on one fixed batch
(the first), after 0, 1, ..., steps updates, on one device.
"""

import copy
import io
import json

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmjax import paths, sharding, train, validate  # noqa: E402
from lmjax.data import pipeline  # noqa: E402
from lmjax.model import PARAMETRIZATIONS  # noqa: E402


def width_config(cfg: ml_collections.ConfigDict, width: int,
                 parametrization: str) -> ml_collections.ConfigDict:
    """`cfg` at d_model=width (heads and mlp_dim in proportion, head_dim kept), for a few
    constant-LR steps on one device."""
    m = cfg.model
    sizes = {"num_heads": m.num_heads * width / m.d_model,
             "num_kv_heads": m.num_kv_heads * width / m.d_model,
             "mlp_dim": m.mlp_dim * width / m.d_model}
    for key, value in sizes.items():
        if value != int(value) or value < 1:
            raise ValueError(f"Width {width} gives model.{key}={value:g}; pick widths that scale "
                             f"model.{key}={m[key]} of d_model={m.d_model} to a whole number.")
    out = copy.deepcopy(cfg)
    with out.unlocked():
        out.model.update(d_model=width, parametrization=parametrization, scan_layers=False,
                         dropout=0.0, **{k: int(v) for k, v in sizes.items()})
        out.optim.update(schedule="constant", warmup_steps=0)
        out.mesh.update(data=1, fsdp=1, tensor=1)
    return out


def _stats_fn(graphdef):
    """state, tokens -> {activation: mean |x|}; every module's output is captured with
    nnx.capture, so no sow calls are needed in the model."""

    def stats(state, tokens_BL):
        model, _ = nnx.merge(graphdef, state)
        capture = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
        logits_BLV, captured = capture(tokens_BL)
        out = {"embed": jnp.abs(model.embed.embedding[...][tokens_BL]).mean(),
               "logits": jnp.abs(logits_BLV).mean()}
        for path, value in nnx.to_flat_state(captured):
            names = [str(p) for p in path]
            if len(names) == 4 and names[0] == "blocks" and names[2] in ("attn", "mlp"):
                out[f"block{names[1]}.{names[2]}"] = jnp.abs(value.get_value()[0]).mean()
        return out

    return stats


def measure(cfg: ml_collections.ConfigDict, batches: list[dict], device) -> list[dict]:
    """mean |activation| on batches[0] after 0..len(batches) steps of training on `batches`."""
    validate.validate(cfg, 1)
    mesh = sharding.make_mesh(cfg, [device])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: train.create(cfg)))
        stats = jax.jit(_stats_fn(graphdef))
        state = fns.init()
        probe = sharding.to_global(batches[0], mesh)["inputs"]
        rows = [jax.device_get(stats(state, probe))]
        for batch in batches:
            state, _ = fns.step(state, sharding.to_global(batch, mesh))
            rows.append(jax.device_get(stats(state, probe)))
    return [{k: float(v) for k, v in row.items()} for row in rows]


def run(cfg: ml_collections.ConfigDict, widths: list[int], steps: int,
        out: paths.PathLike) -> dict:
    """Measure every width under SP and μP; write coord_check.json and one PNG per
    parametrization into `out` (a folder or gs:// URL); return {parametrization: {width: [row
    per step]}}."""
    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.train.update(steps=steps)
    data = pipeline.build(width_config(cfg, widths[0], "sp"), 0, 1)
    batches = [next(data.train) for _ in range(steps)]
    device = jax.devices()[0]
    results = {p: {w: measure(width_config(cfg, w, p), batches, device) for w in widths}
               for p in PARAMETRIZATIONS}
    out = paths.resolve(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(results, indent=1))
    for p in PARAMETRIZATIONS:
        plot(results[p], f"{p}: mean |activation| vs width", out / f"coord_check_{p}.png")
    return results


def slope(results: dict, name: str, step: int) -> float:
    """Least-squares slope of log |activation| against log width at `step` (0 = flat)."""
    widths = sorted(results)
    values = [results[w][step][name] for w in widths]
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def plot(results: dict, title: str, path: paths.PathLike) -> None:
    """One panel per activation: a line per step, x = width (log2), y = mean |x| (log)."""
    widths = sorted(results)
    names = list(results[widths[0]][0])
    steps = len(results[widths[0]])
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, steps))
    for ax, name in zip(axes.flat, names, strict=False):
        for t in range(steps):
            ax.plot(widths, [results[w][t][name] for w in widths], "o-", color=colors[t],
                    label=f"step {t}", markersize=3)
        ax.set(yscale="log", title=name, xlabel="width (d_model)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()  # matplotlib writes local files only; gs:// takes whole objects
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    paths.resolve(path).write_bytes(png.getvalue())


def report(results: dict, steps: int) -> str:
    """Slopes of log|x| vs log width at the last step: ~0 under μP, > 0 under SP."""
    names = list(next(iter(results["sp"].values()))[0])
    lines = [f"slope of log mean|x| vs log width after {steps} steps (0 = flat)",
             f"{'activation':<16}" + "".join(f"{p:>8}" for p in PARAMETRIZATIONS)]
    for name in names:
        lines.append(f"{name:<16}" + "".join(
            f"{slope(results[p], name, steps):>8.2f}" for p in PARAMETRIZATIONS))
    return "\n".join(lines)
