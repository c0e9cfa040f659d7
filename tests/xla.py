"""XLA flags for the test processes, this one and the ones tests start.

LLVM at -O0 for XLA's own kernels: the suite is mostly compile time (tiny models, many
programs), and -O0 halves it (tests/test_sharding.py: 108 s -> 59 s on a 2-core host).
The numbers move in the last bit at most: the smoke run's 20 losses agree to within one ulp
with XLA's default -O3 (16 of them exactly), since the matmuls are library calls either way.
So every process a test starts gets the same flag, and a test comparing bits compares runs
made alike. `lmjax bench` and real runs keep XLA's default.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` fake CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"
