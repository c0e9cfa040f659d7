"""SentencePiece tokenizer: load, encode/decode, train, and resolve shipped models.

Every tokenizer lmjax trains is lossless: identity normalisation, no dummy prefix, whitespace
kept, and byte fallback, so `decode(encode(text)) == text` for any string (emoji and other
unseen characters become UTF-8 byte pieces instead of <unk>). Bits per byte stays honest only
if no text is silently rewritten. The id layout is fixed (pad 0, unk 1, bos 2, eos 3) so
padding masks and document separators never depend on which model was loaded.
"""

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from etils import epath

from lmjax import paths

TEXT_DIR = Path(__file__).parent / "text"  # shipped corpora and tokenizer models


class Tokenizer:
    """A SentencePiece model plus its serialized proto (copied beside checkpoints)."""

    def __init__(self, model_proto: bytes):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """The model at `path`, a local file or gs://...; one sentence if it is none."""
        proto = paths.resolve(path).read_bytes()
        if not proto:  # SentencePiece would take it as a model of no pieces
            raise ValueError(f"Tokenizer file {path} is empty (0 bytes); it is not a "
                             "SentencePiece model.")
        try:  # a protobuf parse: no code runs, whatever the file holds
            return cls(proto)
        except RuntimeError:
            raise ValueError(f"Tokenizer file {path} is not a SentencePiece model.") from None

    def __reduce__(self):
        """Pickle as the proto, so grain worker processes get their own processor."""
        return Tokenizer, (self._proto,)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no BOS/EOS; texts are encoded on all cores by SentencePiece."""
        return self._sp.encode(list(texts), out_type=int, num_threads=os.cpu_count())

    def encode_one(self, text: str) -> list[int]:
        """Token ids of one text on the calling thread: the pipeline's grain threads already run
        in parallel, and a thread pool per document would cost more than the encoding."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (a list or a 1-D array); pad/bos/eos decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def serialized(self) -> bytes:
        """The model proto, byte for byte as loaded: save it and `Tokenizer(bytes)` gets it back."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    # the special pieces' ids (train_tokenizer fixes them at 0, 1, 2, 3)
    pad_id = property(lambda self: self._sp.pad_id())
    unk_id = property(lambda self: self._sp.unk_id())
    bos_id = property(lambda self: self._sp.bos_id())
    eos_id = property(lambda self: self._sp.eos_id())


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_prefix: str | os.PathLike,
    model_type: str = "bpe",
) -> Tokenizer:
    """Train a lossless BPE or unigram model on `files` and write it to `{out_prefix}.model`.

    SentencePiece trains on lines, so pieces never span a newline; newlines are encoded as the
    byte piece <0x0A>. `split_digits` keeps numbers from becoming arbitrary multi-digit pieces
    (LLaMA, PaLM). The pieces are a deterministic function of the text and vocab_size.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
    proto = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(files),  # not input=: the proto would record temp paths
            model_writer=proto,
            logstream=quiet,
            model_type=model_type,
            vocab_size=vocab_size,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            num_threads=os.cpu_count(),
            minloglevel=2,
        )
    path = paths.resolve(f"{out_prefix}.model")  # a local file or gs://...
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.getvalue())
    return Tokenizer(proto.getvalue())


def _lines(files: Sequence[str | os.PathLike]) -> Iterator[str]:
    for f in files:
        with paths.resolve(f).open(encoding="utf-8") as lines:
            yield from (line.rstrip("\n") for line in lines)


def resolve_tokenizer(name_or_path: str) -> str:
    """Path of a tokenizer model: a bare name (`shakespeare_bpe2048`) is a model shipped in
    lmjax/data/text; anything with a '/' or a '.model' suffix is a path, local or gs://..."""
    if os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith(".model"):
        path = paths.resolve(name_or_path)
    else:
        path = epath.Path(TEXT_DIR / f"{name_or_path}.model")
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer {name_or_path!r} not found: no file at {path}.")
    return str(path)
