"""Context parallelism: the smoke model trained with its sequence split over a 'seq' mesh axis.

Ring attention on seq=4 (x data=2) and plain attention on data=8 are the same computation laid
out differently, so losses, gradient norms and parameters after a few steps must agree to float32
round-off; packed rows (segment ids, per-document positions through RoPE) included.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from lmjax import sharding, train, validate

STEPS = 3
LAYOUTS = {  # name: (mesh overrides, attention kernel)
    "dp8": (dict(data=8), "xla"),
    "ring": (dict(data=2, seq=4), "ring"),
    "gather_kv": (dict(data=2, seq=4), "xla"),  # length split; XLA gathers keys for attention
}


def smoke_cfg(mesh: dict, kernel: str, segment_mask: bool = True):
    cfg = smoke.get_config()
    cfg.mesh.update(**mesh)
    cfg.model.attention = kernel
    cfg.data.segment_mask = segment_mask
    return cfg


def packed_batches(cfg):
    """Rows of 2-3 documents each: segment ids change mid-row, positions restart at 0. The same
    batch every step, so a falling loss shows the updates work (random tokens are unlearnable
    across batches)."""
    rng = np.random.default_rng(0)
    B, L = cfg.data.global_batch_size, cfg.data.seq_len
    out = []
    for _ in range(1):
        cuts_B2 = np.sort(rng.integers(1, L, size=(B, 2)), axis=1)
        idx_L = np.arange(L)
        segment_ids = 1 + (idx_L >= cuts_B2[:, :1]) + (idx_L >= cuts_B2[:, 1:])
        starts = np.where(segment_ids == 1, 0, np.where(segment_ids == 2, cuts_B2[:, :1],
                                                        cuts_B2[:, 1:]))
        tokens = rng.integers(0, cfg.model.vocab_size, size=(B, L + 1))
        out.append({"inputs": tokens[:, :-1].astype(np.int32),
                    "targets": tokens[:, 1:].astype(np.int32),
                    "weights": np.ones((B, L), np.float32),
                    "segment_ids": segment_ids.astype(np.int32),
                    "positions": (idx_L - starts).astype(np.int32)})
    return out * STEPS


def train_steps(mesh_overrides: dict, kernel: str):
    cfg = smoke_cfg(mesh_overrides, kernel)
    config_shape = validate.validate(cfg, 8)
    mesh = sharding.make_mesh(cfg)
    assert dict(mesh.shape) == dict(zip(sharding.AXES, config_shape, strict=True))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        state, history = fns.init(), []
        for batch in packed_batches(cfg):
            state, m = fns.step(state, sharding.to_global(batch, mesh))
            history.append(jax.device_get(m))
        hlo = fns.step.lower(fns.abstract_state, {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
            for k, v in packed_batches(cfg)[0].items()}).as_text()
    params = jax.device_get(nnx.to_pure_dict(state[0]))
    return history, params, hlo


@pytest.fixture(scope="module")
def runs():
    return {name: train_steps(mesh, kernel) for name, (mesh, kernel) in LAYOUTS.items()}


@pytest.mark.parametrize("name", ["ring", "gather_kv"])
def test_seq_split_trains_as_data_parallel(runs, name):
    base, other = runs["dp8"], runs[name]
    for key in ("train/loss", "train/grad_norm"):
        want = [float(m[key]) for m in base[0]]
        np.testing.assert_allclose([float(m[key]) for m in other[0]], want, rtol=1e-5)
    assert base[0][-1]["train/loss"] < base[0][0]["train/loss"]  # it did learn something
    flat_base = jax.tree_util.tree_leaves_with_path(base[1])
    for (path, want), got in zip(flat_base, jax.tree.leaves(other[1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_ring_passes_keys_round_the_seq_axis(runs):
    """The ring's ppermutes are in the program; plain data parallelism has none."""
    assert "collective_permute" in runs["ring"][2] or "collective-permute" in runs["ring"][2]
    assert "collective_permute" not in runs["dp8"][2]


def test_activations_are_split_along_the_sequence():
    cfg = smoke_cfg(dict(data=2, seq=4), "ring", segment_mask=False)
    mesh = sharding.make_mesh(cfg)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        model = train.create(cfg)[0]
        tokens = jax.device_put(np.zeros((8, 32), np.int32), sharding.batch_sharding(mesh))
        logits_BLV = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits_BLV.sharding.spec[1] == "seq"
    assert logits_BLV.addressable_shards[0].data.shape[:2] == (4, 8)  # B/2 rows, L/4 tokens


def test_ring_without_a_seq_axis_is_one_sentence():
    cfg = smoke_cfg(dict(data=8), "ring")
    with pytest.raises(ValueError, match=r"needs a sequence axis .* set mesh.seq"):
        validate.validate(cfg, 8)
    cfg = smoke_cfg(dict(data=1, seq=8), "ring")
    cfg.data.seq_len = 36
    cfg.model.max_len = 36
    with pytest.raises(ValueError, match="data.seq_len=36 is not divisible by the seq axis"):
        validate.validate(cfg, 8)


@pytest.mark.slow
def test_train_run_on_ring_equals_data_parallel(tmp_path):
    """The whole loop (data pipeline, eval, checkpoint) on seq=4 x data=2 with ring attention."""
    def losses(mesh, kernel):
        cfg = smoke_cfg(mesh, kernel, segment_mask=False)
        cfg.train.update(steps=5, eval_every=0)
        cfg.optim.warmup_steps = 2
        workdir = str(tmp_path / kernel)
        train.run(cfg, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    np.testing.assert_allclose(losses(dict(data=2, seq=4), "ring"),
                               losses(dict(data=8), "xla"), rtol=1e-5)
