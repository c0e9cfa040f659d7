"""MaxText 0.2.5's side of issue 26: AOT-compile its train step for a TPU slice from a CPU host.

    .venv/bin/python experiments/tpu_aot_vs_maxtext/maxtext_side.py --topology=v5p-8 \
        --model=llama2-7b --per_device_batch_size=2 --seq=4096 --remat=full --ici_fsdp=4 --out=DIR

Why: lmjax's AOT numbers (peak HBM per chip, flops, compile time, collectives) mean little
alone; this compiles the same step with MaxText (`maxtext.trainers.pre_train.train_compile`,
its own AOT tool, with the TPU topology from libtpu) so both can be read side by side.
Runs with this folder's .venv (Python 3.12, `pip install "maxtext[tpu]==0.2.5"`).

Writes DIR/<case>.json (one row: memory_analysis pieces, cost_analysis flops / bytes accessed,
the seconds of the train step's `Lowered.compile`, versions, the full MaxText argv, load
average) and DIR/<case>.hlo.txt.gz (gzipped `compiled.as_text()`: optimized, partitioned HLO).
A step that does not fit HBM still writes its row ("fits": false) and exits 1.
"""

import argparse
import gzip
import importlib.metadata as md
import json
import os
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server on this host
# No chips here: skip libtpu's one-process lockfile (/tmp/libtpu_lockfile), so that this
# compile neither fails on nor blocks another process that loaded libtpu (lmjax's own AOT).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# --model: a MaxText model_name, or a llama2-style shape given by its keys (lmjax's
# configs/llama.py:1b, TinyLlama 1.1B; MaxText 0.2.5 has no llama ~1B model file).
CUSTOM = {
    "tinyllama-1.1b": ["decoder_block=llama2", "vocab_size=32000", "base_emb_dim=2048",
                       "base_num_decoder_layers=22", "base_num_query_heads=32",
                       "base_num_kv_heads=4", "head_dim=64", "base_mlp_dim=5632",
                       "mlp_activations=[silu,linear]", "logits_via_embedding=false",
                       "normalization_layer_epsilon=1e-5", "enable_dropout=false"],
}


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", required=True, help="compile_topology, e.g. v5p-8, v6e-8")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--model", required=True, help=f"a MaxText model_name or one of {list(CUSTOM)}")
    p.add_argument("--per_device_batch_size", type=float, required=True)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--remat", default="full")
    p.add_argument("--ici_fsdp", type=int, default=-1)
    p.add_argument("--ici_tensor", type=int, default=1)
    p.add_argument("--ici_data", type=int, default=1)
    p.add_argument("--dcn_data", type=int, default=-1)
    p.add_argument("--attention", default="autoselected", help="MaxText's default on TPU: splash")
    p.add_argument("--extra", nargs="*", default=[], help="further MaxText key=value pairs")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    case = (f"{a.model}_{a.topology}x{a.slices}_b{a.per_device_batch_size:g}_s{a.seq}_{a.remat}"
            f"_fsdp{a.ici_fsdp}" + (f"_tp{a.ici_tensor}" if a.ici_tensor != 1 else "")
            + (f"_dp{a.ici_data}" if a.ici_data != 1 else "")
            + (f"_dcn{a.dcn_data}" if a.slices > 1 else ""))
    import maxtext
    base_yml = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    model = CUSTOM.get(a.model, [f"model_name={a.model}"])
    argv = ["train_compile.py", base_yml, f"run_name={case}", *model,
            f"compile_topology={a.topology}", f"compile_topology_num_slices={a.slices}",
            f"per_device_batch_size={a.per_device_batch_size:g}", f"max_target_length={a.seq}",
            f"remat_policy={a.remat}", f"ici_fsdp_parallelism={a.ici_fsdp}",
            f"ici_tensor_parallelism={a.ici_tensor}", f"ici_data_parallelism={a.ici_data}",
            f"dcn_data_parallelism={a.dcn_data}", f"attention={a.attention}",
            "dtype=bfloat16", "weight_dtype=float32", "scan_layers=true",
            "dataset_type=synthetic", "enable_checkpointing=false",
            "skip_jax_distributed_system=true", "jax_cache_dir=",  # no coordinator, no cache hits
            "base_output_directory=/tmp/tpu_aot_vs_maxtext", *a.extra]

    # Keep every Lowered.compile with its seconds; the train step's is the one named train_step.
    from jax._src import stages
    compiles = []
    compile_ = stages.Lowered.compile

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            out = compile_(self, *args, **kwargs)
        finally:
            compiles.append((time.perf_counter() - start, self))
        compiles[-1] += (out,)
        return out

    stages.Lowered.compile = timed

    import jax
    from maxtext.trainers.pre_train import train_compile
    os.makedirs(a.out, exist_ok=True)
    row = {"case": case, "topology": a.topology, "slices": a.slices, "model": a.model,
           "per_device_batch_size": a.per_device_batch_size, "seq": a.seq, "remat": a.remat,
           "versions": {k: md.version(k) for k in ("maxtext", "jax", "jaxlib", "libtpu", "flax")},
           "maxtext_argv": argv, "load_before": load()}
    start = time.perf_counter()
    error = None
    try:
        train_compile.main(argv)
    except Exception as e:  # the HBM check is XLA's compile failing with RESOURCE_EXHAUSTED
        error = e
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["load_after"] = load()
    if error is not None:
        text = str(error).strip()
        if "RESOURCE_EXHAUSTED" not in text and "hbm" not in text.lower():
            raise error
        row.update(fits=False, error=text.splitlines()[0][:2000],
                   compile_s=round(compiles[-1][0], 2) if compiles else None)
        json.dump(row, open(os.path.join(a.out, case + ".json"), "w"), indent=1)
        print(f"{case} does not fit HBM: {row['error'][:300]}", file=sys.stderr)
        return 1

    done = [c for c in compiles if len(c) == 3]
    train = [c for c in done if "train_step" in c[2].as_text()[:300]] or done
    seconds, _, compiled = max(train, key=lambda c: c[0])
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    memory = {f: int(getattr(mem, f)) for f in fields}
    peak = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
            + memory["temp_size_in_bytes"] - memory["alias_size_in_bytes"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    hlo_path = os.path.join(a.out, case + ".hlo.txt.gz")
    with gzip.open(hlo_path, "wt") as f:
        f.write(hlo)
    row.update(fits=True, compile_s=round(seconds, 2),
               other_compiles_s=[round(c[0], 2) for c in compiles if c[2] is not compiled],
               chips=len(jax.tree.leaves(compiled.input_shardings)[0].device_set),
               memory=memory, peak_bytes=peak, peak_gib=round(peak / 2**30, 3),
               flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
               hlo_path=os.path.abspath(hlo_path), hlo_gzipped=True,
               splash_custom_calls=hlo.count("splash"), jax_devices=str(jax.devices()[0]))
    json.dump(row, open(os.path.join(a.out, case + ".json"), "w"), indent=1)
    print(json.dumps({k: row[k] for k in ("case", "compile_s", "peak_gib", "flops",
                                          "bytes_accessed", "load_before", "load_after")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
