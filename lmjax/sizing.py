"""`lmjax plan --max_batch` and `--search`: size a run before renting the slice.

Each question is answered by compiling the real step (plan.plan) for each candidate, so what
"fits" means is XLA's own memory plan for the chip (or `--hbm_gib` of it), not a formula:

  --max_batch  the largest global batch whose step fits, in steps the mesh can split: from the
               config's batch and twice it, XLA's peak is extended as a line in the batch to
               where it meets the HBM, and that batch and the next are compiled (4 compiles
               when the line holds, as it does when activations dominate); where it does not,
               doubling, then bisection. XLA's peak is not monotonic in the batch near the
               HBM (1B on v5p-8: 1,016 rows over, 1,080 under), so "largest" is what the search
               proves: that batch fits and the next does not.
  --search     every (data, fsdp, tensor) split of a slice's chips, with and without ZeRO-1
               where data > 1, under each remat policy, at the config's batch; those that
               fit, ranked by their roofline step-time bound. The other axes (seq, expert, the
               dcn_* sizes) stay as configured.
"""

import copy
import math

import ml_collections

from lmjax import model, plan, sharding

MAX_DOUBLINGS = 16  # 65,536 times the smallest batch: far past any chip's memory
REMATS = ("none", "dots_saveable", "full")


def with_keys(cfg: ml_collections.ConfigDict, **keys) -> ml_collections.ConfigDict:
    """A copy of `cfg` with dotted keys set ('data.global_batch_size': 64)."""
    out = copy.deepcopy(cfg)
    for dotted, value in keys.items():
        section, name = dotted.split(".")
        out[section][name] = value
    return out


def candidate(cfg: ml_collections.ConfigDict, mesh: dict[str, int], remat: str
              ) -> ml_collections.ConfigDict:
    """`cfg` on one of --search's meshes and remat policies (the rules that split every axis
    it names; with size 1 an axis splits nothing)."""
    keys = {f"mesh.{axis}": size for axis, size in mesh.items()}
    return with_keys(cfg, **keys, **{"mesh.rules": "fsdp_tp", "model.remat": remat})


def batch_unit(cfg: ml_collections.ConfigDict, num_devices: int) -> int:
    """The step between global batches the mesh can split: a row per batch-splitting device
    (data x fsdp x expert) in each of train.grad_accum micro-batches."""
    sizes = dict(zip(sharding.AXES, sharding.mesh_shape(cfg, num_devices), strict=True))
    return sizes["data"] * sizes["fsdp"] * sizes["expert"] * cfg.train.grad_accum


def max_batch(cfg: ml_collections.ConfigDict, devices: list, hbm_bytes: int | None = None,
              plan_fn=plan.plan) -> dict:
    """{'global_batch', 'per_device_batch', 'plan' (of that batch), 'probes'}: the largest global
    batch whose compiled step fits; global_batch None when even the smallest does not."""
    unit = batch_unit(cfg, len(devices))
    probes: dict[int, dict] = {}

    def fits(k: int) -> bool:
        result = plan_fn(with_keys(cfg, **{"data.global_batch_size": k * unit}), devices, hbm_bytes)
        if result["fits"] is None:
            raise ValueError(f"--max_batch needs the HBM of a chip to size against; "
                             f"{result['device_kind']} has none in lmjax/chips.py: compile for "
                             f"a --topology or give --hbm_gib.")
        probes[k] = result
        return result["fits"]

    def peak(k: int) -> int:
        return probes[k]["memory_per_device"]["peak_estimate"]

    start = max(cfg.data.global_batch_size // unit, 1)
    low, high = (start, None) if fits(start) else (0, start)  # fits at low (0: none), not high
    if high is None:
        high = None if fits(2 * start) else 2 * start
        if high is None:  # peak is close to a line in the batch: aim at where it meets the HBM
            low = 2 * start
            slope = (peak(low) - peak(start)) / start
            limit = probes[low]["hbm_bytes"]
            aim = low + int((limit - peak(low)) / slope) if slope > 0 else 2 * low
            if aim > low:
                low, high = (aim, None) if fits(aim) else (low, aim)
                if high is None:
                    low, high = (aim + 1, None) if fits(aim + 1) else (low, aim + 1)
    k = 2 * low
    while high is None and k <= 2**MAX_DOUBLINGS:  # the line was wrong: double, then bisect
        low, high, k = (k, None, 2 * k) if fits(k) else (low, k, k)
    while high is not None and high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return {"global_batch": low * unit or None,
            "per_device_batch": low * unit / len(devices) if low else None,
            "plan": probes.get(low), "unit": unit,
            "probes": [(k * unit, probes[k]["fits"], probes[k]["memory_per_device"]
                        ["peak_estimate"]) for k in sorted(probes)]}


def meshes(cfg: ml_collections.ConfigDict, num_devices: int, zero1: bool = True
           ) -> list[dict[str, int]]:
    """Every {'data', 'fsdp', 'tensor', 'shard_optimizer'} whose product is the chips per slice
    that seq and expert leave, most data-parallel first; with `zero1`, a mesh with data > 1
    (in a slice or across slices) both without and with ZeRO-1, which splits the optimizer
    state over 'data' and changes how gradients are summed (elsewhere it changes nothing)."""
    dcn = math.prod(sharding.dcn_shape(cfg))
    free = num_devices // dcn // (max(cfg.mesh.seq, 1) * max(cfg.mesh.expert, 1))
    divisors = [d for d in range(1, free + 1) if free % d == 0]
    splits = [{"data": free // (f * t), "fsdp": f, "tensor": t}
              for t in divisors for f in divisors if free % (f * t) == 0]
    data_dcn = sharding.dcn_shape(cfg)[sharding.AXES.index("data")]
    return [{**split, "shard_optimizer": on} for split in splits
            for on in ((False, True) if zero1 and split["data"] * data_dcn > 1 else (False,))]


def search(cfg: ml_collections.ConfigDict, devices: list, remats: tuple[str, ...] = REMATS,
           hbm_bytes: int | None = None, plan_fn=plan.plan, zero1: bool = True) -> list[dict]:
    """One row per (mesh, remat) of `meshes`: {'mesh', 'remat', 'fits', 'peak', 'step_s',
    'bound', 'tokens_per_s_per_chip', 'why'}, those that fit first, fastest bound first. A mesh
    the model cannot split (heads, widths, the batch) is a row with its reason in 'why'."""
    unknown = sorted(set(remats) - {"none", *model.REMAT_POLICIES})
    if unknown:
        raise ValueError(f"--remats names {', '.join(unknown)}, which model.remat does not know "
                         f"(it takes none, {', '.join(model.REMAT_POLICIES)}).")
    rows = []
    for mesh in meshes(cfg, len(devices), zero1):
        for remat in remats:
            row = {"mesh": mesh, "remat": remat, "fits": False, "peak": None, "step_s": None,
                   "bound": None, "tokens_per_s_per_chip": None, "why": None}
            try:
                result = plan_fn(candidate(cfg, mesh, remat), devices, hbm_bytes)
            except ValueError as e:  # validate's sentence: the split does not divide
                rows.append({**row, "why": str(e)})
                continue
            roof = result["roofline"] or {}
            rows.append({**row, "fits": result["fits"], "why": result["error"],
                         "peak": result["memory_per_device"]["peak_estimate"],
                         "step_s": roof.get("step_s"), "bound": roof.get("bound"),
                         "tokens_per_s_per_chip": roof.get("tokens_per_s_per_chip")})
    return sorted(rows, key=lambda r: (not r["fits"], r["step_s"] is None,
                                       r["step_s"] or 0.0))


def search_report(rows: list[dict], hbm_bytes: int | None) -> str:
    gib = 2**30
    limit = "" if hbm_bytes is None else f" of {hbm_bytes / gib:,.2f} GiB"
    lines = [f"{'data':>5} {'fsdp':>5} {'tensor':>6} {'zero1':<5} {'remat':<14} {'fits':<5} "
             f"{'peak GiB' + limit:>14} {'step bound':>11} {'bound':<14} {'tokens/s/chip':>13}"]
    for r in rows:
        m = r["mesh"]
        peak = "-" if r["peak"] is None else f"{r['peak'] / gib:,.3g}"
        step = "-" if r["step_s"] is None else f"{r['step_s'] * 1e3:,.3g} ms"
        speed = ("-" if r["tokens_per_s_per_chip"] is None
                 else f"{r['tokens_per_s_per_chip']:,.0f}")
        zero1 = "yes" if m["shard_optimizer"] else "no"
        lines.append(f"{m['data']:>5} {m['fsdp']:>5} {m['tensor']:>6} {zero1:<5} {r['remat']:<14} "
                     f"{'yes' if r['fits'] else 'no':<5} {peak:>14} {step:>11} "
                     f"{r['bound'] or '-':<14} {speed:>13}" + (f"  ({r['why']})" if r['why']
                                                               else ""))
    best = next((r for r in rows if r["fits"] and r["step_s"] is not None), None)
    if best is None:
        lines.append("nothing fits: fewer rows per chip (data.global_batch_size), more chips, "
                     "or a lower-memory remat")
    else:
        m = best["mesh"]
        lines.append(f"best: --config.mesh.data={m['data']} --config.mesh.fsdp={m['fsdp']} "
                     f"--config.mesh.tensor={m['tensor']} --config.mesh.rules=fsdp_tp "
                     f"--config.mesh.shard_optimizer={m['shard_optimizer']} "
                     f"--config.model.remat={best['remat']}")
    return "\n".join(lines)


def max_batch_report(found: dict) -> str:
    gib = 2**30
    lines = [f"batch probes (global batch in steps of {found['unit']}: rows per "
             "batch-splitting device x train.grad_accum):"]
    for size, fits, peak in found["probes"]:
        peak = "XLA: over HBM" if peak is None else f"{peak / gib:,.3g} GiB"
        lines.append(f"  {size:>8} {'fits' if fits else 'does not fit':<13} {peak}")
    if found["global_batch"] is None:
        lines.append("largest batch that fits: none (even the smallest does not)")
    else:
        lines.append(f"largest batch that fits: --config.data.global_batch_size="
                     f"{found['global_batch']} ({found['per_device_batch']:g} per device)")
    return "\n".join(lines)
