"""TFDS source: `build_tfds` writes a real array_record dataset, the pipeline reads it back,
packs it, shards it by process and resumes exactly; bad input fails with one clear sentence."""

import json
import os

import numpy as np
import pytest

from configs import base
from lmjax.data import pipeline, sources
from lmjax.data.tokenizer import resolve_tokenizer

L, B, NUM_DOCS = 32, 4, 60


def doc_text(i: int) -> str:
    return f"Document {i:03d} says: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(5 + i % 23))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    (root / "in").mkdir()
    for i in range(NUM_DOCS):
        (root / "in" / f"{i:03d}.txt").write_text(doc_text(i), encoding="utf-8")
    counts = sources.build_tfds(str(root / "in" / "*.txt"), "tiny_docs", str(root / "out"), 0.1)
    return root, counts


def make_cfg(root, **data):
    cfg = base.get_config()
    cfg.data.update(source="tfds", tfds_name="tiny_docs", tfds_data_dir=str(root / "out"),
                    seq_len=L, global_batch_size=B, segment_mask=True, read_threads=1)
    cfg.train.eval_batches = 2
    cfg.data.update(data)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def documents_of(batches, tok):
    """Texts of the documents that open in `batches` (a process's consecutive rows)."""
    stream = np.concatenate([row for b in batches for row in b["inputs"]])
    cuts = np.flatnonzero(stream == tok.eos_id)
    return [tok.decode(stream[a + 1:z]) for a, z in zip(cuts[:-1], cuts[1:], strict=True)]


def test_build_writes_both_splits(built):
    root, counts = built
    assert counts == {"train": 54, "validation": 6}
    assert os.path.isdir(root / "out" / "tiny_docs" / "1.0.0")
    train = sources.tfds_source("tiny_docs", str(root / "out"), "train", "text")
    held = sources.tfds_source("tiny_docs", str(root / "out"), "validation", "text")
    texts = {x["text"].decode() for x in train} | {x["text"].decode() for x in held}
    assert texts == {doc_text(i) for i in range(NUM_DOCS)}
    assert {x["text"].decode() for x in held} == {doc_text(i) for i in range(54, 60)}
    assert len(sources.tfds_source("tiny_docs", str(root / "out"), "train[:50%]", "text")) == 27


def test_batches_resume_exactly(built):
    cfg = make_cfg(built[0])
    it = pipeline.build(cfg).train
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    fresh = pipeline.build(cfg).train
    fresh.set_state(state)
    for a, b in zip(take(fresh, 5), expected, strict=True):
        assert set(a) == {"inputs", "targets", "weights", "segment_ids", "positions"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_processes_read_disjoint_shards_covering_the_epoch(built):
    """Each of two processes reads its 27 of the 54 training documents per epoch: disjoint,
    together every training document exactly once; the next epoch reshuffles."""
    tok = pipeline.Tokenizer.load(resolve_tokenizer("shakespeare_bpe2048"))
    shares = []
    for p in range(2):
        batches = take(pipeline.build(make_cfg(built[0]), p, 2).train, 60)
        assert batches[0]["inputs"].shape == (B // 2, L)
        docs = documents_of(batches, tok)
        assert len(docs) > 54  # past the first epoch
        shares.append(docs[:27])
        assert len(set(docs[:27])) == 27 and docs[27:54] != docs[:27]
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == {doc_text(i) for i in range(54)}


def test_eval_batches_are_the_validation_split(built):
    data = pipeline.build(make_cfg(built[0]))
    assert len(data.eval_batches) == 2
    text = data.tokenizer.decode(np.concatenate([b["inputs"].ravel() for b in data.eval_batches]))
    assert "Document 05" in text and not any(f"Document {i:03d}" in text for i in range(54))
    halves = [pipeline.build(make_cfg(built[0]), p, 2).eval_batches for p in range(2)]
    glued = np.concatenate([halves[0][0]["inputs"], halves[1][0]["inputs"]])
    np.testing.assert_array_equal(glued, data.eval_batches[0]["inputs"])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(built):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; the CLI has parsed them
    cfg = make_cfg(built[0])
    expected = take(pipeline.build(cfg).train, 4)
    got = take(pipeline.build(make_cfg(built[0], worker_count=1)).train, 4)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


# ------------------------------------------------------------------ errors, one sentence each


def test_unknown_dataset(built):
    with pytest.raises(FileNotFoundError, match="data.tfds_name='nope' is not a prepared"):
        pipeline.build(make_cfg(built[0], tfds_name="nope"))


def test_unknown_split(built):
    with pytest.raises(ValueError, match="Split 'test' of TFDS dataset 'tiny_docs'"):
        pipeline.build(make_cfg(built[0], train_split="test"))


def test_unknown_feature(built):
    with pytest.raises(KeyError, match="no feature data.tfds_feature='body'"):
        pipeline.build(make_cfg(built[0], tfds_feature="body"))


def test_build_from_empty_input(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        sources.build_tfds(str(tmp_path / "*.txt"), "x", str(tmp_path / "out"))


def test_build_from_directory_without_text(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="sub"):
        sources.build_tfds(str(tmp_path / "sub"), "x", str(tmp_path / "out"))
    (tmp_path / "sub" / "image.bin").write_bytes(bytes([0xFF, 0xD8, 0xFF, 0xE0]) * 10)
    with pytest.raises(ValueError, match=r"image\.bin is not UTF-8"):
        sources.build_tfds(str(tmp_path / "sub"), "x", str(tmp_path / "out"))


def test_build_bad_name_and_single_document(tmp_path):
    (tmp_path / "a.txt").write_text("one document only", encoding="utf-8")
    with pytest.raises(ValueError, match="must be snake_case"):
        sources.build_tfds(str(tmp_path / "a.txt"), "Bad-Name", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="holds 1 document"):
        sources.build_tfds(str(tmp_path / "a.txt"), "one", str(tmp_path / "out"))


def test_corrupt_tokenizer(built, tmp_path):
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"broken\.model is not a SentencePiece model"):
        pipeline.build(make_cfg(built[0], tokenizer=str(tmp_path / "broken.model")))


def test_seq_len_beyond_learned_positions():
    from lmjax import validate

    cfg = base.get_config()
    cfg.model.position, cfg.data.seq_len = "learned", 512
    with pytest.raises(ValueError, match="data.seq_len=512 exceeds model.max_len=256"):
        validate.validate(cfg, 1)


class Crash(Exception):
    pass


@pytest.mark.slow
def test_training_on_tfds_resumes_bitwise(built, tmp_path, monkeypatch):
    """End to end on the built dataset: crash after the step-10 checkpoint, restart, and every
    logged loss equals an uninterrupted run's (the data state came back from the checkpoint)."""
    from configs import smoke
    from lmjax import train

    def cfg():
        c = smoke.get_config()
        c.data.update(source="tfds", tfds_name="tiny_docs", tfds_data_dir=str(built[0] / "out"),
                      segment_mask=True, read_threads=1)
        c.mesh.update(data=8)
        return c

    def losses(workdir):
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        return {r["step"]: r["train/loss"] for r in rows}

    straight = str(tmp_path / "straight")
    train.run(cfg(), straight)
    real_next = pipeline.PackedIterator.__next__

    def next_or_crash(self):
        if self.get_state()["step"] == 13:
            raise Crash
        return real_next(self)

    monkeypatch.setattr(pipeline.PackedIterator, "__next__", next_or_crash)
    resumed = str(tmp_path / "resumed")
    with pytest.raises(Crash):
        train.run(cfg(), resumed)
    monkeypatch.setattr(pipeline.PackedIterator, "__next__", real_next)
    train.run(cfg(), resumed)
    assert losses(resumed) == losses(straight)
    assert losses(straight)[20] < losses(straight)[1] - 0.5
    assert "process_0-of-1.json" in os.listdir(os.path.join(resumed, "checkpoints", "20", "data"))
