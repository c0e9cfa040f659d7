"""Where training data comes from: UTF-8 text (tokenized, cached), a prepared TFDS dataset
(array_record, read by random access), or synthetic tokens. Text files and TFDS folders may be
local or in a bucket (gs://...; lmjax/paths.py).

The text and synthetic sources yield rows of `seq_len + 1` tokens; the pipeline turns row r into
inputs r[:-1] and targets r[1:]. Both are random access (row i is a pure function of the source
and i), which is what makes their data order a pure function of (seed, step) and resume exact.
The TFDS source yields documents; the pipeline tokenizes and packs them on the fly.
`build_tfds` turns local text files into such a TFDS dataset.
"""

import hashlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lmjax import paths
from lmjax.data.tokenizer import TEXT_DIR, Tokenizer

# Two or more blank lines end a document: plain text has no other portable separator, and
# single blank lines occur inside documents (between speeches, paragraphs).
DOC_SEPARATOR = re.compile(r"\n(?:[ \t\r]*\n){2,}")
_CACHE_VERSION = b"lmjax-tokens-v1"  # bump when the tokenized format or splitting changes


def resolve_text(name_or_glob: str) -> list[epath.Path]:
    """Files of `data.text`: a shipped name (`shakespeare`), a glob of files, or a folder
    (every file under it), sorted; on a disk or in a bucket (gs://...)."""
    shipped = TEXT_DIR / f"{name_or_glob}.txt"
    if "/" not in name_or_glob and shipped.is_file():
        return [epath.Path(shipped)]
    pattern = name_or_glob
    if paths.resolve(pattern).is_dir():
        pattern = f"{pattern.rstrip('/')}/**/*"
    files = paths.glob(pattern)
    if not files:
        raise FileNotFoundError(
            f"data.text={name_or_glob!r} is neither a text shipped in {TEXT_DIR} nor a glob "
            "matching any file."
        )
    return files


def _decode(path: epath.Path, raw: bytes) -> str:
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


def read_split(paths: Sequence[epath.Path], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Train and eval documents of `paths`, in file order."""
    return _split(paths, [p.read_bytes() for p in paths], eval_fraction)


def _split(paths: Sequence[epath.Path], raw: list[bytes], eval_fraction: float):
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
    paths: Sequence[epath.Path], tokenizer: Tokenizer, eval_fraction: float
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


# ------------------------------------------------------------------ TFDS (array_record)

PARAGRAPH = re.compile(r"\n(?:[ \t\r]*\n)+")  # one or more blank lines


def tfds_source(name: str, data_dir: str, split: str, feature: str) -> Sequence:
    """Random-access documents of a prepared TFDS dataset (array_record or parquet).

    `tfds.data_source` needs no TensorFlow. It is called with download=False: a dataset that is
    not prepared is an error naming where we looked, never a download at run time.
    """
    root = paths.resolve(data_dir or tfds.core.constants.DATA_DIR)  # a folder or gs://...
    folder = root / name.split(":")[0]
    if not name or not paths.glob(f"{folder}/**/dataset_info.json"):
        raise FileNotFoundError(
            f"data.tfds_name={name!r} is not a prepared TFDS dataset under {root} "
            "(data.tfds_data_dir); prepare it with tfds or `lmjax data build`."
        )
    try:
        source = tfds.data_source(name, split=split, data_dir=str(root), download=False)
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise ValueError(f"Split {split!r} of TFDS dataset {name!r}: {e}") from None
    if len(source) == 0:
        raise ValueError(f"Split {split!r} of TFDS dataset {name!r} has no examples.")
    if feature not in source[0]:
        raise KeyError(
            f"TFDS dataset {name!r} has no feature data.tfds_feature={feature!r}; "
            f"it has {sorted(source[0])}."
        )
    return source


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local documents as a TFDS dataset with one `text` feature; subclassed per name."""

    VERSION = tfds.core.Version("1.0.0")
    DOCS: dict[str, list[str]] = {}  # split name -> documents, set on the subclass

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(docs) for split, docs in self.DOCS.items()}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


def read_documents(paths: Sequence[epath.Path], per: str) -> list[str]:
    """Documents of `paths`: one per file (`per='file'`) or one per blank-line-separated
    paragraph (`per='paragraph'`). Every file must be non-empty UTF-8."""
    if per not in ("file", "paragraph"):
        raise ValueError(f"Documents are split per 'file' or 'paragraph', not {per!r}.")
    docs = []
    for path in paths:
        text = _decode(path, path.read_bytes())
        if per == "file":
            docs.append(text)
        else:
            docs += [p for p in PARAGRAPH.split(text) if p.strip()]
    return docs


def build_tfds(
    pattern: str, name: str, data_dir: str, eval_fraction: float = 0.05, per: str = "file"
) -> dict[str, int]:
    """Write the files matching `pattern` as TFDS dataset `name` (array_record) in `data_dir`,
    with splits `train` and `validation` (the last documents, as `train_eval_split` holds out);
    returns the number of documents per split. Read it back with data.source='tfds'.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"Dataset name {name!r} must be snake_case: [a-z][a-z0-9_]*.")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1).")
    docs = read_documents(resolve_text(pattern), per)
    if len(docs) < 2:
        raise ValueError(
            f"{pattern!r} holds {len(docs)} document; a train and a validation split need two "
            "(use per='paragraph' or more files)."
        )
    train, held_out = train_eval_split(docs, eval_fraction)
    return write_tfds(name, data_dir, {"train": train, "validation": held_out})


def write_tfds(name: str, data_dir: str, splits: dict[str, list[str]]) -> dict[str, int]:
    """Write documents per split as TFDS dataset `name` (array_record) under `data_dir`."""
    builder_cls = type("TextBuilder", (_TextBuilder,), {"name": name, "DOCS": splits},
                       skip_registration=True)
    builder = builder_cls(data_dir=str(paths.resolve(data_dir)), file_format="array_record")
    tfds.display_progress_bar(False)
    builder.download_and_prepare()
    return {split: len(docs) for split, docs in splits.items()}
