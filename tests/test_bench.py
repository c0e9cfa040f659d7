"""`lmjax bench` reports consistent figures; timings themselves are never asserted."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmjax import bench
from lmjax.backends import cpu_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.vocab_size=256", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=2", "model.head_dim=16", "model.mlp_dim=64", "data.seq_len=32"]
KEYS = {"model", "devices", "backend", "device_kind", "params", "flops_per_token", "step_s",
        "compile_s", "tokens_per_s", "mfu", "matmul_peak_gflops", "peak_flops_per_device",
        "peak_rss_mb", "cpu_util", "temp_bytes", "argument_bytes", "output_bytes", "loss"}


@pytest.mark.parametrize("devices", [1, 2])
def test_figures_are_consistent(devices):
    r = bench.run("bench", devices, steps=2, overrides=TINY)
    assert KEYS <= r.keys()
    assert r["devices"] == devices and r["mesh"]["data"] == devices
    assert r["seq_len"] == 32 and r["global_batch_size"] == 8
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_s"])
    assert r["peak_chips"] == 1  # fake CPU devices share one host's measured peak
    assert r["mfu"] == pytest.approx(
        r["flops_per_token"] * r["tokens_per_s"] / r["peak_flops_per_device"])
    assert r["compile_s"] >= r["lower_s"] > 0
    assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
    assert r["peak_rss_mb"] > 0 and r["matmul_peak_gflops"] > 0
    # the peak is the faster of the two matmul measurements, and MFU divides by it
    assert r["matmul_peak_gflops"] == max(r["matmul_before_after_gflops"])
    assert r["peak_flops_per_device"] == pytest.approx(r["matmul_peak_gflops"] * 1e9)
    assert np.isfinite(r["loss"])
    # the client made a pool for all 8 of the session's devices, however many the run uses
    assert r["xla_cpu_pool_threads"] >= len(jax.devices()) == 8
    assert ("oversubscribed" in bench.table(r)) == (r["xla_cpu_pool_threads"] > os.cpu_count())
    # the main thread sleeps on every step's outputs, so each step switches at least once
    assert r["context_switches_per_step"]["voluntary"] >= 1
    assert r["context_switches_per_step"]["involuntary"] >= 0
    assert r["cpu_devices"] == 8  # the session's client, named in the table when it is bigger
    assert ("client of 8 CPU devices" in bench.table(r)) == (devices != 8)
    json.dumps(r)  # the dict is the JSON line


def test_named_models_come_from_the_config_files():
    names = bench.models()
    assert {"bench", "gpt2-small", "gpt2-xl", "llama-tiny", "llama-7b"} <= names.keys()
    cfg = bench.load("gpt2-small")
    assert cfg.data.source == "synthetic" and cfg.model.d_model == 768  # shapes kept


def test_unknown_model_lists_the_names():
    with pytest.raises(ValueError, match=r"Unknown model 'gpt3'.*bench, gpt2-small"):
        bench.run("gpt3", 1, 1)


def test_more_devices_than_available_is_refused():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"--devices={n + 1} must be between 1 and the {n}"):
        bench.run("bench", n + 1, 1, TINY)


def test_a_client_smaller_than_the_run_is_refused():
    with pytest.raises(ValueError, match=r"--cpu_devices=2 must be at least --devices=4"):
        bench.main("bench", 4, 1, TINY, cpu_devices=2)


def test_missing_configs_folder_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "CONFIGS", str(tmp_path / "configs"))
    with pytest.raises(FileNotFoundError, match="source checkout"):
        bench.models()


def _bench_command(env=None, cwd=ROOT, flags=()):
    overrides = [f"--config.{o}" for o in TINY]
    out = subprocess.run(
        [sys.executable, "-m", "lmjax", "bench", "--model=bench", "--steps=1", *flags, *overrides],
        cwd=cwd, capture_output=True, text=True, check=True, timeout=300, env=env)
    return out.stdout.strip().splitlines()


def test_command_prints_json_last_and_runs_with_huge_page_malloc():
    lines = _bench_command({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},
                           flags=["--cpu_devices=3"])
    r = json.loads(lines[-1])
    assert r["model"] == "bench" and r["devices"] == 1 and r["tokens_per_s"] > 0
    # one device of a 3-device client, and the client's pool sized for all 3 (or the cores)
    assert r["mesh"]["data"] == 1 and r["cpu_devices"] == 3
    assert r["xla_cpu_pool_threads"] == max(3, os.cpu_count())
    assert any(line.startswith("MFU") for line in lines[:-1])  # the table came first
    # `lmjax` re-executed itself with glibc's huge-page tunable (backends.cpu_host.prepare)
    assert r["glibc_tunables"] == cpu_host.HOST_MALLOC_TUNABLE


def test_host_malloc_keeps_the_users_tunables_or_opts_out(tmp_path, monkeypatch):
    execs = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((argv, env)))
    users = "glibc.malloc.trim_threshold=1000000000"
    monkeypatch.setenv("GLIBC_TUNABLES", users)
    monkeypatch.delenv("LMJAX_HOST_MALLOC", raising=False)
    cpu_host.tune_host_malloc(["/x/lmjax", "bench", "--steps=1"])
    [(argv, env)] = execs
    assert argv == [sys.executable, "-m", "lmjax", "bench", "--steps=1"]
    assert env["GLIBC_TUNABLES"] == f"{users}:{cpu_host.HOST_MALLOC_TUNABLE}"
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])  # the re-executed process
    cpu_host.tune_host_malloc(["/x/lmjax", "bench"])  # runs on
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("LMJAX_HOST_MALLOC", "default")
    cpu_host.tune_host_malloc(["/x/lmjax", "bench"])  # opted out
    assert len(execs) == 1
    monkeypatch.undo()
    env = {**os.environ, "LMJAX_HOST_MALLOC": "default"}
    env.pop("GLIBC_TUNABLES", None)
    # run from elsewhere: without the re-exec nothing else puts the checkout on sys.path, and
    # the named models' config files must still import `configs.base`
    assert json.loads(_bench_command(env, cwd=tmp_path)[-1])["glibc_tunables"] == ""
