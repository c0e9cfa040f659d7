"""`lmjax plan` on fake CPU devices: collectives and memory of the compiled bench train step.

Golden figures: the bench model has 8,390,912 float32 params (configs/bench.py), 33,563,648 B.
"""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

from lmjax import chips, config, plan
from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAM_BYTES = 8_390_912 * 4
# model.scan_layers: the backward scan gathers the 4 blocks' weights again (plan.expected).
# A block: q, k, v, o 4 x 256 x 256, MLP 3 x 256 x 1024, two norms of 256.
LAYER_BYTES = 4 * (4 * 256 * 256 + 3 * 256 * 1024 + 2 * 256) * 4
TABLE_BYTES = 8192 * 256 * 4  # the embedding and the unembedding each
# Besides the gradients the step all-reduces a few f32 scalars (loss, token count, norms):
# tens of bytes against 33.5 MB, so 1e-5 relative holds them and would catch a missing tensor.
SCALARS_RTOL = 1e-5


def _plan(*overrides):
    """Plans the scanned layout unless told otherwise: its backward re-gather is the harder case
    for plan.expected (test_unrolled_fsdp_gathers_each_weight_once covers the default)."""
    cfg = config.load("configs/bench.py", ["model.scan_layers=True", *overrides])
    return plan.plan(cfg, jax.devices()[:4])


@pytest.fixture(scope="module")
def dp():
    return _plan("mesh.data=4", "mesh.rules=dp", "mesh.shard_optimizer=False")


@pytest.fixture(scope="module")
def zero1():
    return _plan("mesh.data=4", "mesh.rules=dp", "mesh.shard_optimizer=True")


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


def test_zero1_reduce_scatters_every_gradient_and_gathers_every_weight(zero1):
    """Every bench weight has a dimension 4 divides, so nothing but scalars is all-reduced."""
    assert zero1["expected_bytes"] == {"all-reduce": 0, "all-gather": PARAM_BYTES,
                                       "reduce-scatter": PARAM_BYTES // 4}
    got = zero1["collectives"]
    assert got["reduce-scatter"]["bytes"] == PARAM_BYTES // 4
    assert got["all-gather"]["bytes"] == PARAM_BYTES
    assert got["all-reduce"]["bytes"] < 1024  # tens of scalars: the loss, token count, norms
    # the moments are split over 'data', the weights whole: 1 + 2/4 of the params aliased
    assert zero1["memory_per_device"]["alias"] == pytest.approx(1.5 * PARAM_BYTES, rel=1e-4)


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu")
# One block of the bench model: its two tables, the block, the final norm.
ONE_BLOCK_BYTES = 2 * TABLE_BYTES + LAYER_BYTES // 4 + 256 * 4
O_BYTES = 4 * 64 * 256 * 4  # the attention output projection: [heads, head_dim, embed]


@needs_libtpu
def test_zero1_on_tpu_reduce_scatters_gradients_and_gathers_weights():
    """What ZeRO-1 is for, checked where it runs: on v5p-8 (4 chips, described by libtpu, none
    attached), for a 1-block bench model, XLA:TPU sums each gradient with a reduce-scatter over
    'data' (1/4 of it per chip) and gathers the updated weights, where plain DP all-reduces
    every gradient (test_dp_all_reduces_every_gradient_once). XLA:CPU may lower the same layout
    as an all-reduce and a slice: test_zero1_reduce_scatters_every_gradient_and_gathers_every_
    weight."""
    cfg = config.load("configs/bench.py", ["model.num_layers=1", "mesh.data=4", "mesh.rules=dp",
                                           "mesh.shard_optimizer=True"])
    zero1 = plan.plan(cfg, chips.tpu_devices("v5p-8"))  # ~40 s to compile
    assert zero1["param_bytes"] == ONE_BLOCK_BYTES
    got = zero1["collectives"]
    # Every gradient byte is summed once: a quarter of it per chip by reduce-scatter, or whole
    # by all-reduce. The slack is the norm scales (3 of 256 floats) and scalars, ~3 kB.
    scattered = got.get("reduce-scatter", {"bytes": 0})["bytes"]
    reduced = 4 * scattered + got["all-reduce"]["bytes"]
    assert reduced == pytest.approx(ONE_BLOCK_BYTES, rel=1e-3)
    # All of it reduce-scattered but, at most, the output projection, whose 'data' dimension
    # (sharding.data_dim) is its 4 heads: XLA:TPU all-reduces that gradient whole.
    assert 4 * scattered >= ONE_BLOCK_BYTES - O_BYTES - 3 * 256 * 4
    assert got["all-gather"]["bytes"] == pytest.approx(ONE_BLOCK_BYTES, rel=1e-3)
    assert zero1["fits"]


def test_fsdp_gathers_weights_once_and_reduces_gradients(fsdp):
    got = fsdp["collectives"]
    assert fsdp["expected_bytes"]["all-gather"] == PARAM_BYTES + LAYER_BYTES - TABLE_BYTES
    # The unembedding is gathered once (XLA keeps it for the backward), the scanned blocks
    # twice; the embedding table never: its lookup moves the 2 rows x 256 tokens of each device
    # to the devices holding their columns, f32 rows there and f32 gradients back. The 0.1%
    # slack is the few small gathers that are not weights (<10 kB here).
    assert got["all-gather"]["bytes"] == pytest.approx(PARAM_BYTES + LAYER_BYTES - TABLE_BYTES,
                                                       rel=1e-3)
    moved = 2 * 2 * 256 * 256 * 4
    assert got["all-to-all"]["bytes"] == fsdp["expected_bytes"]["all-to-all"] == moved
    # XLA:CPU sums gradients with a full all-reduce then slices it; TPU/GPU emit reduce-scatter
    # (1/4 of the bytes per device). Either way every gradient byte but the embedding table's
    # (summed where its columns live) is reduced once.
    scattered = got.get("reduce-scatter", {"bytes": 0})["bytes"] * 4
    assert got["all-reduce"]["bytes"] + scattered == pytest.approx(PARAM_BYTES - TABLE_BYTES,
                                                                   rel=1e-3)


def test_unrolled_fsdp_gathers_each_weight_once():
    """Unrolled layers (the default): XLA keeps every gathered weight for the backward (all
    but the embedding table, which is never gathered)."""
    unrolled = _plan("model.scan_layers=False", "mesh.data=1", "mesh.fsdp=4", "mesh.rules=fsdp")
    assert unrolled["expected_bytes"]["all-gather"] == PARAM_BYTES - TABLE_BYTES
    assert unrolled["collectives"]["all-gather"]["bytes"] == pytest.approx(
        PARAM_BYTES - TABLE_BYTES, rel=1e-3)


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
    env = {**os.environ, "XLA_FLAGS": xla.FAST_COMPILE}  # no device count: plan must not need it
    out = subprocess.run([sys.executable, "-m", "lmjax", "plan", "--config=configs/bench.py",
                          "--devices=2", "--config.mesh.fsdp=2", "--config.mesh.rules=fsdp"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("2 cpu devices, mesh data=1 x fsdp=2 x seq=1 x tensor=1")
    gather = next(line for line in out.stdout.splitlines() if "all-gather" in line).split()
    assert gather[1:] == ["48", "24.03", "24.01"]  # count, MiB measured, MiB expected


def test_gpu_platform_without_a_gpu_is_one_sentence():
    """The suite runs on CPU: --platform=gpu says why it cannot plan here and what can."""
    with pytest.raises(ValueError, match="JAX sees none here .* --topology"):
        chips.gpu_devices(1)


def test_topology_without_libtpu_is_one_sentence(monkeypatch):
    from jax.experimental import topologies

    def no_tpu(**kwargs):  # what JAX raises when no libtpu is installed
        raise RuntimeError("Unknown backend: 'tpu' requested, but no platforms that are "
                           "instances of tpu are present.")

    monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
    with pytest.raises(ValueError, match="could not be described .* it needs libtpu"):
        chips.tpu_devices("v5p:2x2x1")


@pytest.fixture(scope="module")
def fsdp_tp():
    return _plan("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp")


def test_fsdp_tp_never_gathers_the_whole_vocabulary(fsdp_tp):
    """The embedding lookup is vocab-parallel (sharding.embed_lookup): no collective carries
    the full [8192, 256] table, in the forward gather or the gradient's reduction."""
    hlo = fsdp_tp["hlo"]
    assert "f32[8192,256]" not in hlo and "f32[256,8192]" not in hlo
    act = 4 * 256 * 256 * 4  # [B / (data x fsdp), L, D] float32
    want = fsdp_tp["expected_bytes"]
    # Each matrix: 1/tensor of it. Norm scales are split over fsdp only: gathered whole (9 of
    # 256 floats, and the 8 in the blocks again in the backward scan).
    norms = (9 + 8) * 256 * 4
    assert want["all-gather"] == (PARAM_BYTES + LAYER_BYTES - norms) // 2 + norms
    assert want["all-reduce"] == 4 * 4 * act  # TP: 4 all-reduces per layer, 4 layers
    got = fsdp_tp["collectives"]
    # XLA:CPU's two choices beyond the analytic plan, both < 1/4 of it: it gathers the
    # unembedding (1/tensor of it) again in the backward, and gathers the lookup's [B, L, D]
    # cotangent (with the token ids) rather than reduce-scatter the table's gradient.
    extra = TABLE_BYTES // 2 + 2 * act + 8 * 256 * 4
    assert got["all-gather"]["bytes"] == pytest.approx(want["all-gather"] + extra, rel=1e-3)
    # Gradients (all-reduced on CPU: fsdp x the reduce-scatter), TP's activations and the
    # lookup's one forward all-reduce over 'tensor' are all in there. XLA:CPU also all-reduces
    # the input gradients of q, k, v (and of gate, up) one by one instead of their sum: at most
    # 3 more activations per layer, and nothing table-sized.
    floor = want["all-reduce"] + 2 * want["reduce-scatter"] + act
    assert floor <= got["all-reduce"]["bytes"] <= floor + 3 * 4 * act


@pytest.mark.parametrize("name,libtpu_name,options", [
    ("v5p-8", "v5p:2x2x1", {}),
    ("v5p-64", "v5p:2x4x4", {}),
    ("v5p-128", "v5p:4x4x4", {}),
    ("v5p-256", "v5p:4x4x8", {}),
    ("v4-32", "v4:2x2x4", {}),
    ("v5e-16", "v5e:4x4", {}),
    ("v5e-256", "v5e:16x16", {}),
    ("v6e-8", "v6e:2x4", {"chips_per_host_bounds": (2, 4, 1)}),
    ("v5e-1", "v5e:1x1", {"chips_per_host_bounds": (1, 1, 1)}),
    ("v6e-4", "v6e:2x2", {}),
    ("v5p:4x4x2", "v5p:4x4x2", {}),
])
def test_cloud_tpu_names_map_to_libtpu_topologies(name, libtpu_name, options):
    assert chips.topology_name(name) == (libtpu_name, options)


def test_bad_topology_names_are_one_sentence():
    with pytest.raises(ValueError, match="neither a Cloud TPU name"):
        chips.topology_name("v7x-64")
    with pytest.raises(ValueError, match="not a power-of-two slice size"):
        chips.topology_name("v5p-48")


def test_roofline_arithmetic():
    chip = chips.Chip(peak_flops=459e12, hbm_bytes=95 * 2**30, hbm_bw=2e12, ici_bw=1e12,
                      dcn_bw=1e10)
    # 9.18e12 FLOPs at 459e12/s = 20 ms; 30e9 B at 2e12 B/s = 15 ms;
    # 5e9 B of ICI at 1e12 = 5 ms + 1e8 B of DCN at 1e10 = 10 ms -> 15 ms.
    r = plan.roofline(flops_per_device=9.18e12, hbm_bytes_per_device=30e9, ici_bytes=5e9,
                      dcn_bytes=1e8, model_flops_per_device=6.885e12, chip=chip)
    assert r["compute_s"] == pytest.approx(0.020)
    assert r["memory_s"] == pytest.approx(0.015)
    assert r["communication_s"] == pytest.approx(0.015)
    assert r["bound"] == "compute" and r["step_s"] == pytest.approx(0.020)
    assert r["step_s_no_overlap"] == pytest.approx(0.050)
    assert r["mfu"] == pytest.approx(0.75)  # 6.885e12 / 459e12 = 15 ms of the 20 ms step
    slow_dcn = plan.roofline(flops_per_device=9.18e12, hbm_bytes_per_device=None, ici_bytes=0,
                             dcn_bytes=1e9, model_flops_per_device=9.18e12, chip=chip)
    assert slow_dcn["bound"] == "communication" and slow_dcn["step_s"] == pytest.approx(0.1)
    assert slow_dcn["mfu"] == pytest.approx(0.2)


def test_link_bytes_weights_each_kind_by_what_a_ring_sends():
    found = {"all-reduce": {"bytes": 100}, "all-gather": {"bytes": 10},
             "reduce-scatter": {"bytes": 3}, "collective-permute": {"bytes": 1}}
    assert plan.link_bytes(found, ways=4) == 2 * 100 + 10 + 3 * 3 + 1


@needs_libtpu
def test_splash_compiles_ahead_of_time_for_a_tpu_slice():
    """On v5p-8 (4 chips, described by libtpu, none attached): model.attention='auto' picks
    splash, which lowers to a Mosaic kernel; the plan prints a roofline for the chip."""
    cfg = config.load("configs/smoke.py", ["model.attention=auto", "model.dtype=bfloat16",
                                           "data.seq_len=256", "model.max_len=256",
                                           "mesh.data=4"])
    result = plan.plan(cfg, chips.tpu_devices("v5p-8"))
    assert result["device_kind"] == "TPU v5" and result["fits"]
    assert "tpu_custom_call" in result["hlo"]
    r = result["roofline"]
    assert r["peak_flops"] == 459e12 and 0 < r["mfu"] <= 1
    assert r["step_s"] == max(r["compute_s"], r["memory_s"], r["communication_s"])
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    assert r["tokens_per_s_per_chip"] == pytest.approx(tokens / 4 / r["step_s"])
    assert result["compile_s"] > 0 and result["lower_s"] > 0 and result["error"] is None
    assert "roofline per step" in plan.report(result)


# configs/moe.py:tiny at d_model 256 on 4 devices, expert=4: 8 x 32 = 256 tokens, T = 64 per
# device, S = T x top_k 2 = 128 assignments, 4 experts, 2 MoE layers.
MOE_TINY = ["mesh.expert=4", "model.d_model=256", "model.dtype=float32"]


@pytest.mark.parametrize("dispatch,rows", [("capacity", 4 * 40), ("dropless", 4 * 128)])
def test_expert_exchange_sends_the_queues_or_padded_slices(dispatch, rows):
    """Per MoE layer and pass (forward, backward) every device sends 4 blocks, one per expert,
    there and back: capacity queues of C = ceil(1.25 x 64 x 2 / 4) = 40 rows, or (dropless on
    CPU, no ragged all-to-all) every slice padded to S = 128 rows, plus each forward's int32
    slice offsets (4 per exchange)."""
    got = plan.plan(config.load("configs/moe.py:tiny", MOE_TINY + [f"model.moe.dispatch="
                                                                   f"{dispatch}"]),
                    jax.devices()[:4])
    offsets = 2 * 1 * 2 * 4 * 4 if dispatch == "dropless" else 0
    want = 2 * 2 * 2 * rows * 256 * 4 + offsets
    assert got["collectives"]["all-to-all"]["bytes"] == want
    assert got["expected_bytes"]["all-to-all"] == want
    assert got["all_to_all_theory"] == 2 * 2 * 2 * 128 * 256 * 4


@needs_libtpu
def test_mixtral_shaped_dropless_step_compiles_for_v5p_with_the_expert_axis():
    """configs/moe.py:8x7b's shape (8 experts, top-2, GQA, scanned bf16 layers, full remat,
    grad_accum) shrunk, dropless, expert=4 on v5p-8: XLA:TPU takes the ragged all-to-all. Per
    micro-batch (2) a device has 16 / 2 / 4 = 2 rows of 128, T = 256, S = 512; each layer (2)
    and pass (forward, remat, backward) receives a worst-case buffer of 4 x S rows and returns S:
    the result sizes plan counts. The roofline counts what balanced routing sends, S each way."""
    cfg = config.load("configs/moe.py:8x7b", [
        "model.vocab_size=1024", "model.d_model=256", "model.num_layers=2", "model.num_heads=8",
        "model.num_kv_heads=2", "model.head_dim=32", "model.mlp_dim=512",
        "model.moe.expert_mlp_dim=512", "model.max_len=128", "data.seq_len=128",
        "data.global_batch_size=16", "train.grad_accum=2", "mesh.expert=4",
        "model.moe.dispatch=dropless"])
    got = plan.plan(cfg, chips.tpu_devices("v5p-8"))  # ~15 s
    assert got["fits"] and got["mesh"]["expert"] == 4
    ragged = got["collectives"]["ragged-all-to-all"]
    assert ragged["count"] == 2 * 2 * 3 * 2
    assert ragged["bytes"] == got["expected_bytes"]["ragged-all-to-all"] == (
        2 * 2 * 3 * (4 * 512 + 512) * 256 * 2)
    assert got["all_to_all_theory"] == 2 * 2 * 3 * 2 * 512 * 256 * 2
    # the receive buffer is never all-reduced (an invariant zeros buffer's cotangent would be)
    assert not re.search(r"= bf16\[2048,256\]\S* all-reduce", got["hlo"])
    sent = {**got["collectives"], "ragged-all-to-all": {"bytes": got["all_to_all_theory"]}}
    assert got["roofline"]["link_bytes"] == plan.link_bytes(sent, 1)
