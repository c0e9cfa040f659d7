"""The accelerators lmjax knows, from their datasheets: one table for MFU's peak (metrics.py),
the roofline and the fit check (plan.py) and bench's peak source (bench.py).

A CPU has no entry: it has no honest datasheet figure, so its peak is measured
(metrics.measured_matmul_flops) and its roofline is not drawn.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's datasheet figures, per chip."""

    peak_flops: float  # dense bf16 FLOP/s (no sparsity)
    hbm_bytes: int  # capacity
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s, both directions, all links (the fast in-slice network)
    dcn_bw: float | None  # bytes/s across slices / nodes; None: not published


# By device_kind as JAX names it ('TPU v5' is v5p, 'TPU v5 lite' v5e, 'TPU v6 lite' v6e).
# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e):
#   v4   275 TFLOP/s, 32 GiB, 1200 GB/s; ICI per chip not tabulated there: 6 links x 45 GB/s x
#        2 directions (Jouppi et al. 2023, "TPU v4"; "How to Scale Your Model", Austin et al. 2025)
#   v5p  459 TFLOP/s, 95 GiB, 2765 GB/s, ICI 1200 GB/s bidirectional, DCN 50 Gbps per chip
#   v5e  197 TFLOP/s, 16 GB, 819 GB/s, ICI 400 GB/s; DCN 6.4 Tbps per 256-chip pod = 25 Gbps
#        per chip
#   v6e  918 TFLOP/s (Trillium), 32 GB, 1638 GB/s, ICI 800 GB/s; DCN not tabulated per chip
# NVIDIA datasheets (SXM parts, dense): A100 312 TFLOP/s, 80GB, 2039 GB/s, NVLink 600 GB/s;
# H100 989 TFLOP/s, 80 GB, 3.35 TB/s, NVLink 900 GB/s; H200 989 TFLOP/s, 141 GB, 4.8 TB/s,
# NVLink 900 GB/s. "DCN" for GPUs is the scale-out NIC per GPU of the reference DGX systems:
# 200 Gb/s HDR (DGX A100), 400 Gb/s NDR (DGX H100/H200).
CHIPS = {
    "TPU v4": Chip(275e12, 32 * 2**30, 1200e9, 6 * 45e9 * 2, None),
    "TPU v5": Chip(459e12, 95 * 2**30, 2765e9, 1200e9, 50e9 / 8),
    "TPU v5 lite": Chip(197e12, 16 * 10**9, 819e9, 400e9, 25e9 / 8),
    "TPU v6 lite": Chip(918e12, 32 * 10**9, 1638e9, 800e9, None),
    "NVIDIA A100": Chip(312e12, 80 * 10**9, 2039e9, 600e9, 200e9 / 8),
    "NVIDIA H100": Chip(989e12, 80 * 10**9, 3350e9, 900e9, 400e9 / 8),
    "NVIDIA H200": Chip(989e12, 141 * 10**9, 4800e9, 900e9, 400e9 / 8),
}


def lookup(device_kind: str) -> Chip | None:
    """The table's entry for a jax device_kind: the longest key it starts with ('NVIDIA H100
    80GB HBM3' is an 'NVIDIA H100', 'TPU v5 lite' not a 'TPU v5'); None for CPUs and chips the
    table does not know."""
    known = [kind for kind in CHIPS if device_kind.startswith(kind)]
    return CHIPS[max(known, key=len)] if known else None
