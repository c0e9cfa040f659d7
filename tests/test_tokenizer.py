"""Tokenizer: lossless round trips, fixed id layout, training, resolution of shipped names."""

from pathlib import Path

import pytest

from configs import base
from lmjax.data import pipeline, sources
from lmjax.data.tokenizer import TEXT_DIR, Tokenizer, resolve_tokenizer, train_tokenizer

TRICKY = [
    "",
    "plain words",
    " leading space and trailing  ",
    "many     spaces\tand\ttabs",
    "lines\n\n\nand\r\nwindows\n",
    "digits 0123456789 and 3.14159, 1,000,000",
    "unicode: naïve café, Ελληνικά, русский, 日本語, עברית",
    "emoji 🎉🙂👍🏽 and zero\u200bwidth",
    "KING LEAR.\nHow now, my lords!",
]


@pytest.fixture(scope="module")
def shipped() -> Tokenizer:
    return Tokenizer.load(resolve_tokenizer("shakespeare_bpe2048"))


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def small(request, tmp_path_factory) -> Tokenizer:
    """A quick tokenizer trained on 100 kB of the corpus."""
    tmp = tmp_path_factory.mktemp(request.param)
    text = (TEXT_DIR / "shakespeare.txt").read_text(encoding="utf-8")[:100_000]
    (tmp / "small.txt").write_text(text, encoding="utf-8")
    return train_tokenizer([tmp / "small.txt"], 400, tmp / "small", model_type=request.param)


@pytest.mark.parametrize("text", TRICKY)
def test_shipped_round_trip_is_lossless(shipped, text):
    ids = shipped.encode([text])[0]
    assert shipped.decode(ids) == text
    assert shipped.unk_id not in ids  # unseen characters become byte pieces, not <unk>


def test_trained_round_trip_is_lossless(small):
    for text, ids in zip(TRICKY, small.encode(TRICKY), strict=True):
        assert small.decode(ids) == text
    assert small.vocab_size == 400


def test_fixed_id_layout(shipped, small):
    for tok in (shipped, small):
        assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert shipped.vocab_size == 2048


def test_encode_is_batched_and_adds_no_specials(shipped):
    batch = shipped.encode(["To be, or not to be", "that is the question"])
    assert [shipped.decode(ids) for ids in batch] == ["To be, or not to be", "that is the question"]
    assert all(isinstance(i, int) for ids in batch for i in ids)
    assert not {shipped.bos_id, shipped.eos_id, shipped.pad_id} & set(batch[0] + batch[1])
    assert shipped.decode([shipped.bos_id, *batch[0], shipped.eos_id, shipped.pad_id]) == (
        "To be, or not to be"
    )


def test_digits_are_split(shipped):
    ids = shipped.encode(["1234567"])[0]
    assert len(ids) == 7


def test_compression_on_the_corpus(shipped):
    """The shipped model packs Shakespeare at ~2.7 bytes per token."""
    text = (TEXT_DIR / "shakespeare.txt").read_text(encoding="utf-8")[:200_000]
    bytes_per_token = len(text.encode()) / len(shipped.encode([text])[0])
    assert 2.5 < bytes_per_token < 3.0


def test_serialized_round_trip(shipped):
    path = resolve_tokenizer("shakespeare_bpe2048")
    assert shipped.serialized() == Path(path).read_bytes()
    copy = Tokenizer(shipped.serialized())
    assert copy.encode(TRICKY) == shipped.encode(TRICKY)


def test_training_is_deterministic(tmp_path):
    text = (TEXT_DIR / "shakespeare.txt").read_text(encoding="utf-8")[:50_000]
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    one = train_tokenizer([tmp_path / "a.txt"], 320, tmp_path / "one")
    two = train_tokenizer([tmp_path / "a.txt"], 320, tmp_path / "two")
    assert one.serialized() == two.serialized()
    assert (tmp_path / "one.model").read_bytes() == one.serialized()


def test_shipped_model_is_reproducible(tmp_path):
    """The shipped model is what train_tokenizer makes from the training plays, as the script
    does it: the artefact and the code cannot drift apart unnoticed."""
    train_docs, _ = sources.read_split([TEXT_DIR / "shakespeare.txt"], 0.05)
    (tmp_path / "train.txt").write_text("\n".join(train_docs), encoding="utf-8")
    tok = train_tokenizer([tmp_path / "train.txt"], 2048, tmp_path / "again")
    assert tok.serialized() == (TEXT_DIR / "shakespeare_bpe2048.model").read_bytes()


def test_resolve_names_and_paths(tmp_path):
    shipped = resolve_tokenizer("shakespeare_bpe2048")
    assert shipped == str(TEXT_DIR / "shakespeare_bpe2048.model")
    assert resolve_tokenizer(shipped) == shipped
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        resolve_tokenizer("no_such_tokenizer")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        resolve_tokenizer(str(tmp_path / "missing.model"))


@pytest.mark.parametrize("content,message", [
    (b"", "is empty (0 bytes); it is not a SentencePiece model."),
    (b"KING LEAR.\nHow now, my lords!\n", "is not a SentencePiece model."),
    (bytes(range(256)) * 4, "is not a SentencePiece model."),
])
def test_an_empty_or_garbage_tokenizer_file_is_one_sentence(tmp_path, content, message):
    (tmp_path / "bad.model").write_bytes(content)
    with pytest.raises(ValueError) as raised:
        Tokenizer.load(resolve_tokenizer(str(tmp_path / "bad.model")))
    assert str(raised.value) == f"Tokenizer file {tmp_path / 'bad.model'} {message}"
    cfg = base.get_config()
    cfg.data.tokenizer = str(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):  # how a run meets it
        pipeline.build(cfg)


def test_bad_model_type(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer([tmp_path / "x.txt"], 300, tmp_path / "x", model_type="wordpiece")
