"""The accelerators lmjax knows, from their datasheets: one table for MFU's peak (metrics.py),
the roofline and the fit check (plan.py) and bench's peak source (bench.py).

A CPU has no entry: it has no honest datasheet figure, so its peak is measured
(metrics.measured_matmul_flops) and its roofline is not drawn.

Also the devices `lmjax plan` compiles for without having them: fake CPU devices, or the chips of
a TPU slice as libtpu describes it.
"""

import dataclasses
import math
import os

import jax


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


def cpu_devices(count: int) -> list:
    """`count` CPU devices to compile for: made up if JAX has not started, else those it has."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already up (tests, a notebook): use what exists
        pass
    devices = jax.devices("cpu")
    if count < 1 or count > len(devices):
        raise ValueError(f"--devices={count} must be between 1 and the {len(devices)} CPU "
                         "devices JAX already started with.")
    return devices[:count]


def gpu_devices(count: int) -> list:
    """This host's first `count` GPUs, to compile for as `lmjax train` would run there.

    JAX compiles for a GPU only where it has one: deviceless GPU compilation needs the CUDA
    plugin and private entry points (jax-ml/jax#23971), so a host without a GPU gets a sentence.
    """
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        raise ValueError("--platform=gpu compiles for this host's GPUs, and JAX sees none here "
                         "(it needs a GPU and a CUDA jaxlib: pip install -e '.[gpu]'); plan a "
                         "TPU slice with --topology, or fake CPU devices with --devices.") from None
    if count < 1 or count > len(devices):
        raise ValueError(f"--devices={count} must be between 1 and this host's {len(devices)} "
                         "GPUs.")
    return devices[:count]


# Cloud TPU names: v4-N and v5p-N count TensorCores (2 per chip), v5e-N and v6e-N count chips.
_GENERATIONS = {"v4": (3, 2), "v5p": (3, 2), "v5e": (2, 1), "v6e": (2, 1)}  # (torus dims, cores)


def topology_name(name: str) -> tuple[str, dict]:
    """A Cloud TPU name ('v5p-64') as libtpu's topology name and options ('v5p:2x4x4', {}).

    Shapes follow the Cloud TPU docs' tables: the smallest dimension doubles first (v5p-8 is
    2x2x1, v5p-64 2x4x4, v5p-128 4x4x4; v5e-16 is 4x4). Hosts hold 4 chips (2x2x1), except an
    8-chip v5e/v6e slice, which is one host, and slices under 4 chips (v5e-1: one host of
    1x1). A libtpu name ('v5p:4x4x2') passes through.
    """
    if ":" in name:
        return name, {}
    generation, _, count = name.partition("-")
    if generation not in _GENERATIONS or not count.isdigit():
        raise ValueError(f"--topology={name!r} is neither a Cloud TPU name (v4-32, v5p-64, "
                         f"v5e-16, v6e-8) nor a libtpu one (v5p:4x4x2).")
    dims, cores_per_chip = _GENERATIONS[generation]
    num_chips = int(count) // cores_per_chip
    if num_chips < 1 or num_chips & (num_chips - 1) or int(count) % cores_per_chip:
        raise ValueError(f"--topology={name!r}: {count} is not a power-of-two slice size.")
    shape = [2, 2, 1] if dims == 3 and num_chips >= 4 else [1] * dims
    while math.prod(shape) < num_chips:
        smallest = min(shape)
        i = max(j for j, n in enumerate(shape) if n == smallest)  # the rightmost smallest
        shape[i] *= 2
    options = ({"chips_per_host_bounds": (2, 4, 1)} if dims == 2 and num_chips == 8 else
               {"chips_per_host_bounds": (*shape, 1, 1)[:3]} if num_chips < 4 else {})
    return f"{generation}:{'x'.join(map(str, shape))}", options


def tpu_devices(topology: str, slices: int = 1) -> list:
    """The chips of a TPU topology ('v5p-64' or 'v5p:4x4x2'), `slices` of them joined over DCN,
    to compile for ahead of time from a CPU host.

    libtpu describes the topology without any TPU attached (MaxText's CPU CI does the same).
    """
    from jax.experimental import topologies

    name, options = topology_name(topology)
    if slices > 1:
        options["num_slices"] = slices
    # libtpu's lockfile guards real chips; describing a topology claims none, so a training run
    # that loaded libtpu (it does on import when installed) must not block the planner.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            **options).devices
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--topology={topology!r} could not be described ({e}); it needs "
                         "libtpu (pip install libtpu) and a name such as 'v5p-64' or "
                         "'v5p:4x4x2'.") from e
