"""From `cfg.data` to batches: the training order, per-process rows, exact resume, eval batches.

Text, record (jsonl, parquet, hf: lmjax/data/records.py) and synthetic sources: the order is a
grain MapDataset, `source(rows).shuffle(seed).repeat()`: random access all the way down, so the
k-th global batch is a pure function of (seed, k). The
iterator's whole state is therefore the step number, resume is exact by construction, and every
process computes the same global order and reads only its own rows (process p takes rows
p*b:(p+1)*b of each global batch, b = global_batch_size // process_count), whatever
process_count is.

TFDS source (corpora too large to tokenize up front): documents are shuffled globally by seed,
process p reads documents p, p+n, p+2n, ... of that order (disjoint shards that together cover
each epoch), tokenizes them in grain threads and packs them concatenate-then-split into rows of
seq_len. The packing buffer makes the state more than a step number: it is grain's iterator
state (documents read, remainder held), one per process, saved in every checkpoint.

Packed rows and document boundaries: every document ends with EOS, and the EOS that precedes a
document opens it (it plays BOS), so each target is predicted once and the first token of each
document from its own segment alone. With `data.segment_mask`, batches also carry
`segment_ids` (1, 2, ... per document piece in a row, 0 for padding) and `positions` (index
within the piece), and the model attends within a segment only: a packed document then gets
exactly the logits it would get alone.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np

from lmjax import config
from lmjax.data import mixture, records, sources
from lmjax.data.tokenizer import Tokenizer, resolve_tokenizer

# What data.source may be: text files, record files (lmjax/data/records.py), TFDS, synthetic.
SOURCES = ("text", *records.SOURCES, "tfds", "synthetic")
# Sources tokenized up front into one stream, whose tail data.eval_fraction holds out.
TEXT_LIKE = ("text", *records.SOURCES)


def positions(segment_ids_L: np.ndarray) -> np.ndarray:
    """Index of each token within its run of equal segment ids (0 where a run starts)."""
    index_L = np.arange(len(segment_ids_L), dtype=np.int32)
    starts_L = np.r_[True, segment_ids_L[1:] != segment_ids_L[:-1]]
    return index_L - np.maximum.accumulate(np.where(starts_L, index_L, 0))


def _example(row: np.ndarray, eos_id: int | None, segment_mask: bool) -> dict[str, np.ndarray]:
    """A row of L + 1 stream tokens -> next-token inputs, targets and weights of length L.

    Every target counts (weight 1): stream rows have no padding, and predicting the first token
    of a document after an EOS is part of the task. An EOS input opens a new segment.
    """
    row = np.asarray(row, np.int32)
    out = {"inputs": row[:-1], "targets": row[1:], "weights": np.ones(len(row) - 1, np.float32)}
    if segment_mask:
        is_eos_L = out["inputs"] == eos_id if eos_id is not None else np.zeros(len(row) - 1, bool)
        out["segment_ids"] = (1 + np.cumsum(is_eos_L)).astype(np.int32)
        out["positions"] = positions(out["segment_ids"])
    return out


def _document(example: dict, tokenizer: Tokenizer, feature: str) -> dict[str, np.ndarray]:
    """One TFDS example -> inputs [EOS, t1..tn], targets [t1..tn, EOS] (the EOS opens it)."""
    text = example[feature]
    ids = tokenizer.encode_one(text.decode("utf-8") if isinstance(text, bytes) else text)
    tokens = np.asarray([tokenizer.eos_id, *ids, tokenizer.eos_id], np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def _packed_example(packed: dict, segment_mask: bool) -> dict[str, np.ndarray]:
    """grain's packed features -> our batch keys; padding (segment 0) gets weight 0."""
    segment_ids_L = packed["inputs_segment_ids"].astype(np.int32)
    out = {"inputs": packed["inputs"].astype(np.int32),
           "targets": packed["targets"].astype(np.int32),
           "weights": (segment_ids_L > 0).astype(np.float32)}
    if segment_mask:
        out["segment_ids"] = segment_ids_L
        out["positions"] = packed["inputs_positions"].astype(np.int32)
    return out


def pack(documents: grain.IterDataset, seq_len: int, segment_mask: bool) -> grain.IterDataset:
    """Concatenate-then-split documents into rows of seq_len (grain's packer, resumable); a
    document longer than the row continues in the next row, nothing is dropped or repeated."""
    packed = grain.experimental.ConcatThenSplitIterDataset(
        documents, length_struct={"inputs": seq_len, "targets": seq_len})
    return packed.map(functools.partial(_packed_example, segment_mask=segment_mask))


class BatchIterator:
    """Infinite iterator over this process's rows of each global batch; state is {"step": k}.

    The same state on every process, so a checkpoint restores on any process count."""

    def __init__(self, batches: grain.MapDataset, process_index: int, process_count: int):
        self._batches = batches  # element i = b consecutive rows of the global row order
        self._process_index, self._process_count = process_index, process_count
        self._step = 0

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._batches[self._step * self._process_count + self._process_index]
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable state: the number of batches already returned."""
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        """Continue with exactly the batches that followed when `state` was taken."""
        self._step = int(state["step"])


class PackedIterator:
    """This process's batches of packed TFDS documents; state is grain's, per process."""

    def __init__(self, batches: grain.IterDataset):
        self._it = iter(batches)
        self._step = 0

    def __iter__(self) -> "PackedIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable: batches returned and grain's position (documents, remainder)."""
        return {"step": self._step, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["grain"])
        self._step = int(state["step"])


@dataclasses.dataclass
class Data:
    train: BatchIterator | PackedIterator  # infinite; this process's part of each global batch
    eval_batches: list[dict]  # fixed held-out batches (host-local numpy), same format as train
    tokenizer: Tokenizer | None  # None for the synthetic source
    # Target tokens in one pass over the training rows, so a run can log its epochs of
    # repeated data (Muennighoff et al. 2023). None where one pass is not a fixed set: synthetic
    # rows, TFDS documents packed on the fly, a mixture's sources repeating at their own rates.
    train_tokens: int | None = None


def validate(cfg: ml_collections.ConfigDict) -> None:
    """data.* as far as it can be checked without reading a file: the source, the lengths, the
    strided-eval stride, a mixture's names and weights (its files are read by build)."""
    d = cfg.data
    config.check_choices(cfg, {"data.source": SOURCES})
    if not 0 <= d.eval_stride <= d.seq_len:
        raise ValueError(f"data.eval_stride={d.eval_stride} must be between 1 and the context "
                         f"data.seq_len={d.seq_len} (0: non-overlapping windows, = seq_len).")
    if d.mixture:
        if d.source != "text":
            raise ValueError(f"data.mixture mixes texts; it needs data.source='text', "
                             f"not {d.source!r}.")
        mixture.parse(d.mixture)
    if d.source in records.SOURCES and not d.text_field:
        raise ValueError(f"data.source={d.source!r} needs data.text_field, the field holding "
                         "each record's text.")


def build(cfg: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1) -> Data:
    """Train iterator, eval batches and tokenizer of `cfg`, for process `process_index`."""
    d = cfg.data
    if d.global_batch_size % process_count:
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by the "
            f"{process_count} processes."
        )
    if not 0 <= d.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1).")
    per_process = d.global_batch_size // process_count
    if d.source not in SOURCES:
        raise ValueError(f"data.source={d.source!r} is unknown; use one of {SOURCES}.")
    tokenizer = None
    if d.source != "synthetic":
        tokenizer = Tokenizer.load(resolve_tokenizer(d.tokenizer))
        if cfg.model.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                f"tokenizer {d.tokenizer!r} ({tokenizer.vocab_size})."
            )
    if d.source == "tfds":
        return _build_tfds(cfg, tokenizer, process_index, process_count)
    if d.mixture:
        return _build_mixture(cfg, tokenizer, process_index, process_count)

    if d.source == "synthetic":
        train_rows = sources.synthetic_rows(cfg, split=0)
        eval_rows = sources.synthetic_rows(cfg, split=1)
    else:
        train_stream, eval_stream = streams(cfg, tokenizer)
        train_rows = sources.windows(train_stream, d.seq_len)
        eval_rows = sources.windows(eval_stream, d.seq_len)
        if len(train_rows) < d.global_batch_size:
            raise ValueError(
                f"data.text={d.text!r} ({d.source}) makes {len(train_rows)} training sequences of "
                f"seq_len+1={d.seq_len + 1} tokens, fewer than one global batch of "
                f"{d.global_batch_size}."
            )

    example = functools.partial(_example, eos_id=None if tokenizer is None else tokenizer.eos_id,
                                segment_mask=d.segment_mask)
    train = (
        grain.MapDataset.source(train_rows)
        .shuffle(seed=cfg.seed)
        .repeat()
        .map(example)
        .batch(per_process)
    )
    return Data(
        train=BatchIterator(train, process_index, process_count),
        eval_batches=_eval_batches(cfg, eval_rows, example, process_index, process_count),
        tokenizer=tokenizer,
        train_tokens=None if d.source == "synthetic" else len(train_rows) * d.seq_len,
    )


def streams(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
            eval_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token streams of data.text, read as data.source says (a TEXT_LIKE
    source), held out as data.eval_fraction or `eval_fraction` (0: all of it is 'train')."""
    d = cfg.data
    fraction = d.eval_fraction if eval_fraction is None else eval_fraction
    if d.source == "text":
        return sources.text_streams(sources.resolve_text(d.text), tokenizer, fraction)
    files = records.resolve(d.source, d.text)
    return records.record_streams(d.source, files, d.text_field, tokenizer, fraction)


def source_rows(cfg: ml_collections.ConfigDict, source: mixture.Source,
                tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) rows of one mixture source, split and cached exactly as data.text."""
    try:
        paths = sources.resolve_text(source.pattern)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"data.mixture source {source.name!r}: {source.pattern!r} is neither a shipped text "
            "nor a glob matching any file.") from None
    train, held_out = sources.text_streams(paths, tokenizer, cfg.data.eval_fraction)
    return sources.windows(train, cfg.data.seq_len), sources.windows(held_out, cfg.data.seq_len)


def _build_mixture(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, process_index: int,
                   process_count: int) -> Data:
    """Each source's rows shuffled (seed + its index) and repeated on their own, then mixed by
    weight (lmjax/data/mixture.py); held-out batches mix the held-out rows the same way."""
    d = cfg.data
    train, held_out, weights = [], [], []
    for i, source in enumerate(mixture.parse(d.mixture)):
        train_rows, eval_rows = source_rows(cfg, source, tokenizer)
        if source.weight == 0:
            continue
        need_eval = d.eval_fraction > 0 and cfg.train.eval_batches > 0
        if len(train_rows) == 0 or (need_eval and len(eval_rows) == 0):
            raise ValueError(
                f"data.mixture source {source.name!r} makes {len(train_rows)} training and "
                f"{len(eval_rows)} held-out sequences of seq_len+1={d.seq_len + 1} tokens; "
                "each needs at least one.")
        train.append(grain.MapDataset.source(train_rows).shuffle(seed=cfg.seed + i).repeat())
        held_out.append(grain.MapDataset.source(eval_rows))
        weights.append(source.weight)
    example = functools.partial(_example, eos_id=tokenizer.eos_id, segment_mask=d.segment_mask)
    batches = mixture.mix(train, weights).map(example).batch(d.global_batch_size // process_count)
    eval_rows = []
    if d.eval_fraction > 0 and cfg.train.eval_batches > 0:
        mixed = mixture.mix(held_out, weights)
        eval_rows = [mixed[i] for i in range(min(len(mixed),
                                                 cfg.train.eval_batches * d.global_batch_size))]
    return Data(train=BatchIterator(batches, process_index, process_count),
                eval_batches=_eval_batches(cfg, eval_rows, example, process_index, process_count),
                tokenizer=tokenizer)


def _build_tfds(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, process_index: int,
                process_count: int) -> Data:
    """Shuffle documents globally, keep this process's share, tokenize in grain threads, pack,
    batch; `data.worker_count` > 0 moves everything after reading into worker processes."""
    d = cfg.data
    per_process = d.global_batch_size // process_count
    document = functools.partial(_document, tokenizer=tokenizer, feature=d.tfds_feature)
    read = grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch)
    docs = sources.tfds_source(d.tfds_name, d.tfds_data_dir, d.train_split, d.tfds_feature)
    train = (
        grain.MapDataset.source(docs)
        .shuffle(seed=cfg.seed)
        .repeat()[process_index::process_count]
        .map(document)
        .to_iter_dataset(read)
    )
    train = pack(train, d.seq_len, d.segment_mask).batch(per_process)
    if d.worker_count:
        train = train.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))

    eval_batches = []
    if d.eval_split and cfg.train.eval_batches:
        held_out = sources.tfds_source(d.tfds_name, d.tfds_data_dir, d.eval_split, d.tfds_feature)
        rows = pack(grain.MapDataset.source(held_out).map(document).to_iter_dataset(read),
                    d.seq_len, d.segment_mask)
        rows = list(itertools.islice(rows, cfg.train.eval_batches * d.global_batch_size))
        if len(rows) < d.global_batch_size:
            raise ValueError(
                f"data.eval_split={d.eval_split!r} packs into {len(rows)} rows of "
                f"seq_len={d.seq_len}, fewer than one global batch of {d.global_batch_size}.")
        eval_batches = _eval_batches(cfg, rows, lambda row: row, process_index, process_count)
    return Data(train=PackedIterator(train), eval_batches=eval_batches, tokenizer=tokenizer)


def _eval_batches(
    cfg: ml_collections.ConfigDict,
    rows: Sequence,
    example: Callable[[np.ndarray], dict],
    process_index: int,
    process_count: int,
) -> list[dict]:
    """Consecutive held-out rows, unshuffled, cut into global batches as training is; at most
    `train.eval_batches` of them. No eval split (eval_fraction 0) means no batches. Every
    process sees the same global rows, so all get the same number of batches."""
    d = cfg.data
    per_process = d.global_batch_size // process_count
    if cfg.train.eval_batches == 0 or (d.source in TEXT_LIKE and d.eval_fraction == 0):
        return []
    n = min(cfg.train.eval_batches, len(rows) // d.global_batch_size)
    if n == 0:
        raise ValueError(
            f"The held-out text (data.eval_fraction={d.eval_fraction}) makes {len(rows)} "
            f"sequences of seq_len+1={d.seq_len + 1} tokens, fewer than one global batch of "
            f"{d.global_batch_size}; raise eval_fraction or lower seq_len."
        )
    batches = grain.MapDataset.source(rows).map(example).batch(per_process)
    return [batches[i * process_count + process_index] for i in range(n)]
