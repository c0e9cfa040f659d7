"""`lmjax plan`: compile the real train step for a mesh and say what it costs, allocating nothing.

    lmjax plan --config=configs/bench.py --devices=8 --config.mesh.fsdp=4

The step `lmjax train` runs (train.compile_fns) is lowered on ShapeDtypeStructs and compiled
for the config's mesh, here on fake CPU devices. From the compiled program it reports XLA's
per-device memory plan (`memory_analysis()`) and every collective in the partitioned HLO (kind,
count, bytes of its result), next to what the parallelism should cost on paper:

  DP        one all-reduce of every gradient: param bytes
  FSDP      all-gather of each sharded weight before use (forward, and again in the backward
            unless XLA keeps it), reduce-scatter of its gradient: 1/fsdp of it per device
  TP        all-reduce of the [B/dp, L, D] activations after attention and the MLP, forward
            and backward: 4 per layer

Bytes are per device and per step, counted from each op's result shape as it appears once in
the program (an op inside a loop, e.g. grad_accum's scan, counts once).
"""

import collections
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lmjax import config as config_lib
from lmjax import flops, sharding, train

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = <shape> kind(` with kind plain or the -done half of an async pair (whose result is
# the output alone; the -start half's tuple also holds the operand, so it is skipped).
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
# HBM per chip, bytes: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4,
# /v5p, /v5e, /v6e), by device_kind as libtpu names it ('TPU v5' is v5p).
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5": 95 * 2**30, "TPU v5 lite": 16 * 2**30,
             "TPU v6 lite": 32 * 2**30}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def abstract_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
    """The shapes, dtypes and sharding of one global batch, as the data pipeline yields it."""
    s = sharding.batch_sharding(mesh)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s),
             "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s),
             "weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s)}
    if cfg.data.segment_mask:
        batch["segment_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
        batch["positions"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
    return batch


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """kind -> {'count', 'bytes'} of every collective in an HLO module's text."""
    found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for match in _OP.finditer(hlo_text):
        shape, kind = match.group(1), match.group(2)
        found[kind]["count"] += 1
        for dtype, dims in _ARRAY.findall(shape):
            size = math.prod(int(d) for d in dims.split(",") if d)
            found[kind]["bytes"] += size * _DTYPE_BYTES[dtype]
    return dict(found)


def expected(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int],
             abstract_state) -> dict[str, int]:
    """Per-device collective bytes per step that the parallelism implies, by kind (see above).

    Parameters the preset leaves replicated (norms, and with TP the unsplit ones) are counted in
    the gradient all-reduce; the all-gather counts the forward gather only.
    """
    model_state = abstract_state[0]  # (model, optimizer): the moments never travel
    dp, fsdp, tp = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
    gathered = reduced = 0  # bytes of weights FSDP splits, and of those it does not
    for _, var in sharding._logical_params(model_state):
        spec = sharding.expected_spec(var.get_metadata()["out_sharding"], cfg.mesh.rules)
        nbytes = math.prod(var.shape) * jnp.dtype(var.dtype).itemsize
        axes = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str)
                                                       else entry)}
        local = nbytes // math.prod(mesh_shape[a] for a in axes)
        if "fsdp" in axes and fsdp > 1:
            gathered += local * fsdp
        elif dp * fsdp > 1:
            reduced += local
    out = {"all-reduce": reduced, "all-gather": gathered,
           "reduce-scatter": gathered // fsdp if fsdp > 1 else 0}
    if dp > 1 and fsdp > 1:  # the fsdp-reduced gradient shards are then summed over replicas
        out["all-reduce"] += gathered // fsdp
    if tp > 1:
        rows = cfg.data.global_batch_size // (dp * fsdp)
        act = rows * cfg.data.seq_len * cfg.model.d_model * jnp.dtype(cfg.model.dtype).itemsize
        out["all-reduce"] += 4 * cfg.model.num_layers * act
    return out


def cpu_devices(count: int) -> list:
    """`count` CPU devices to compile for: made up if JAX has not started, else those it has."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already up (tests, a notebook): use what exists
        pass
    devices = jax.devices("cpu")
    if count < 1 or count > len(devices):
        raise ValueError(f"--devices={count} must be between 1 and the {len(devices)} CPU "
                         "devices JAX already started with.")
    return devices[:count]


def tpu_devices(topology: str) -> list:
    """The chips of a TPU topology ('v5p:4x4x2'), to compile for ahead of time from a CPU host.

    libtpu describes the topology without any TPU attached (MaxText's CPU CI does the same).
    """
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--topology={topology!r} could not be described ({e}); it needs "
                         "libtpu (pip install libtpu) and a name such as 'v5p:4x4x2'.") from e


def plan(cfg: ml_collections.ConfigDict, devices=None) -> dict:
    """Compile the train step of `cfg` on `devices` (default: all) and report its costs."""
    devices = jax.devices() if devices is None else devices
    shape = config_lib.validate(cfg, len(devices))
    mesh = sharding.make_mesh(cfg, devices=devices)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        compiled = fns.step.lower(fns.abstract_state, abstract_batch(cfg, mesh)).compile()
    stats = compiled.memory_analysis()
    try:
        hlo = compiled.as_text()
    except jax.errors.JaxRuntimeError:  # a libtpu newer than jaxlib writes HLO it cannot read
        hlo = None
    memory = {name: getattr(stats, f"{name}_size_in_bytes", None) for name in
              ("argument", "output", "alias", "temp", "generated_code")}
    live = [memory[k] for k in ("argument", "output", "temp")]
    # Donated state aliases its outputs, so arguments + outputs + temps counts it twice.
    memory["peak_estimate"] = sum(live) - memory["alias"] if None not in live else None
    mesh_shape = dict(zip(sharding.AXES, shape, strict=True))
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    fits = None if hbm is None or memory["peak_estimate"] is None else (
        memory["peak_estimate"] <= hbm)
    return {"devices": len(devices), "platform": devices[0].platform, "device_kind": kind,
            "hbm_bytes": hbm, "fits": fits, "mesh": mesh_shape,
            "rules": cfg.mesh.rules, "param_bytes": flops.report_dict(cfg)["param_bytes"],
            "memory_per_device": memory,
            "collectives": None if hlo is None else collectives(hlo),
            "expected_bytes": expected(cfg, mesh_shape, fns.abstract_state)}


def report(result: dict) -> str:
    """`plan`'s dict as the table a person reads before launching."""
    mib = 2**20
    mesh = " x ".join(f"{axis}={size}" for axis, size in result["mesh"].items())
    lines = [f"{result['devices']} {result['platform']} devices, mesh {mesh}, rules "
             f"{result['rules']!r}; params {result['param_bytes'] / mib:,.1f} MiB"]
    if result["fits"] is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"{result['device_kind']}: {verdict} in {result['hbm_bytes'] / 2**30:.0f} "
                     f"GiB HBM per chip (peak estimate below)")
    lines.append("memory per device (MiB, XLA's plan):")
    for name, value in result["memory_per_device"].items():
        lines.append(f"  {name:<15} {'n/a' if value is None else f'{value / mib:,.2f}'}")
    lines.append(f"collectives per device per step: {'kind':<19} {'count':>5} {'MiB':>10} "
                 f"{'expected MiB':>13}")
    if result["collectives"] is None:
        lines.append("  (the compiled HLO could not be read back: libtpu and jaxlib differ)")
        return "\n".join(lines)
    kinds = sorted(set(result["collectives"]) | set(result["expected_bytes"]))
    for kind in kinds:
        got = result["collectives"].get(kind, {"count": 0, "bytes": 0})
        want = result["expected_bytes"].get(kind)
        want = "-" if want is None else f"{want / mib:,.2f}"
        lines.append(f"  {'':<32}{kind:<19} {got['count']:>5} {got['bytes'] / mib:>10,.2f} "
                     f"{want:>13}")
    return "\n".join(lines)
