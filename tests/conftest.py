"""Eight fake CPU devices for every test, set before JAX initialises its backend."""

import os
import re
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


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """One GCS API server per test process (tests/gcs.py): gcsfs keeps the first address it
    meets in its cached filesystem, so every module of a process must share one."""
    import importlib.util

    from tests import gcs

    # the [gcs] extra, as test_hf.py needs [hf]; CI installs both. Not imported here: gcsfs
    # reads its environment (the emulator's address) when first used
    if not all(importlib.util.find_spec(m) for m in ("gcsfs", "gcp_storage_emulator")):
        pytest.skip("needs the [gcs] extra: pip install -e '.[gcs]'")
    with gcs.emulator(str(tmp_path_factory.mktemp("gcs"))) as url:
        yield url


@pytest.fixture
def bucket(gcs_server, request):
    """gs://BUCKET/<this test's name>/: a folder of the shared server no other test uses."""
    return f"{gcs_server}/{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """LMJAX_NO_SKIPS=1 (CI sets it): a skipped test fails, so a missing extra (hf, tpu, gcs)
    cannot turn their tests into silent passes."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("LMJAX_NO_SKIPS") == "1" and not hasattr(report,
                                                                                 "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under LMJAX_NO_SKIPS=1: {report.longrepr}"


def pytest_configure(config):
    """Hand pytest-xdist's workers the longest files first (see pytest_collection_modifyitems):
    its default order, by number of tests per file, sends the few-test multi-process files
    last, so one worker finishes them alone while the other idles."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Order the files by their measured seconds, longest first (the LPT rule: two workers
    then finish within about one short file of each other). tests/durations.json holds each
    file's time from a full run; regenerate it with tests/durations.py after adding a slow
    file. A file it does not know counts as 30 s. Tests keep their order within a file."""
    import json

    with open(os.path.join(ROOT, "tests", "durations.json")) as f:
        seconds = json.load(f)
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], 30.0))
