"""`lmjax bench`: training throughput, MFU, compile time and memory of a named model.

    lmjax bench --model=bench --steps=20
    lmjax bench --model=llama-tiny --devices=8 --config.data.global_batch_size=64
    lmjax bench --model=bench --devices=1 --cpu_devices=8   # the 8-device run's control

The train step is the one `lmjax train` runs (train.compile_fns), compiled ahead of time so
that compiling and running are timed apart; a step is timed from dispatch until its outputs
are ready, and the reported step time is the median over `steps` steps after two warm-up
steps. The batch is synthetic, generated once on the host and reused: the input pipeline is
not measured. MFU uses flops.py's convention (6N + 6·layers·T·d_attn per token) against
metrics.py's peak (chips.py's datasheet figure for TPU/GPU, a measured f32 matmul on CPU);
the measured matmul rate is reported on every backend, so CPU and accelerator runs read the
same way.

The last line printed is one JSON object (`run`'s dict), for scripts and sweeps.
"""

import json
import os
import resource
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from lmjax import chips, flops, metrics, sharding, train, validate
from lmjax import config as config_lib
from lmjax.data import sources

WARMUP_STEPS = 2
FLOP_CONVENTION = "6N + 6·layers·T·d_attn per token, lmjax/flops.py"
CONFIGS = config_lib.configs_dir()  # named models are config files there
# family -> the table in configs/<family>.py whose keys are its sizes: gpt2-small, llama-1b, ...
FAMILIES = {"gpt2": "SIZES", "llama": "PRESETS"}


def models() -> dict[str, str]:
    """Every name `--model` accepts -> its config spec (`path.py[:arg]`), read from configs/."""
    if not os.path.isdir(CONFIGS):
        raise FileNotFoundError(
            f"lmjax bench reads its models from configs/, expected at {CONFIGS}; run it from a "
            "source checkout (pip install -e .).")
    specs = {"bench": os.path.join(CONFIGS, "bench.py")}
    for family, table in FAMILIES.items():
        path = os.path.join(CONFIGS, f"{family}.py")
        module = config_lib.import_file(path)  # with configs/'s folder on sys.path
        specs.update({f"{family}-{arg}": f"{path}:{arg}" for arg in getattr(module, table)})
    return specs


def load(model: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The config of a named model on synthetic data, with `a.b=value` overrides on top."""
    specs = models()
    if model not in specs:
        raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(specs)}.")
    return validate.load(specs[model], ["data.source=synthetic", *overrides])


def synthetic_batch(cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """One global batch of the synthetic source, in the pipeline's inputs/targets/weights form."""
    rows = sources.synthetic_rows(cfg, split=0)
    rows_BL1 = np.stack([rows[i] for i in range(cfg.data.global_batch_size)])
    return {"inputs": rows_BL1[:, :-1], "targets": rows_BL1[:, 1:],
            "weights": np.ones(rows_BL1[:, 1:].shape, np.float32)}


def xla_cpu_pool_threads() -> int | None:
    """Threads in XLA:CPU's intra-op pool, counted from this process's task names (Linux).

    The CPU client makes max(cores, devices) of them, so 8 fake devices on 2 cores run 8
    threads: the oversubscription alone made a 1-device step 12% slower (docs/performance.md),
    which is worth seeing beside a multi-device figure."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += "XLAEigen" in f.read()
        except OSError:  # the thread ended meanwhile
            continue
    return count or None


def _memory(compiled) -> dict[str, int | None]:
    """Per-device bytes XLA planned for the step; None where the backend does not say."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        stats = None
    names = {"temp_bytes": "temp_size_in_bytes", "argument_bytes": "argument_size_in_bytes",
             "output_bytes": "output_size_in_bytes", "alias_bytes": "alias_size_in_bytes"}
    return {key: getattr(stats, attr, None) if stats is not None else None
            for key, attr in names.items()}


def run(model: str, devices: int, steps: int,
        overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Benchmark `model` on the first `devices` devices; returns the figures as a JSON-able dict."""
    available = jax.devices()
    if not 1 <= devices <= len(available):
        raise ValueError(f"--devices={devices} must be between 1 and the {len(available)} "
                         f"{available[0].platform} devices available.")
    if steps < 1:
        raise ValueError(f"--steps={steps} must be at least 1.")
    cfg = load(model, overrides)
    mesh_shape = validate.validate(cfg, devices)
    mesh = sharding.make_mesh(cfg, devices=available[:devices])
    matmul_before = metrics.measured_matmul_flops()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        state = fns.init()
        batch = sharding.to_global(synthetic_batch(cfg), mesh)
        compiled, timed = _compile(fns.step, state, batch)
        timed.update(_time_steps(compiled, state, batch, steps))
    # A VM's cores change speed under a run (seen: 133 GFLOP/s before the steps, 176 after;
    # once 79 before, against 140-170 in the processes around it, which read as 119% MFU).
    # The peak is the faster of the rates measured before and after the steps.
    matmul = (matmul_before, metrics.measured_matmul_flops())
    return _report(model, cfg, available[:devices], len(available), mesh_shape, timed, matmul,
                   _memory(compiled))


def _compile(step, state, batch) -> tuple:
    """The step compiled ahead of time, and the seconds lowering and compiling took."""
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    return compiled, {"lower_s": lowered_at - start, "compile_s": compiled_at - start}


def _time_steps(compiled, state, batch, steps: int) -> dict:
    """Run WARMUP_STEPS + `steps` steps; each timed one's wall and process CPU seconds, and the
    context switches of all threads (getrusage) over the timed steps."""
    times, cpu_s, switches = [], 0.0, [0, 0]
    for i in range(WARMUP_STEPS + steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start_step, start_cpu = time.perf_counter(), time.process_time()
        state, step_metrics = compiled(state, batch)
        jax.block_until_ready((state, step_metrics))
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start_step)
            cpu_s += time.process_time() - start_cpu
            after = resource.getrusage(resource.RUSAGE_SELF)
            switches[0] += after.ru_nvcsw - before.ru_nvcsw
            switches[1] += after.ru_nivcsw - before.ru_nivcsw
    return {"times": times, "cpu_s": cpu_s, "switches": switches,
            "loss": float(step_metrics["train/loss"])}


def _peak(device: jax.Device, matmul: float) -> tuple[float, str]:
    """The MFU peak of one device and where it comes from. On CPU the peak *is* the measured
    matmul rate (metrics.py); it is not measured again."""
    on_datasheet = chips.lookup(device.device_kind) is not None
    peak = matmul if device.platform == "cpu" else metrics.peak_flops_per_device(device)
    return peak, "datasheet" if on_datasheet else "measured f32 matmul"


def _report(model: str, cfg: ml_collections.ConfigDict, used: list, client_devices: int,
            mesh_shape: tuple[int, ...], timed: dict, matmul: tuple[float, float],
            memory: dict) -> dict:
    """`run`'s figures from what it measured, in the order the JSON line has always had."""
    device, times, steps = used[0], timed["times"], len(timed["times"])
    seq_len, batch_size = cfg.data.seq_len, cfg.data.global_batch_size
    step_s = statistics.median(times)
    tokens_per_s = batch_size * seq_len / step_s
    per_token = flops.flops_per_token(cfg.model, seq_len)
    peak, peak_source = _peak(device, max(matmul))
    peak_chips = metrics.peak_chips(used)
    cpu = device.platform == "cpu"
    return {
        "model": model,
        "devices": len(used),
        "backend": device.platform,
        "device_kind": device.device_kind,
        "mesh": dict(zip(sharding.AXES, mesh_shape, strict=True)),
        "params": flops.count_params(cfg.model)["total"],
        "seq_len": seq_len,
        "global_batch_size": batch_size,
        "steps": steps,
        "lower_s": timed["lower_s"],
        "compile_s": timed["compile_s"],  # lower + compile: what a run waits before step 1
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": per_token,
        "flop_convention": FLOP_CONVENTION,
        "model_flops_per_s": per_token * tokens_per_s,
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "peak_chips": peak_chips,
        "mfu": per_token * tokens_per_s / (peak * peak_chips),
        "matmul_peak_gflops": max(matmul) / 1e9,
        "matmul_before_after_gflops": [matmul[0] / 1e9, matmul[1] / 1e9],
        **memory,
        # Process CPU seconds per wall second while timing: on a CPU backend, the cores this run
        # really had. Below the core count, another process shared the machine.
        "cpu_util": timed["cpu_s"] / sum(times),
        "host_cores": os.cpu_count(),
        "xla_cpu_pool_threads": xla_cpu_pool_threads() if cpu else None,
        # All threads' context switches per timed step (getrusage): a pool with more threads
        # than cores parks, wakes and preempts them many times more (docs/performance.md).
        "context_switches_per_step": {"voluntary": timed["switches"][0] / steps,
                                      "involuntary": timed["switches"][1] / steps},
        "cpu_devices": client_devices if cpu else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        # host allocator settings this process ran under (`lmjax` adds a huge-page one:
        # backends/cpu_host.py)
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "loss": timed["loss"],
        "architecture": flops.describe(cfg.model),
    }


def _pool(r: dict) -> str:
    threads = r["xla_cpu_pool_threads"]
    if threads is None:
        return ""
    over = r["host_cores"] is not None and threads > r["host_cores"]
    return f", XLA pool of {threads} threads" + (": oversubscribed" if over else "")


def table(r: dict) -> str:
    """`run`'s dict as aligned text a person reads."""
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"
    rows = [
        ("model", f"{r['model']}: {r['architecture']}"),
        ("params", f"{r['params']:,}"),
        ("devices", f"{r['devices']} x {r['device_kind']} ({r['backend']}), mesh "
                    + " ".join(f"{k}={v}" for k, v in r["mesh"].items())),
        ("batch", f"{r['global_batch_size']} x {r['seq_len']} tokens"),
        ("compile", f"{r['compile_s']:.2f} s  (lower {r['lower_s']:.2f} s)"),
        ("step", f"{r['step_s'] * 1e3:,.1f} ms  median of {r['steps']} "
                 f"(min {r['step_s_min'] * 1e3:,.1f}, max {r['step_s_max'] * 1e3:,.1f})"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("FLOPs/token", f"{r['flops_per_token']:.4g}  ({r['flop_convention']})"),
        ("model FLOP/s", f"{r['model_flops_per_s'] / 1e9:,.1f} GFLOP/s"),
        ("MFU", f"{r['mfu']:.1%}  of {r['peak_chips']} x "
                f"{r['peak_flops_per_device'] / 1e9:,.1f} GFLOP/s ({r['peak_source']})"),
        ("matmul peak", f"{r['matmul_peak_gflops']:,.1f} GFLOP/s  (jitted f32 1024^2 matmul, the "
                        "faster of {:,.1f} before and {:,.1f} after the steps)".format(
                            *r["matmul_before_after_gflops"])),
        ("memory/device", f"temp {mib(r['temp_bytes'])}, arguments {mib(r['argument_bytes'])}, "
                          f"outputs {mib(r['output_bytes'])}"),
        ("peak RSS", f"{r['peak_rss_mb']:,.0f} MB"),
        ("malloc", r["glibc_tunables"] or "glibc defaults"),
        ("host CPU", f"{r['cpu_util']:.2f} s of process CPU time per s of step "
                     f"({r['host_cores']} cores{_pool(r)})"),
        ("ctx switches", "{voluntary:,.0f} voluntary, {involuntary:,.0f} involuntary per step"
                         .format(**r["context_switches_per_step"])
                         + (f"  (client of {r['cpu_devices']} CPU devices)"
                            if r["cpu_devices"] not in (None, r["devices"]) else "")),
        ("final loss", f"{r['loss']:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(model: str, devices: int, steps: int, overrides: list[str],
         cpu_devices: int = 0) -> None:
    """`cpu_devices` > `devices` runs on a few devices of a bigger CPU client: with
    `--devices=1 --cpu_devices=8`, the 1-device step under the 8-device client's thread pool,
    the control that separates data parallelism's cost from the pool's."""
    if cpu_devices and cpu_devices < devices:
        raise ValueError(f"--cpu_devices={cpu_devices} must be at least --devices={devices}.")
    try:  # --devices=8 on a CPU host: that many CPU devices (accelerator hosts are unaffected)
        jax.config.update("jax_num_cpu_devices", cpu_devices or devices)
    except RuntimeError:  # JAX already started (a notebook): bench what it has
        pass
    result = run(model, devices, steps, overrides)
    print(table(result))
    print(json.dumps(result), flush=True)
