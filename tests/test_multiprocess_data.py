"""Two real processes on 127.0.0.1 (4 fake CPU devices each, gloo): each builds the pipeline,
reads its own disjoint shard, resumes exactly, and the global batch assembles from both."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, B = 32, 8


def worker(process_id: int, port: int, out: str, tfds_dir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    from jax.experimental import multihost_utils

    from configs import base
    from lmjax import sharding
    from lmjax.data import pipeline

    assert jax.process_count() == 2 and len(jax.devices()) == 8
    result = {}
    for source in ("text", "tfds"):
        cfg = base.get_config()
        cfg.data.update(source=source, seq_len=L, global_batch_size=B, segment_mask=True,
                        tfds_name="tiny_docs", tfds_data_dir=tfds_dir, read_threads=1)
        it = pipeline.build(cfg, jax.process_index(), jax.process_count()).train
        first = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(3)]
        again = pipeline.build(cfg, jax.process_index(), jax.process_count()).train
        again.set_state(state)
        resumed = [next(again) for _ in range(3)]
        result[f"{source}_resume_exact"] = all(
            np.array_equal(a[k], b[k]) for a, b in zip(resumed, expected, strict=True) for k in a)
        mesh = sharding.make_mesh(cfg)
        batch = sharding.to_global(first[0], mesh)
        result[f"{source}_global_shape"] = list(batch["inputs"].shape)
        gathered = multihost_utils.process_allgather(batch["inputs"], tiled=True)
        np.save(os.path.join(out, f"{source}_global_{process_id}.npy"), gathered)
        local = np.stack([b["inputs"] for b in first + expected])
        np.save(os.path.join(out, f"{source}_local_{process_id}.npy"), local)
    with open(os.path.join(out, f"result_{process_id}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_and_resume(tmp_path):
    from lmjax.data import pipeline, sources
    from tests.test_tfds import NUM_DOCS, doc_text, make_cfg

    (tmp_path / "in").mkdir()
    for i in range(NUM_DOCS):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(doc_text(i), encoding="utf-8")
    sources.build_tfds(str(tmp_path / "in" / "*.txt"), "tiny_docs", str(tmp_path / "out"), 0.1)
    env = {**os.environ, "XLA_FLAGS": xla.flags(4),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    port = free_port()
    code = ("import sys; from tests.test_multiprocess_data import worker; "
            "worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(port), str(tmp_path),
                               str(tmp_path / "out")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]

    results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2)]
    for r in results:
        assert r == {"text_resume_exact": True, "tfds_resume_exact": True,
                     "text_global_shape": [B, L], "tfds_global_shape": [B, L]}
    for source in ("text", "tfds"):
        local = [np.load(tmp_path / f"{source}_local_{i}.npy") for i in range(2)]
        glob_ = np.load(tmp_path / f"{source}_global_0.npy")
        # The global batch is process 0's rows then process 1's.
        np.testing.assert_array_equal(glob_, np.concatenate([local[0][0], local[1][0]]))
        rows = [set(map(tuple, x.reshape(-1, L))) for x in local]
        assert not rows[0] & rows[1]  # disjoint shards
    # The text source's global batches equal a single process's: shards tile the same order.
    cfg = make_cfg(tmp_path, source="text", global_batch_size=B)
    single = pipeline.build(cfg).train
    text = [np.load(tmp_path / f"text_local_{i}.npy") for i in range(2)]
    for step in range(6):
        np.testing.assert_array_equal(next(single)["inputs"],
                                      np.concatenate([text[0][step], text[1][step]]))
