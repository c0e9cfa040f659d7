"""`lmjax plan --max_batch / --search` (lmjax/sizing.py): the search logic against a stand-in
planner whose memory is a known line, then the real compile on fake CPU devices and, with
libtpu, a TPU slice described by libtpu (none attached)."""

import importlib.util

import jax
import pytest

from lmjax import chips, config, plan, sizing

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu")


def linear_planner(fixed: int, per_row: int, calls: list):
    """plan.plan's shape for a step whose peak is fixed + per_row x global batch, and whose
    roofline step time is a made-up function of the mesh; refuses tensor=4 as validate would."""
    def plan_fn(cfg, devices, hbm_bytes):
        calls.append(cfg)
        if cfg.mesh.tensor == 4:
            raise ValueError("model.num_kv_heads=2 is not divisible by the tensor axis.")
        peak = fixed + per_row * cfg.data.global_batch_size
        step = (1.0 + cfg.mesh.tensor + 0.5 * cfg.mesh.data + (cfg.model.remat == "full")
                - 0.1 * cfg.mesh.shard_optimizer)
        return {"fits": peak <= hbm_bytes, "error": None, "device_kind": "TPU v5",
                "hbm_bytes": hbm_bytes,
                "memory_per_device": {"peak_estimate": peak},
                "roofline": {"step_s": step, "bound": "compute", "tokens_per_s_per_chip": 1}}
    return plan_fn


@pytest.mark.parametrize("limit_rows,expected", [(4, 4), (7, 4), (8, 8), (37, 36), (1000, 1000),
                                                 (3, None)])
def test_max_batch_finds_the_largest_fitting_multiple_of_the_unit(limit_rows, expected):
    """4 devices of data parallelism, so batches step by 4; the planner's memory fits
    `limit_rows` rows (plus a fixed part). The answer is the largest multiple of 4 at most the
    limit; memory being a line here, 4 compiles find it (the config's 8, 16, the aim and the
    next), or fewer when the config's batch does not fit; each batch is compiled once."""
    cfg = config.load("configs/smoke.py", ["mesh.data=4"])
    calls = []
    found = sizing.max_batch(cfg, [None] * 4, hbm_bytes=100 + 10 * limit_rows,
                             plan_fn=linear_planner(100, 10, calls))
    assert found["unit"] == 4 and found["global_batch"] == expected
    sizes = [c.data.global_batch_size for c in calls]
    assert len(sizes) == len(set(sizes)) and len(sizes) <= 4
    if expected is not None:
        assert found["per_device_batch"] == expected / 4
        assert found["plan"]["fits"] and (expected + 4) in sizes  # the next size was refused
        assert not next(f for s, f, _ in found["probes"] if s == expected + 4)


def test_max_batch_falls_back_to_doubling_and_bisection_when_memory_is_not_a_line():
    """A step whose memory jumps at 40 rows (a layout XLA switches to): the line through the
    config's 8 and 16 rows aims too high, and the search still ends at 36, the largest that
    fits, every batch compiled once."""
    calls = []
    line = linear_planner(100, 10, calls)

    def jumpy(cfg, devices, hbm_bytes):
        result = line(cfg, devices, hbm_bytes)
        if cfg.data.global_batch_size >= 40:
            result["fits"] = False
        return result
    cfg = config.load("configs/smoke.py", ["mesh.data=4"])
    found = sizing.max_batch(cfg, [None] * 4, hbm_bytes=100 + 10 * 1000, plan_fn=jumpy)
    sizes = [c.data.global_batch_size for c in calls]
    assert found["global_batch"] == 36 and len(sizes) == len(set(sizes))


def test_batch_unit_counts_every_batch_splitting_axis_and_micro_batches():
    cfg = config.load("configs/smoke.py", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                           "train.grad_accum=3"])
    assert sizing.batch_unit(cfg, 8) == 2 * 2 * 3


def test_search_ranks_what_fits_by_its_roofline_and_says_why_others_cannot_split():
    cfg = config.load("configs/smoke.py", [])
    calls = []
    rows = sizing.search(cfg, [None] * 4, ("none", "full"), hbm_bytes=10**9,
                         plan_fn=linear_planner(0, 1, calls))
    # (data, fsdp, tensor) with product 4: (4,1,1) (2,2,1) (1,4,1) (2,1,2) (1,2,2) (1,1,4);
    # the three with data > 1 without and with ZeRO-1
    assert len(rows) == 9 * 2 and len(calls) == 9 * 2
    assert sorted((c.mesh.data, c.mesh.shard_optimizer) for c in calls if c.mesh.data > 1) == (
        [(2, False)] * 4 + [(2, True)] * 4 + [(4, False)] * 2 + [(4, True)] * 2)
    assert all(not c.mesh.shard_optimizer for c in calls if c.mesh.data == 1)
    fitting = [r for r in rows if r["fits"]]
    assert [r["step_s"] for r in fitting] == sorted(r["step_s"] for r in fitting)
    assert (fitting[0]["mesh"], fitting[0]["remat"]) == (
        {"data": 1, "fsdp": 4, "tensor": 1, "shard_optimizer": False}, "none")
    refused = [r for r in rows if not r["fits"]]
    assert len(refused) == 2 and all(r["mesh"]["tensor"] == 4 and "divisible" in r["why"]
                                      for r in refused)
    report = sizing.search_report(rows, None)
    assert ("best: --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=1 "
            "--config.mesh.rules=fsdp_tp --config.mesh.shard_optimizer=False") in report
    assert len(sizing.search(cfg, [None] * 4, ("none",), 10**9, linear_planner(0, 1, []),
                             zero1=False)) == 6
    with pytest.raises(ValueError, match="--remats names fast"):
        sizing.search(cfg, [None] * 4, ("none", "fast"), plan_fn=linear_planner(0, 1, []))


def test_max_batch_on_cpu_devices_sizes_against_the_given_memory():
    """The real compile, no stand-in: on 2 fake CPU devices with --hbm_gib just under the peak
    of a global batch of 4, the answer is 2, and 4 was compiled and refused. Without an HBM size
    there is nothing to size against: one sentence."""
    cfg = config.load("configs/smoke.py", ["mesh.data=2", "data.seq_len=128",
                                           "model.max_len=128", "data.global_batch_size=2"])
    devices = jax.devices()[:2]
    four = plan.plan(sizing.with_keys(cfg, **{"data.global_batch_size": 4}), devices)
    found = sizing.max_batch(cfg, devices, four["memory_per_device"]["peak_estimate"] - 1)
    assert found["global_batch"] == 2 and found["per_device_batch"] == 1
    assert [(size, fits) for size, fits, _ in found["probes"]] == [(2, True), (4, False)]
    assert "global_batch_size=2 (1 per device)" in sizing.max_batch_report(found)
    assert four["fits"] is None  # a CPU has no datasheet HBM
    with pytest.raises(ValueError, match="needs the HBM of a chip"):
        sizing.max_batch(cfg, devices, plan_fn=lambda *_: four)


@needs_libtpu
def test_a_step_over_the_chips_hbm_is_a_result_not_a_traceback():
    """A 2-billion-parameter vocabulary (8 GiB of f32 weights, twice that of Adam moments) on
    one v5e chip (16 GB): XLA:TPU refuses the compile, and plan says so in its report."""
    cfg = config.load("configs/smoke.py", ["mesh.data=1", "model.vocab_size=2097152",
                                           "model.d_model=1024", "model.num_layers=1",
                                           "data.global_batch_size=1"])
    result = plan.plan(cfg, chips.tpu_devices("v5e-1"))
    assert result["fits"] is False and "RESOURCE_EXHAUSTED" in result["error"]
    assert result["roofline"] is None and result["memory_per_device"]["peak_estimate"] is None
    assert "does NOT fit: RESOURCE_EXHAUSTED" in plan.report(result)


@needs_libtpu
def test_search_on_a_tpu_slice_picks_the_fastest_bound_that_fits():
    """v5e-2 (two chips): the three splits of 2 chips, each compiled for TPU and given its
    roofline; the best is the smallest bound."""
    cfg = config.load("configs/smoke.py", ["model.dtype=bfloat16"])
    devices = chips.tpu_devices("v5e-2")
    rows = sizing.search(cfg, devices, ("none",), zero1=False)
    assert [r["mesh"]["data"] * r["mesh"]["fsdp"] * r["mesh"]["tensor"] for r in rows] == [2] * 3
    assert all(r["fits"] and r["step_s"] > 0 for r in rows)
    best = rows[0]
    assert best["step_s"] == min(r["step_s"] for r in rows)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    assert best["tokens_per_s_per_chip"] == pytest.approx(tokens / 2 / best["step_s"])
