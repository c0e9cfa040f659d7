"""Eight fake CPU devices for every test, set before JAX initialises its backend."""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `from configs import base` in tests, as config.load does for runs

from tests import xla  # noqa: E402

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla.flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tokenized-corpus and XLA compilation caches: shared by this session's tests, never the
# user's ~/.cache. One folder per pytest-xdist worker (`-n 2`): JAX writes a compilation-cache
# entry in place, so a worker could otherwise read the other's half-written file.
os.environ.setdefault("LMJAX_CACHE", tempfile.mkdtemp(prefix="lmjax-test-cache-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["LMJAX_CACHE"] = os.path.join(os.environ["LMJAX_CACHE"],
                                             os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.environ["LMJAX_CACHE"], exist_ok=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory) -> str:
    """A 6-step smoke run on 8 devices, trained once for every test that reads a workdir
    (eval, sample, convert)."""
    from configs import smoke
    from lmjax import train

    cfg = smoke.get_config()
    cfg.train.update(steps=6, eval_every=3, eval_batches=2)
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.every = 3
    workdir = str(tmp_path_factory.mktemp("smoke_run"))
    train.run(cfg, workdir)
    return workdir
