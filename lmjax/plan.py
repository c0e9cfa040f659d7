"""`lmjax plan`: compile the real train step for a mesh and say what it costs, allocating nothing.

    lmjax plan --config=configs/bench.py --devices=8 --config.mesh.fsdp=4

The step `lmjax train` runs (train.compile_fns) is lowered on ShapeDtypeStructs and compiled
for the config's mesh, here on fake CPU devices. From the compiled program it reports XLA's
per-device memory plan (`memory_analysis()`) and every collective in the partitioned HLO (kind,
count, bytes of its result), next to what the parallelism should cost on paper:

  DP        one all-reduce of every gradient: param bytes
  FSDP      all-gather of each sharded weight before use (forward, and again in the backward
            unless XLA keeps it), reduce-scatter of its gradient: 1/fsdp of it per device; the
            embedding table is not gathered: the lookup sends rows to the devices holding
            their columns and back (all-to-all, the device's tokens x d_model each way)
  TP        all-reduce of the [B/dp, L, D] activations after attention and the MLP, forward
            and backward: 4 per layer
  EP        (mesh.expert > 1, lmjax/moe.py) per MoE layer, each device's tokens go to the
            experts' devices and back, forward and backward (and the forward's again under
            remat): theory per token top_k x d_model x bytes, x2 for the return. Capacity
            dispatch sends queues of capacity_factor times that (rounded up) by all-to-all;
            dropless a ragged all-to-all, whose result (counted here) is a receive buffer
            sized for the worst case (ep x theory there, theory back; the roofline counts
            theory), or on CPU an all-to-all of every expert's slice padded to T x top_k rows
  ZeRO-1    (mesh.shard_optimizer, data > 1) DP's all-reduce becomes a reduce-scatter of each
            gradient over 'data' (1/data of it per device) and an all-gather of the updated
            weight; a weight no dimension of which 'data' divides is still all-reduced

Bytes are per device and per step, counted from each op's result shape as it appears once in
the program, times its loop's trip count (scan over layers, grad_accum's scan).
"""

import collections
import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lmjax import chips, flops, moe, sharding, train, validate
from lmjax.data import batch

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
# `%name = <shape> kind(` with kind plain or the -done half of an async pair (whose result is
# the output alone; the -start half's tuple also holds the operand, so it is skipped).
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_LOOP = re.compile(r"condition=(%[^\s,]+), body=(%[^\s,]+)")
_BOUND = re.compile(r"s32\[\]\S* constant\((\d+)\)")


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """kind -> {'count', 'bytes'} of every collective in an HLO module's text, per execution:
    an op in a while loop's body counts once per trip (scan over layers, grad_accum)."""
    found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for text, times in _computations(hlo_text):
        for match in _OP.finditer(text):
            shape, kind = match.group(1), match.group(2)
            found[kind]["count"] += times
            for dtype, dims in _ARRAY.findall(shape):
                size = math.prod(int(d) for d in dims.split(",") if d)
                found[kind]["bytes"] += size * _DTYPE_BYTES[dtype] * times
    return dict(found)


def _computations(hlo_text: str) -> list[tuple[str, int]]:
    """(text, times it runs per execution) of each computation. HLO text defines callees
    before callers, so walking backwards from ENTRY sees each loop before its body."""
    parts = re.split(r"^(?=(?:ENTRY )?%\S+ .*\{$)", hlo_text, flags=re.M)
    names = [re.match(r"(?:ENTRY )?(%\S+)", p).group(1) if p.startswith(("%", "ENTRY")) else ""
             for p in parts]
    by_name = dict(zip(names, parts, strict=True))
    times = collections.defaultdict(lambda: 1)
    for name, text in zip(reversed(names), reversed(parts), strict=True):
        for line in re.findall(r".*\bwhile\(.*", text):
            loop = _LOOP.search(line)
            if loop is None:
                continue
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if trips is None:  # TPU: no trip count attached; a scan's condition is i < N
                trips = _BOUND.search(by_name.get(loop.group(1), ""))
            times[loop.group(2)] = times[name] * (int(trips.group(1)) if trips else 1)
    return [(text, times[name]) for name, text in zip(names, parts, strict=True)]


def expected(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int],
             abstract_state, platform: str = "cpu") -> dict[str, int]:
    """Per-device collective bytes per step that the parallelism implies, by kind (see above).

    Parameters the preset leaves replicated (norms, and with TP the unsplit ones) are counted in
    the gradient all-reduce. The all-gather counts the forward gather, plus, with
    model.scan_layers, a second gather of the layers' weights in the backward scan: a scan keeps
    only what its body saves per layer, and the gathered weights are cheaper to fetch again.
    A 'seq' axis holds replicas of every weight, so gradients are summed over it too.
    """
    model_state = abstract_state[0]  # (model, optimizer): the moments never travel
    dp, fsdp, tp = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
    m_d = cfg.model.d_model
    zero1 = cfg.mesh.shard_optimizer and dp > 1
    out = {"all-reduce": 0, "all-gather": 0, "reduce-scatter": 0}
    for _, var in sharding._logical_params(model_state):
        names = var.get_metadata()["out_sharding"]
        spec = sharding.expected_spec(names, cfg.mesh.rules)
        nbytes = math.prod(var.shape) * jnp.dtype(var.dtype).itemsize
        axes = {a for entry in spec for a in sharding.axes_of(entry)}
        local = nbytes // math.prod(mesh_shape[a] for a in axes)  # one device's shard
        replicas = mesh_shape["seq"]  # other devices with the same shard, gradients summed
        vocab_ways = math.prod(mesh_shape[a] for a in sharding.axes_of(spec[0]))
        if tuple(names) == ("vocab", "embed") and "fsdp" in axes and fsdp > 1 and vocab_ways == 1:
            # the lookup's rows go to their columns' devices and back (sharding.embed_lookup):
            # f32 rows forward, compute-dtype gradients backward
            out["all-to-all"] = out.get("all-to-all", 0) + _tokens(cfg, mesh_shape) * m_d * (
                jnp.dtype(var.dtype).itemsize + jnp.dtype(cfg.model.dtype).itemsize)
            if not cfg.model.tie_embeddings:  # else the unembedding gathers it as any weight
                continue
        if "fsdp" in axes and fsdp > 1:  # gathered before use; its gradient reduce-scattered
            out["all-gather"] += local * fsdp * (2 if "layers" in names else 1)
            out["reduce-scatter"] += local
        else:
            replicas *= fsdp
        # over 'data' too, unless ZeRO-1 reduce-scatters it there (and gathers the new shard)
        if zero1 and sharding.data_dim(spec, var.shape, mesh_shape) is not None:
            out["reduce-scatter"] += local // dp
            out["all-gather"] += local
        else:
            replicas *= dp
        if "expert" not in axes:  # the batch is split over 'expert' too
            replicas *= mesh_shape["expert"]
        if replicas > 1:
            out["all-reduce"] += local
    if mesh_shape["expert"] > 1:
        kind, nbytes = exchange_bytes(cfg, mesh_shape, platform)
        out[kind] = out.get(kind, 0) + nbytes
    if tp > 1:
        act = _tokens(cfg, mesh_shape) * m_d * jnp.dtype(cfg.model.dtype).itemsize
        out["all-reduce"] += 4 * cfg.model.num_layers * act
    return out


def _tokens(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> int:
    """Tokens of the batch on one device: rows split over data x fsdp x expert, seq split."""
    rows = cfg.data.global_batch_size // math.prod(mesh_shape[a] for a in sharding.BATCH)
    return rows * cfg.data.seq_len // mesh_shape["seq"]


def exchange_bytes(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                   platform: str = "cpu", theory: bool = False) -> tuple[str, int]:
    """Expert parallelism's exchange per device and step (EP above): (collective kind, bytes).
    Capacity: the [E, C, D] queues as moe.capacity sizes them. Dropless: a ragged all-to-all's
    result is its receive buffer, every peer's T·top_k rows going out and the device's own
    coming back; padded (CPU), every one of E slices is padded to T·top_k rows. `theory`:
    top_k x d_model per token each way, what balanced routing sends."""
    m = cfg.model
    rows = cfg.data.global_batch_size // (cfg.train.grad_accum * mesh_shape["data"]
                                          * mesh_shape["fsdp"] * mesh_shape["expert"])
    tokens = rows * cfg.data.seq_len // mesh_shape["seq"]  # per device and micro-batch
    assigned, kind = m.moe.top_k * tokens, "all-to-all"
    if theory:
        there = back = assigned
    elif m.moe.dispatch == "capacity":
        there = back = m.moe.num_experts * moe.capacity(tokens, m)
    elif moe.resolve_exchange(m.moe.exchange, platform) == "ragged":
        kind, there, back = "ragged-all-to-all", mesh_shape["expert"] * assigned, assigned
    else:
        there = back = m.moe.num_experts * assigned
    passes = 2 if m.remat == "none" else 3  # forward, (remat's forward,) backward
    times = cfg.train.grad_accum * moe.num_moe_layers(m)
    nbytes = times * passes * (there + back) * m.d_model * jnp.dtype(m.dtype).itemsize
    if m.moe.dispatch == "dropless" and kind == "all-to-all" and not theory:
        nbytes += times * (passes - 1) * 2 * m.moe.num_experts * 4  # forwards' int32 offsets
    return kind, nbytes


def roofline(*, flops_per_device: float, hbm_bytes_per_device: float | None,
             ici_bytes: float, dcn_bytes: float, model_flops_per_device: float,
             chip: chips.Chip) -> dict:
    """Step time bounds from a roofline: each resource at its peak rate.

    compute = FLOPs / peak FLOP/s; memory = HBM bytes accessed / HBM bandwidth; communication =
    ICI bytes / ICI bandwidth + DCN bytes / DCN bandwidth. The estimate is the max of the three
    (XLA overlaps collectives with compute and streams HBM under the MXUs, so at best the
    slowest resource alone sets the pace): a lower bound on step time, so an upper bound on MFU.
    Their sum (no overlap at all) is reported beside it as the pessimistic end.
    """
    peak = chip.peak_flops
    compute = flops_per_device / peak
    memory = None if hbm_bytes_per_device is None else hbm_bytes_per_device / chip.hbm_bw
    dcn_bw = chip.dcn_bw or chip.ici_bw  # unpublished DCN: costed as ICI (said in the report)
    comm = ici_bytes / chip.ici_bw + dcn_bytes / dcn_bw
    times = {"compute": compute, "memory": memory or 0.0, "communication": comm}
    step = max(times.values())
    return {"compute_s": compute, "memory_s": memory, "communication_s": comm,
            "step_s": step, "step_s_no_overlap": sum(times.values()),
            "bound": max(times, key=times.get),
            "mfu": model_flops_per_device / peak / step if step else None}


def link_bytes(found: dict[str, dict[str, int]], ways: int) -> int:
    """Bytes a device sends for the collectives of one step, from their result sizes: a ring
    all-reduce sends ~2x its result, an all-gather ~1x, a reduce-scatter ~(ways - 1)x its (1/ways)
    result; point-to-point ops (ring attention's permutes, all-to-all) 1x."""
    weight = {"all-reduce": 2, "reduce-scatter": max(ways - 1, 1)}
    return sum(v["bytes"] * weight.get(kind, 1) for kind, v in found.items())


def plan(cfg: ml_collections.ConfigDict, devices=None, hbm_bytes: int | None = None) -> dict:
    """Compile the train step of `cfg` on `devices` (default: all) and report its costs.

    `hbm_bytes` sizes against other than the datasheet's HBM per chip (headroom; a CPU standing
    in for a chip). A step XLA cannot fit in the chip's HBM is a result, not an error: `fits`
    False, XLA's sentence in `error`, and no memory plan, collectives or roofline.
    """
    devices = jax.devices() if devices is None else devices
    shape = validate.validate(cfg, len(devices))
    mesh = sharding.make_mesh(cfg, devices=devices)
    start, compiled, error = time.perf_counter(), None, None
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        abstract = batch.abstract((cfg.data.global_batch_size, cfg.data.seq_len),
                                  cfg.data.segment_mask, sharding.batch_sharding(mesh))
        lowered = fns.step.lower(fns.abstract_state, abstract)
        lower_s = time.perf_counter() - start
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a step over its HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            error = str(e).strip().splitlines()[0]
    compile_s = time.perf_counter() - start - lower_s
    stats = compiled.memory_analysis() if compiled else None
    try:
        hlo = compiled.as_text() if compiled else None
    except jax.errors.JaxRuntimeError:  # a libtpu newer than jaxlib writes HLO it cannot read
        hlo = None
    memory = {name: getattr(stats, f"{name}_size_in_bytes", None) for name in
              ("argument", "output", "alias", "temp", "generated_code")}
    live = [memory[k] for k in ("argument", "output", "temp")]
    # Donated state aliases its outputs, so arguments + outputs + temps counts it twice.
    memory["peak_estimate"] = sum(live) - memory["alias"] if None not in live else None
    mesh_shape = dict(zip(sharding.AXES, shape, strict=True))
    kind = devices[0].device_kind
    chip = chips.lookup(kind)
    hbm = hbm_bytes or (None if chip is None else chip.hbm_bytes)
    fits = False if error else None if hbm is None or memory["peak_estimate"] is None else (
        memory["peak_estimate"] <= hbm)
    found = None if hlo is None else collectives(hlo)
    want = expected(cfg, mesh_shape, fns.abstract_state, devices[0].platform)
    return {"devices": len(devices), "platform": devices[0].platform, "device_kind": kind,
            "hbm_bytes": hbm, "fits": fits, "error": error, "mesh": mesh_shape,
            "lower_s": lower_s, "compile_s": compile_s,
            "rules": cfg.mesh.rules, "param_bytes": flops.report_dict(cfg)["param_bytes"],
            "memory_per_device": memory, "collectives": found, "expected_bytes": want,
            "all_to_all_theory": (exchange_bytes(cfg, mesh_shape, theory=True)[1]
                                  if mesh_shape["expert"] > 1 else None),
            "hlo": hlo,  # the compiled program's text (None: unreadable), for checks and tests
            "roofline": compiled and step_roofline(cfg, compiled.cost_analysis(), found or want,
                                                   mesh_shape, len(devices), kind)}


def step_roofline(cfg: ml_collections.ConfigDict, cost: dict | list | None, found: dict,
                  mesh_shape: dict[str, int], num_devices: int, kind: str) -> dict | None:
    """The roofline of a step of `cfg` compiled for `kind` chips (None: a CPU), from XLA's
    cost analysis and the collectives found in its HLO (or, unreadable, plan.expected's):
    also for another codebase's step of the same model (experiments/tpu_aot_vs_maxtext)."""
    chip = chips.lookup(kind)
    if chip is None:
        return None
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    model_flops = flops.flops_per_token(cfg.model, cfg.data.seq_len) * tokens / num_devices
    # By kind, coarsely: gradient all-reduces (ZeRO-1: scatters and gathers) cross slices when
    # data spans them, weight gathers and gradient scatters when fsdp does, ring attention's
    # permutes when seq does.
    dcn = sharding.dcn_shape(cfg)
    zero1 = ("reduce-scatter", "all-gather") if cfg.mesh.shard_optimizer else ()
    crossing = {op for axis, ops in (("data", ("all-reduce", *zero1)),
                                         ("fsdp", ("all-gather", "reduce-scatter")),
                                         ("seq", ("collective-permute",)),
                                         ("tensor", ("all-reduce",)),
                                         ("expert", ("all-to-all", "ragged-all-to-all")))
                if dcn[sharding.AXES.index(axis)] > 1 for op in ops}
    measured = {k: v if isinstance(v, dict) else {"bytes": v} for k, v in found.items()}
    if "ragged-all-to-all" in measured:  # its result is a worst-case buffer: count what moves
        measured["ragged-all-to-all"] = {"bytes": exchange_bytes(cfg, mesh_shape,
                                                                 theory=True)[1]}
    # reduce-scatters run over 'fsdp', or with ZeRO-1 over 'data' too: costed at the wider
    ways = max(mesh_shape["fsdp"], mesh_shape["data"] if cfg.mesh.shard_optimizer else 1)
    total = link_bytes(measured, ways)
    dcn_bytes = link_bytes({k: v for k, v in measured.items() if k in crossing}, ways)
    # The larger count: HLO FLOPs include masked work, but none of a custom call's (splash
    # and other Pallas kernels are invisible to XLA's cost analysis) and a loop body's once
    # (scan_layers); model FLOPs plus full remat's second forward (4/3) are the floor.
    executed = model_flops * (4 / 3 if cfg.model.remat == "full" else 1)
    used = max(cost.get("flops") or 0.0, executed)
    out = roofline(flops_per_device=used,
                   hbm_bytes_per_device=cost.get("bytes accessed"),
                   ici_bytes=total - dcn_bytes, dcn_bytes=dcn_bytes,
                   model_flops_per_device=model_flops, chip=chip)
    out.update(tokens_per_s_per_chip=tokens / num_devices / out["step_s"] if out["step_s"]
               else None,
               peak_flops=chip.peak_flops, model_flops_per_device=model_flops, flops_used=used,
               flops_source="compiled HLO" if used > executed else "model FLOPs x remat",
               hlo_flops_per_device=cost.get("flops"), dcn_bytes=dcn_bytes,
               hlo_bytes_accessed=cost.get("bytes accessed"),
               link_bytes=total, dcn_published=chip.dcn_bw is not None)
    return out


def report(result: dict) -> str:
    """`plan`'s dict as the table a person reads before launching."""
    mib = 2**20
    mesh = " x ".join(f"{axis}={size}" for axis, size in result["mesh"].items())
    lines = [f"{result['devices']} {result['platform']} devices, mesh {mesh}, rules "
             f"{result['rules']!r}; params {result['param_bytes'] / mib:,.1f} MiB"]
    lines.append(f"lowered in {result['lower_s']:.1f} s, compiled in {result['compile_s']:.1f} s")
    if result["error"]:
        return "\n".join([*lines, f"{result['device_kind']}: does NOT fit: {result['error']}"])
    if result["fits"] is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"{result['device_kind']}: {verdict} in {result['hbm_bytes'] / 2**30:,.2f} "
                     f"GiB HBM per chip (peak estimate below)")
    lines += _roofline_lines(result["roofline"])
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
    if result["all_to_all_theory"] is not None:
        padding = ("the worst-case receive buffers; the roofline counts theory"
                   if "ragged-all-to-all" in result["expected_bytes"] else
                   "the capacity padding (dropless on CPU: every slice padded to T x top_k rows)")
        lines.append(f"  expert exchange theory (top_k x d_model x bytes per token, x2 return; "
                     f"fwd, bwd, remat): {result['all_to_all_theory'] / mib:,.2f} MiB; expected "
                     f"adds {padding}")
    return "\n".join(lines)


def _roofline_lines(r: dict | None) -> list[str]:
    if r is None:
        return ["roofline: n/a (no datasheet figures for this device; see lmjax/chips.py)"]
    ms = lambda t: "n/a" if t is None else f"{t * 1e3:,.2f} ms"
    lines = [f"roofline per step (datasheet peaks, lmjax/chips.py): "
             f"estimate {ms(r['step_s'])} ({r['bound']}-bound; {ms(r['step_s_no_overlap'])} "
             f"if nothing overlapped), MFU <= {r['mfu']:.1%}, "
             f"<= {r['tokens_per_s_per_chip']:,.0f} tokens/s per chip",
             f"  compute        {ms(r['compute_s'])}: "
             f"{r['flops_used'] / 1e12:,.3f} TFLOP per chip ({r['flops_source']}) at "
             f"{r['peak_flops'] / 1e12:,.0f} "
             f"TFLOP/s; model FLOPs (lmjax/flops.py) {r['model_flops_per_device'] / 1e12:,.3f}",
             f"  memory         {ms(r['memory_s'])} (HBM bytes accessed, compiled cost analysis;"
             f" it counts a loop body once, so a floor under model.scan_layers)",
             f"  communication  {ms(r['communication_s'])}: {r['link_bytes'] / 2**20:,.1f} MiB "
             f"sent per chip, {r['dcn_bytes'] / 2**20:,.1f} MiB of it across slices"]
    if r["dcn_bytes"] and not r["dcn_published"]:
        lines.append("  (no published DCN bandwidth for this chip: DCN costed at ICI speed)")
    return lines
