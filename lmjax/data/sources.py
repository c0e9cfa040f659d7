"""Where training rows come from: local UTF-8 text (tokenized, cached) or synthetic tokens.

A source yields rows of `seq_len + 1` tokens; the pipeline turns row r into inputs r[:-1] and
targets r[1:]. Both sources are random access (row i is a pure function of the source and i),
which is what makes the data order a pure function of (seed, step) and resume exact.
"""

import glob
import hashlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from lmjax.data.tokenizer import TEXT_DIR, Tokenizer

# Two or more blank lines end a document: plain text has no other portable separator, and
# single blank lines occur inside documents (between speeches, paragraphs).
DOC_SEPARATOR = re.compile(r"\n(?:[ \t\r]*\n){2,}")
_CACHE_VERSION = b"lmjax-tokens-v1"  # bump when the tokenized format or splitting changes


def resolve_text(name_or_glob: str) -> list[Path]:
    """Files of `data.text`: a shipped name (`shakespeare`) or a glob of local files, sorted."""
    shipped = TEXT_DIR / f"{name_or_glob}.txt"
    if "/" not in name_or_glob and shipped.is_file():
        return [shipped]
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(name_or_glob), recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FileNotFoundError(
            f"data.text={name_or_glob!r} is neither a text shipped in {TEXT_DIR} nor a glob "
            "matching any file."
        )
    return paths


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start}).") from None
    if not text.strip():
        raise ValueError(f"{path} is empty (no text besides whitespace).")
    return text


def split_documents(text: str) -> list[str]:
    """Documents of one file: its text cut at every run of two or more blank lines."""
    return [doc for doc in DOC_SEPARATOR.split(text) if doc.strip()]


def train_eval_split(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last ceil(eval_fraction * n) documents; with one document, its last
    eval_fraction of characters. Holding out whole documents keeps eval text unseen, not just
    unseen windows of seen documents."""
    if eval_fraction <= 0:
        return docs, []
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - eval_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    n_eval = min(math.ceil(len(docs) * eval_fraction), len(docs) - 1)
    return docs[: len(docs) - n_eval], docs[len(docs) - n_eval :]


def read_split(paths: Sequence[Path], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Train and eval documents of `paths`, in file order."""
    return _split(paths, [p.read_bytes() for p in paths], eval_fraction)


def _split(paths: Sequence[Path], raw: list[bytes], eval_fraction: float):
    docs = []
    for path, data in zip(paths, raw, strict=True):
        docs += split_documents(_decode(path, data))
    return train_eval_split(docs, eval_fraction)


def tokenize_stream(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents as one int32 stream, EOS after each (concatenate-then-split packing)."""
    pieces = [np.asarray(ids + [tokenizer.eos_id], np.int32) for ids in tokenizer.encode(docs)]
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def cache_dir() -> Path:
    """Tokenized streams live here: $LMJAX_CACHE, else ~/.cache/lmjax."""
    return Path(os.environ.get("LMJAX_CACHE") or Path.home() / ".cache" / "lmjax")


def text_streams(
    paths: Sequence[Path], tokenizer: Tokenizer, eval_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) token streams of `paths`, read from the cache when these exact file
    contents were tokenized before with this exact tokenizer and eval_fraction.

    The key hashes contents, not mtimes, so a copied or re-installed corpus still hits and an
    edited one never serves stale tokens. The file is written under a temporary name and moved
    into place, so processes sharing a host and a cache never read a half-written file.
    """
    raw = [p.read_bytes() for p in paths]
    key = hashlib.sha256(_CACHE_VERSION)
    for data in raw:
        key.update(hashlib.sha256(data).digest())
    key.update(hashlib.sha256(tokenizer.serialized()).digest())
    key.update(repr(float(eval_fraction)).encode())
    path = cache_dir() / f"tokens-{key.hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["train"], cached["eval"]

    train_docs, eval_docs = _split(paths, raw, eval_fraction)
    train, evals = tokenize_stream(train_docs, tokenizer), tokenize_stream(eval_docs, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, train=train, eval=evals)
    os.replace(tmp, path)
    return train, evals


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows of seq_len + 1 tokens starting every seq_len tokens (a view, no copy).

    Neighbouring rows share one token, so every token after the first is a target exactly
    once and no transition of the stream is lost at a row boundary. The tail shorter than a
    row is dropped.
    """
    n = max(0, (len(stream) - 1) // seq_len)
    if n == 0:
        return np.zeros((0, seq_len + 1), np.int32)
    return np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len]


class SyntheticRows(Sequence):
    """Infinite-in-practice random tokens with learnable structure, for benchmarks and tests.

    Row i is drawn from `np.random.default_rng([seed, split, i])`: a random first token, then
    each next token is the previous plus one of four fixed offsets (drawn once from `seed`)
    with probabilities 1/2, 1/4, 1/8, 1/8, modulo vocab_size. That is a first-order Markov chain
    with four likely successors per token; the best possible loss is the offsets' entropy,
    `ENTROPY` = 1.75 bits ~ 1.213 nats/token, so a falling loss can be checked against a floor.
    Rows are generated with vectorised cumulative sums, no Python loop per token.
    """

    LENGTH = 2**31 - 1  # rows; shuffle indices must fit in 32 bits
    PROBS = np.array([0.5, 0.25, 0.125, 0.125])
    ENTROPY = float(-(PROBS * np.log(PROBS)).sum())

    def __init__(self, seed: int, split: int, vocab_size: int, seq_len: int):
        self._seed, self._split = seed, split
        self._vocab_size, self._seq_len = vocab_size, seq_len
        self._offsets = np.random.default_rng([seed]).choice(
            np.arange(1, vocab_size), size=len(self.PROBS), replace=False
        )

    def __len__(self) -> int:
        return self.LENGTH

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.LENGTH:
            raise IndexError(index)
        rng = np.random.default_rng([self._seed, self._split, index])
        first = rng.integers(self._vocab_size, size=1)
        steps = self._offsets[rng.choice(len(self.PROBS), size=self._seq_len, p=self.PROBS)]
        return (np.cumsum(np.concatenate([first, steps])) % self._vocab_size).astype(np.int32)


def synthetic_rows(cfg: ml_collections.ConfigDict, split: int) -> SyntheticRows:
    """Synthetic rows over the model's whole vocabulary; split 0 is train, 1 is eval."""
    return SyntheticRows(cfg.seed, split, cfg.model.vocab_size, cfg.data.seq_len)
