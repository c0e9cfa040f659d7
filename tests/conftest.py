"""Eight fake CPU devices for every test, set before JAX initialises its backend."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tokenized-corpus cache: shared by this session's tests, never the user's ~/.cache.
os.environ.setdefault("LMJAX_CACHE", tempfile.mkdtemp(prefix="lmjax-test-cache-"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `from configs import base` in tests, as config.load does for runs

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
