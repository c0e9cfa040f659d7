"""`lmjax plan` on fake CPU devices: collectives and memory of the compiled bench train step.

Golden figures: the bench model has 8,390,912 float32 params (configs/bench.py), 33,563,648 B.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from lmjax import config, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAM_BYTES = 8_390_912 * 4
# Besides the gradients the step all-reduces a few f32 scalars (loss, token count, norms):
# tens of bytes against 33.5 MB, so 1e-5 relative holds them and would catch a missing tensor.
SCALARS_RTOL = 1e-5


def _plan(*overrides):
    cfg = config.load("configs/bench.py", list(overrides))
    return plan.plan(cfg, jax.devices()[:4])


@pytest.fixture(scope="module")
def dp():
    return _plan("mesh.data=4", "mesh.rules=dp")


@pytest.fixture(scope="module")
def fsdp():
    return _plan("mesh.data=1", "mesh.fsdp=4", "mesh.rules=fsdp")


def test_dp_all_reduces_every_gradient_once(dp):
    assert dp["param_bytes"] == PARAM_BYTES
    assert dp["expected_bytes"] == {"all-reduce": PARAM_BYTES, "all-gather": 0,
                                    "reduce-scatter": 0}
    assert set(dp["collectives"]) == {"all-reduce"}
    assert dp["collectives"]["all-reduce"]["bytes"] == pytest.approx(PARAM_BYTES,
                                                                     rel=SCALARS_RTOL)


def test_fsdp_gathers_weights_once_and_reduces_gradients(fsdp):
    got = fsdp["collectives"]
    assert fsdp["expected_bytes"]["all-gather"] == PARAM_BYTES
    # remat='none': XLA keeps the forward's gathered weights for the backward, one gather each.
    # The 0.1% slack is the few small gathers that are not weights (<10 kB here).
    assert got["all-gather"]["bytes"] == pytest.approx(PARAM_BYTES, rel=1e-3)
    # XLA:CPU sums gradients with a full all-reduce then slices it; TPU/GPU emit reduce-scatter
    # (1/4 of the bytes per device). Either way every gradient byte is reduced once.
    scattered = got.get("reduce-scatter", {"bytes": 0})["bytes"] * 4
    assert got["all-reduce"]["bytes"] + scattered == pytest.approx(PARAM_BYTES, rel=1e-3)


def test_fsdp_shards_the_state_dp_replicates(dp, fsdp):
    state_bytes = 3 * PARAM_BYTES  # params + AdamW's two moments, donated so aliased
    assert dp["memory_per_device"]["alias"] == pytest.approx(state_bytes, rel=1e-4)
    assert fsdp["memory_per_device"]["alias"] == pytest.approx(state_bytes / 4, rel=1e-3)


def test_collectives_parses_shapes_tuples_and_async_pairs():
    hlo = """
  %all-reduce.1 = f32[256,1024]{1,0} all-reduce(f32[256,1024]{1,0} %p), replica_groups={}
  %ar.2 = (f32[4]{0}, bf16[8,2]{1,0}) all-reduce(f32[4]{0} %a, bf16[8,2]{1,0} %b)
  %ag-start = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[2,8]{1,0} %x)
  ROOT %ag-done = f32[8,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[8,8]{1,0}) %ag-start)
  %cp = s32[3]{0} collective-permute(s32[3]{0} %y), source_target_pairs={{0,1}}
  %add = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %a)
"""
    assert plan.collectives(hlo) == {
        "all-reduce": {"count": 2, "bytes": 256 * 1024 * 4 + 4 * 4 + 16 * 2},
        "all-gather": {"count": 1, "bytes": 64 * 4},
        "collective-permute": {"count": 1, "bytes": 12}}


def test_plan_refuses_a_mesh_the_devices_cannot_hold():
    with pytest.raises(ValueError, match="does not divide the 4 available devices"):
        _plan("mesh.data=1", "mesh.fsdp=3")


@pytest.mark.slow
def test_cli_plan_makes_its_own_fake_devices():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # plan must not need it
    out = subprocess.run([sys.executable, "-m", "lmjax", "plan", "--config=configs/bench.py",
                          "--devices=2", "--config.mesh.fsdp=2", "--config.mesh.rules=fsdp"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("2 cpu devices, mesh data=1 x fsdp=2 x tensor=1")
    gather = next(line for line in out.stdout.splitlines() if "all-gather" in line).split()
    assert gather[1:] == ["48", "32.02", "32.01"]  # count, MiB measured, MiB expected


def test_topology_without_libtpu_is_one_sentence():
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed: the topology is describable here")
    with pytest.raises(ValueError, match="needs libtpu"):
        plan.tpu_devices("v5p:2x2x1")
