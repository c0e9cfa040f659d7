"""The one accelerator table: device kinds as JAX names them, and the MFU peak read from it."""

import dataclasses

from lmjax import chips, metrics


def test_kinds_match_by_longest_prefix():
    assert chips.lookup("TPU v5 lite") is chips.CHIPS["TPU v5 lite"]
    assert chips.lookup("TPU v5") is chips.CHIPS["TPU v5"]
    assert chips.lookup("NVIDIA H100 80GB HBM3").hbm_bw == 3350e9
    assert chips.lookup("cpu") is None
    assert chips.lookup("TPU v5 lite").peak_flops == 197e12


@dataclasses.dataclass
class FakeDevice:
    device_kind: str


def test_mfu_peak_is_the_tables_for_a_known_chip():
    assert metrics.peak_flops_per_device(FakeDevice("TPU v5")) == 459e12
    assert metrics.peak_flops_per_device(FakeDevice("TPU v6 lite")) == 918e12
