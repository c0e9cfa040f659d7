"""Packing: no token lost or repeated, document boundaries, loss mask, and segment masking in
the model (a packed document gets the logits it gets alone)."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, smoke
from lmjax import attention
from lmjax.data import pipeline
from lmjax.model import Transformer

EOS = 3
DOCS = [np.arange(n, dtype=np.int32) + 100 * (i + 1) for i, n in enumerate([3, 9, 1, 14, 4, 6, 2])]


def document(ids):
    tokens = np.r_[EOS, ids, EOS].astype(np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def packed_rows(seq_len, segment_mask=True):
    docs = grain.MapDataset.source(DOCS).map(document).to_iter_dataset()
    return list(pipeline.pack(docs, seq_len, segment_mask))


def test_positions_restart_at_each_segment():
    seg = np.array([1, 1, 1, 2, 2, 3, 0, 0], np.int32)
    assert pipeline.positions(seg).tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


@pytest.mark.parametrize("seq_len", [5, 8, 40])
def test_pack_loses_and_repeats_nothing(seq_len):
    rows = packed_rows(seq_len)
    assert all(r["inputs"].shape == (seq_len,) for r in rows)
    real = [r["weights"] > 0 for r in rows]
    inputs = np.concatenate([r["inputs"][m] for r, m in zip(rows, real, strict=True)])
    targets = np.concatenate([r["targets"][m] for r, m in zip(rows, real, strict=True)])
    assert len(inputs) == sum(len(d) + 1 for d in DOCS)  # count: every token once, EOS each
    assert inputs.tolist() == np.concatenate([np.r_[EOS, d] for d in DOCS]).tolist()
    assert targets.tolist() == np.concatenate([np.r_[d, EOS] for d in DOCS]).tolist()
    # Padding only at the very end, with weight 0 and segment 0.
    pad = np.concatenate([~m for m in real])
    assert pad.sum() == len(rows) * seq_len - len(inputs) and not pad[: len(inputs)].any()
    assert all((r["segment_ids"][r["weights"] == 0] == 0).all() for r in rows)


def test_pack_boundaries_and_positions():
    rows = packed_rows(8)
    for r in rows:
        seg, pos, x = r["segment_ids"], r["positions"], r["inputs"]
        opens = np.r_[True, seg[1:] != seg[:-1]] & (seg > 0)
        # A segment opens at the row start or at an EOS, and only there.
        assert (opens[1:] == (x[1:] == EOS)[: len(x) - 1] & (seg[1:] > 0)).all()
        assert (pos[opens] == 0).all()
        assert (np.diff(pos)[~opens[1:] & (seg[1:] > 0)] == 1).all()
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert rows[0]["inputs"].tolist() == [EOS, 100, 101, 102, EOS, 200, 201, 202]


def test_text_rows_get_segments_at_eos():
    cfg = base.get_config()
    cfg.data.update(seq_len=64, global_batch_size=8, segment_mask=True)
    batch = next(pipeline.build(cfg).train)
    eos = 3
    assert {"segment_ids", "positions"} <= set(batch)
    for x, seg, pos in zip(batch["inputs"], batch["segment_ids"], batch["positions"], strict=True):
        assert seg[0] == 1 and (np.diff(seg) == (x[1:] == eos)).all()
        assert (pos[x == eos] == 0).all() and pos[0] == 0
    assert (batch["weights"] == 1).all()


def test_attention_segments_equal_separate_calls():
    """Reference: each segment attended alone; packed with segment ids must match it."""
    k = jax.random.split(jax.random.key(0), 3)
    q, kk, v = (jax.random.normal(key, (1, 7, 4, 8)) for key in k)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]])
    packed = attention.attend(q, kk[:, :, :2], v[:, :, :2], segment_ids_BL=seg)
    first = attention.attend(q[:, :3], kk[:, :3, :2], v[:, :3, :2])
    second = attention.attend(q[:, 3:], kk[:, 3:, :2], v[:, 3:, :2])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-6)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_packed_document_gets_its_solo_logits(position):
    cfg = smoke.get_config().model
    cfg.position = position
    model = Transformer(cfg, nnx.Rngs(params=0))
    doc1, doc2 = [EOS, 40, 41, 42, 43], [EOS, 50, 51, 52, 53, 54, 55]
    row = jnp.array([doc1 + doc2 + [EOS, 60]])
    seg = jnp.array([[1] * 5 + [2] * 7 + [3] * 2])
    pos = jnp.array([list(range(5)) + list(range(7)) + list(range(2))])
    packed = model(row, pos, segment_ids_BL=seg)
    alone = model(jnp.array([doc2]))
    np.testing.assert_allclose(packed[0, 5:12], alone[0], atol=1e-5)
    unmasked = model(row, pos)  # without the mask document 2 sees document 1: different
    assert np.abs(unmasked[0, 5:12] - alone[0]).max() > 1e-3
