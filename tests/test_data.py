"""Data pipeline: batch format, exact resume, process-count invariance, held-out eval, errors."""

import json

import numpy as np
import pytest

from configs import base
from lmjax.data import pipeline, sources
from lmjax.data.tokenizer import TEXT_DIR, Tokenizer

L, B = 32, 8


@pytest.fixture(autouse=True, scope="module")
def cache(tmp_path_factory):
    """One token cache per module: the full corpus is tokenized once (~1 s), not per build."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMJAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def make_cfg(**data):
    cfg = base.get_config()
    cfg.data.seq_len, cfg.data.global_batch_size = L, B
    cfg.train.eval_batches = 3
    cfg.data.update(data)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def same(xs, ys):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(xs, ys, strict=True) for k in x)


@pytest.fixture(scope="module")
def data():
    return pipeline.build(make_cfg())


def test_batch_format(data):
    batch = next(pipeline.build(make_cfg()).train)
    assert set(batch) == {"inputs", "targets", "weights"}
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (B, L)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and (batch["weights"] == 1).all()
    assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert 0 <= batch["inputs"].min() and batch["inputs"].max() < data.tokenizer.vocab_size
    assert len(data.eval_batches) == 3
    assert all(e["inputs"].shape == (B, L) for e in data.eval_batches)


def test_resume_is_exact():
    it = pipeline.build(make_cfg()).train
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"step": 3}
    expected = take(it, 4)
    fresh = pipeline.build(make_cfg()).train
    fresh.set_state(state)
    assert same(take(fresh, 4), expected)
    it.set_state({"step": 0})  # rewinding works too
    assert same(take(it, 1), take(pipeline.build(make_cfg()).train, 1))


def test_two_builds_are_identical_and_seed_matters():
    one, two = pipeline.build(make_cfg()), pipeline.build(make_cfg())
    assert same(take(one.train, 3), take(two.train, 3))
    assert same(one.eval_batches, two.eval_batches)
    other = make_cfg()
    other.seed = 1
    a, b = next(pipeline.build(other).train), next(pipeline.build(make_cfg()).train)
    assert not np.array_equal(a["inputs"], b["inputs"])


@pytest.mark.parametrize("source", ["text", "synthetic"])
def test_global_batch_is_independent_of_process_count(source):
    whole = pipeline.build(make_cfg(source=source))
    halves = [pipeline.build(make_cfg(source=source), p, 2) for p in range(2)]
    for _ in range(3):
        parts = [next(h.train) for h in halves]
        assert parts[0]["inputs"].shape == (B // 2, L)
        glued = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        assert same([next(whole.train)], [glued])
    for i, batch in enumerate(whole.eval_batches):
        glued = {k: np.concatenate([h.eval_batches[i][k] for h in halves]) for k in batch}
        assert same([batch], [glued])


def test_one_epoch_visits_every_row_once(tmp_path):
    """The shuffle is a permutation of the packed rows, reshuffled each epoch."""
    (tmp_path / "a.txt").write_text("word " * 2000, encoding="utf-8")
    cfg = make_cfg(text=str(tmp_path / "a.txt"), eval_fraction=0.0)
    tok = Tokenizer.load(TEXT_DIR / "shakespeare_bpe2048.model")
    stream, _ = sources.text_streams([tmp_path / "a.txt"], tok, 0.0)
    rows = sources.windows(stream, L)
    it = pipeline.build(cfg).train
    steps = len(rows) // B
    first = np.concatenate([b["inputs"] for b in take(it, steps)])
    assert sorted(map(tuple, first)) == sorted(map(tuple, rows[: steps * B, :-1]))
    second = np.concatenate([b["inputs"] for b in take(it, steps)])
    assert not np.array_equal(first, second)


def test_eval_batches_are_held_out(data):
    """Eval rows decode to text of the last two plays and never to text of the training plays."""
    train_docs, eval_docs = sources.read_split([TEXT_DIR / "shakespeare.txt"], 0.05)
    assert len(eval_docs) == 2 and eval_docs[1].startswith("THE WINTER'S TALE")
    train_text, eval_text = "\n".join(train_docs), "\n".join(eval_docs)
    tok = data.tokenizer
    first = tok.decode(data.eval_batches[0]["inputs"][0])
    assert eval_docs[0].startswith(first)  # eval starts at the first held-out token
    for batch in data.eval_batches:
        for row in batch["inputs"]:
            text = tok.decode(row)
            assert text in eval_text and text not in train_text


def test_eval_rows_are_consecutive(data):
    rows = np.concatenate([e["inputs"] for e in data.eval_batches])
    targets = np.concatenate([e["targets"] for e in data.eval_batches])
    assert np.array_equal(rows[1:, 0], targets[:-1, -1])  # row i+1 starts where row i ends


def test_cache_skips_tokenizing(monkeypatch):
    pipeline.build(make_cfg())
    monkeypatch.setattr(Tokenizer, "encode", lambda *a: pytest.fail("tokenized again"))
    assert len(pipeline.build(make_cfg()).eval_batches) == 3


def test_edited_file_is_tokenized_again(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("alpha " * 3000, encoding="utf-8")
    tok = Tokenizer.load(TEXT_DIR / "shakespeare_bpe2048.model")
    first, _ = sources.text_streams([path], tok, 0.1)
    path.write_text("omega " * 3000, encoding="utf-8")
    second, _ = sources.text_streams([path], tok, 0.1)
    assert tok.decode(second[:4]).startswith("omega") and not np.array_equal(first, second)


def test_local_glob_and_single_document_split(tmp_path):
    for name in "ab":
        (tmp_path / f"{name}.txt").write_text(f"{name} " * 3000, encoding="utf-8")
    cfg = make_cfg(text=str(tmp_path / "*.txt"), eval_fraction=0.5)
    data = pipeline.build(cfg)
    assert set(data.tokenizer.decode(data.eval_batches[0]["inputs"][0]).split()) == {"b"}
    (tmp_path / "b.txt").unlink()
    train, evals = sources.read_split(sources.resolve_text(str(tmp_path / "*.txt")), 0.25)
    assert (len(train[0]), len(evals[0])) == (4500, 1500)  # one document: split by characters


def test_document_splitting_and_eval_counts():
    text = "one\n\ntwo\n\n\nthree\n  \n\t\nfour\n\n\n\n"
    assert sources.split_documents(text) == ["one\n\ntwo", "three", "four"]
    docs = [str(i) for i in range(37)]
    assert sources.train_eval_split(docs, 0.05) == (docs[:35], docs[35:])
    assert sources.train_eval_split(docs[:10], 0.05) == (docs[:9], docs[9:10])
    assert sources.train_eval_split(docs[:2], 0.9) == (docs[:1], docs[1:2])
    assert sources.train_eval_split(docs, 0.0) == (docs, [])


def test_windows_overlap_by_one_token():
    rows = sources.windows(np.arange(10, dtype=np.int32), 3)
    assert rows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert sources.windows(np.arange(4, dtype=np.int32), 3).shape == (1, 4)
    assert sources.windows(np.arange(3, dtype=np.int32), 3).shape == (0, 4)


def test_stream_has_eos_after_each_document(data):
    stream = sources.tokenize_stream(["to be", "or not"], data.tokenizer)
    eos = data.tokenizer.eos_id
    assert stream.dtype == np.int32 and (stream == eos).sum() == 2 and stream[-1] == eos


def test_synthetic_source_is_learnable_and_deterministic():
    cfg = make_cfg(source="synthetic")
    cfg.model.vocab_size = 97
    data = pipeline.build(cfg)
    assert data.tokenizer is None
    batches = take(data.train, 20)
    assert same(batches, take(pipeline.build(cfg).train, 20))
    inputs = np.concatenate([b["inputs"] for b in batches])
    assert inputs.min() >= 0 and inputs.max() < 97
    steps = (np.concatenate([b["targets"] for b in batches]) - inputs) % 97
    values, counts = np.unique(steps, return_counts=True)
    assert len(values) == 4  # four successors per token: a first-order chain a model can learn
    p = counts / counts.sum()
    assert -(p * np.log(p)).sum() == pytest.approx(sources.SyntheticRows.ENTROPY, abs=0.02)
    assert sources.SyntheticRows.ENTROPY == pytest.approx(1.75 * np.log(2))
    assert not np.array_equal(data.eval_batches[0]["inputs"], batches[0]["inputs"])


# ------------------------------------------------------------------ errors, one sentence each


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        pipeline.build(make_cfg(text=str(tmp_path / "empty.txt")))


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        pipeline.build(make_cfg(text=str(tmp_path / "latin1.txt")))


def test_missing_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.text"):
        pipeline.build(make_cfg(text=str(tmp_path / "*.txt")))


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        pipeline.build(make_cfg(tokenizer=str(tmp_path / "nope.model")))


def test_vocab_too_small():
    cfg = make_cfg()
    cfg.model.vocab_size = 1000
    with pytest.raises(ValueError, match=r"model.vocab_size=1000 is smaller.*2048"):
        pipeline.build(cfg)


def test_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.build(make_cfg(), 0, 3)


def test_corpus_too_small(tmp_path):
    (tmp_path / "tiny.txt").write_text("A little text.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.build(make_cfg(text=str(tmp_path / "tiny.txt")))


def test_eval_split_too_small():
    with pytest.raises(ValueError, match="eval_fraction=0.05.*lower seq_len"):
        pipeline.build(make_cfg(seq_len=16384))


def test_unknown_source():
    with pytest.raises(ValueError, match="data.source='csv' is unknown"):
        pipeline.build(make_cfg(source="csv"))
