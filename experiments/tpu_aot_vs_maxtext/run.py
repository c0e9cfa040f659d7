"""Issue 26: lmjax and MaxText 0.2.5 compile the same train step ahead of time for TPU slices,
on this CPU host, and the costs a pod user pays are read side by side.

    python experiments/tpu_aot_vs_maxtext/run.py --install     # once: .venv (3.12) + MaxText
    python experiments/tpu_aot_vs_maxtext/run.py --cases=1b_v5p8,1b_v6e8,7b_v5p8 [--max_batch]
    python experiments/tpu_aot_vs_maxtext/run.py --table        # README tables from results/

Both sides compile for the topology libtpu describes (no chip attached): lmjax through
`lmjax.plan.plan` (what `lmjax plan --topology` runs), MaxText through its own
`train_compile` (maxtext_side.py, in this folder's Python 3.12 venv). Each side's numbers come
from its own compiled step: `memory_analysis()` (peak = argument + output + temp - alias, per
chip), `cost_analysis()` (FLOPs, bytes accessed), the collectives in its optimized HLO (parsed
by the same `plan.collectives` for both) and the roofline `plan.step_roofline` draws from them
(the same model FLOPs floor for both). --max_batch finds each side's largest per-chip batch
with the same doubling-then-bisection (`lmjax.sizing.max_batch`), MaxText's probes being
MaxText compiles. Every compile runs in a process of its own (memory, clean timings).

One compiler for both: lmjax's side runs by default with MaxText's venv too (jax 0.12.0.1,
libtpu 0.0.52; lmjax from this checkout on PYTHONPATH), because XLA's memory plan moves with the
libtpu version (1B on v5p-8: lmjax's temporaries are 7.1 GiB under the libtpu 0.0.42.1 that
constraints.txt pins, 4.5 GiB under 0.0.52). LMJAX_PYTHON=.venv/bin/python compiles lmjax's
side with lmjax's own pinned stack instead.
"""

import argparse
import gzip
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
VENV = os.path.join(HERE, ".venv")
RESULTS = os.path.join(HERE, "results")
MAXTEXT_MODEL = {"1b": "tinyllama-1.1b", "7b": "llama2-7b"}  # lmjax preset -> maxtext_side
# name: lmjax preset, topology, slices, per-chip batch, seq, remat, ICI fsdp (all chips)
CASES = {
    "1b_v5p8": ("1b", "v5p-8", 1, 8, 2048, "full", 4),
    "1b_v6e8": ("1b", "v6e-8", 1, 8, 2048, "full", 8),
    "7b_v5p8": ("7b", "v5p-8", 1, 2, 4096, "full", 4),
    "7b_v5p64": ("7b", "v5p-64", 1, 2, 4096, "full", 32),
    "7b_2xv5p64": ("7b", "v5p-64", 2, 2, 4096, "full", 32),
}


def lmjax_config(preset: str, seq: int, remat: str, fsdp: int, slices: int, batch: int):
    """configs/llama.py's preset with MaxText's defaults for the keys both have: bf16 compute,
    f32 master weights, scanned layers, FSDP over a slice's chips, data parallel over slices,
    splash attention (attention='auto' picks it on TPU, as MaxText's 'autoselected' does)."""
    from lmjax import config
    return config.load(f"configs/llama.py:{preset}", [
        f"data.seq_len={seq}", f"model.max_len={seq}", f"data.global_batch_size={batch}",
        f"model.remat={remat}", "model.scan_layers=True", "model.attention=auto",
        "model.dtype=bfloat16", "model.param_dtype=float32", "data.source=synthetic",
        "mesh.data=1", f"mesh.fsdp={fsdp}", "mesh.tensor=1", f"mesh.dcn_data={slices}"])


def case_config(name: str, per_chip: float | None = None):
    preset, topology, slices, batch, seq, remat, fsdp = CASES[name]
    num_chips = len(chips_of(topology, slices))
    global_batch = int((per_chip or batch) * num_chips)
    return lmjax_config(preset, seq, remat, fsdp, slices, global_batch), topology, slices


def lmjax_plan(cfg, devices, hbm_bytes=None) -> dict:
    """plan.plan in a child process (a 7B compile holds gigabytes this process should not),
    under LMJAX_PYTHON: by default MaxText's venv, so both sides have one compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env["PYTHONPATH"] = ROOT  # lmjax from this checkout, whatever the interpreter
    python = os.environ.get("LMJAX_PYTHON", os.path.join(VENV, "bin", "python"))
    out = subprocess.run([python, __file__, "--child_config", cfg.to_json()],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"lmjax's compile failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def child(cfg_json: str, topology: str, slices: int) -> None:
    import ml_collections

    from lmjax import chips, plan
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    result = plan.plan(cfg, chips.tpu_devices(topology, slices))
    result["hlo"] = None  # parsed already (result['collectives'])
    result["versions"] = {k: md.version(k) for k in ("jax", "jaxlib", "libtpu", "flax")}
    print(json.dumps(result))


def maxtext_plan(name: str, per_chip: float) -> dict:
    """maxtext_side.py's row for the case at `per_chip` rows per chip, in plan.plan's terms."""
    from lmjax import plan, sharding
    preset, topology, slices, _, seq, remat, fsdp = CASES[name]
    out_dir = tempfile.mkdtemp(prefix=f"{name}_", dir=os.path.join(RESULTS, "maxtext"))
    cmd = [os.path.join(VENV, "bin", "python"), os.path.join(HERE, "maxtext_side.py"),
           f"--topology={topology}", f"--slices={slices}", f"--model={MAXTEXT_MODEL[preset]}",
           f"--per_device_batch_size={per_chip:g}", f"--seq={seq}", f"--remat={remat}",
           f"--ici_fsdp={fsdp}", f"--dcn_data={slices}", f"--out={out_dir}"]
    # JAX points TPU_LIBRARY_PATH at the libtpu it loaded (lmjax's); MaxText loads its own
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    rows = [f for f in os.listdir(out_dir) if f.endswith(".json")]
    if not rows:  # it fails with a row when the step does not fit; without one, it broke
        raise RuntimeError(f"MaxText's compile failed ({out.returncode}):\n{out.stderr[-3000:]}")
    row = json.load(open(os.path.join(out_dir, rows[0])))
    cfg, _, _ = case_config(name, per_chip)
    num_chips = len(chips_of(topology, slices))
    mesh = dict(zip(sharding.AXES, sharding.mesh_shape(cfg, num_chips), strict=True))
    from lmjax import chips
    hbm = chips.lookup(_kind(topology)).hbm_bytes  # the same test as plan.plan's
    result = {"fits": row["fits"] and row["peak_bytes"] <= hbm, "error": row.get("error"),
              "device_kind": _kind(topology), "hbm_bytes": hbm,
              "compile_s": row.get("compile_s"), "maxtext_argv": row["maxtext_argv"],
              "memory_per_device": {"peak_estimate": row.get("peak_bytes"),
                                    **{k.removesuffix("_size_in_bytes"): v
                                       for k, v in (row.get("memory") or {}).items()}},
              "collectives": None, "roofline": None, "row": os.path.join(out_dir, rows[0])}
    if row["fits"]:
        with gzip.open(row["hlo_path"], "rt") as f:
            found = plan.collectives(f.read())
        cost = {"flops": row["flops"], "bytes accessed": row["bytes_accessed"]}
        result["collectives"] = found
        result["roofline"] = plan.step_roofline(cfg, cost, found, mesh, num_chips,
                                                result["device_kind"])
    return result


def chips_of(topology: str, slices: int) -> list:
    from lmjax import chips
    return chips.tpu_devices(topology, slices)


def _kind(topology: str) -> str:
    return {"v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v4": "TPU v4"}[
        topology.split("-")[0]]


def run_case(name: str, max_batch: bool) -> dict:
    from lmjax import sizing
    cfg, topology, slices = case_config(name)
    devices = chips_of(topology, slices)
    per_chip = CASES[name][3]
    out = {"case": name, "config": CASES[name], "chips": len(devices),
           "lmjax": lmjax_plan(cfg, devices), "maxtext": maxtext_plan(name, per_chip)}
    out["lmjax"]["config_keys"] = _lmjax_keys(cfg)
    if max_batch:
        def maxtext_fn(c, devs, hbm):
            return maxtext_plan(name, c.data.global_batch_size / len(devs))
        for side, fn in (("lmjax", lmjax_plan), ("maxtext", maxtext_fn)):
            found = sizing.max_batch(cfg, devices, plan_fn=fn)
            out[side]["max_batch"] = {"per_chip": found["per_device_batch"],
                                      "probes": found["probes"]}
    os.makedirs(RESULTS, exist_ok=True)
    json.dump(out, open(os.path.join(RESULTS, f"{name}.json"), "w"), indent=1, default=str)
    return out


def _lmjax_keys(cfg) -> list[str]:
    keys = ("data.seq_len", "data.global_batch_size", "model.remat", "model.scan_layers",
            "model.attention", "model.dtype", "model.param_dtype", "mesh.data", "mesh.fsdp",
            "mesh.tensor", "mesh.dcn_data")
    return [f"{k}={cfg[k.split('.')[0]][k.split('.')[1]]}" for k in keys]


GIB, MIB = 2**30, 2**20
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# label, value from one side's result, format, whether lmjax / MaxText means anything
ROWS = [
    ("fits", lambda s: s["fits"], "{}", False),
    ("peak HBM per chip, GiB", lambda s: s["memory_per_device"]["peak_estimate"] / GIB),
    *((f"  {p}, GiB", lambda s, p=p: s["memory_per_device"][p] / GIB)
      for p in ("argument", "temp", "output", "alias")),
    ("XLA FLOPs per chip, TFLOP", lambda s: s["roofline"]["hlo_flops_per_device"] / 1e12),
    ("XLA bytes accessed per chip, GiB", lambda s: s["roofline"]["hlo_bytes_accessed"] / GIB),
    *((f"{k}, MiB per chip", lambda s, k=k: (s["collectives"] or {}).get(k, {"bytes": 0})
       ["bytes"] / MIB) for k in KINDS),
    ("sent per chip (ring-weighted), MiB", lambda s: s["roofline"]["link_bytes"] / MIB),
    ("roofline step bound, ms", lambda s: s["roofline"]["step_s"] * 1e3),
    ("  bound by", lambda s: s["roofline"]["bound"], "{}", False),
    ("tokens/s per chip at the bound", lambda s: s["roofline"]["tokens_per_s_per_chip"],
     "{:,.0f}"),
    ("compile, s", lambda s: s["compile_s"], "{:,.1f}"),
    ("largest per-chip batch that fits", lambda s: s["max_batch"]["per_chip"], "{:g}"),
]


def _value(side: dict, get):
    try:
        return get(side)
    except (KeyError, TypeError):  # a side that did not fit has no roofline
        return None


def table(names: list[str]) -> str:
    """One markdown table per case in results/, the two sides in columns."""
    lines = []
    for name in names:
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        preset, topology, slices, batch, seq, remat, fsdp = r["config"]
        lines += [f"### {name}: {preset} on {slices} x {topology} ({r['chips']} chips), "
                  f"{batch} x {seq} tokens per chip, remat {remat}, fsdp {fsdp}"
                  + (f", dcn_data {slices}" if slices > 1 else ""), "",
                  "| | lmjax | MaxText | lmjax / MaxText |", "|---|---|---|---|"]
        for label, get, *rest in ROWS:
            fmt, ratio = (rest + ["{:,.2f}", True][len(rest):])[:2]
            a, b = _value(r["lmjax"], get), _value(r["maxtext"], get)
            text = ["-" if v is None else fmt.format(v) for v in (a, b)]
            q = f"{a / b:.2f}" if ratio and a is not None and b else "-"
            lines.append(f"| {label} | {text[0]} | {text[1]} | {q} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--install", action="store_true")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--max_batch", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--child_config")  # internal: one lmjax compile (lmjax_plan)
    a, _ = p.parse_known_args()
    if a.child_config:  # the topology comes through the environment run_case sets
        child(a.child_config, os.environ["AOT_TOPOLOGY"], int(os.environ["AOT_SLICES"]))
        return
    if a.install:
        subprocess.run(["/root/.pyenv/versions/3.12.1/bin/python3.12", "-m", "venv", VENV],
                       check=True)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "maxtext[tpu]==0.2.5",
                        "tensorflow-datasets", "safetensors"], check=True)  # + lmjax's rest
        return
    names = a.cases.split(",")
    if not a.table:
        for name in names:
            _, topology, slices, *_ = CASES[name]
            os.environ.update(AOT_TOPOLOGY=topology, AOT_SLICES=str(slices))
            run_case(name, a.max_batch)
            print(table([name]), flush=True)
    print(table(names))


if __name__ == "__main__":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    main()
