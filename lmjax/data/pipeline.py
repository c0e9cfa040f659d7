"""From `cfg.data` to batches: the training order, per-process rows, exact resume, eval batches.

The order is a grain MapDataset, `source(rows).shuffle(seed).repeat()`: random access all the
way down, so the k-th global batch is a pure function of (seed, k). The iterator's whole state
is therefore the step number, resume is exact by construction, and every process computes the
same global order and reads only its own rows (process p takes rows p*b:(p+1)*b of each
global batch, b = global_batch_size // process_count), whatever process_count is.
"""

import dataclasses

import grain
import ml_collections
import numpy as np

from lmjax.data import sources
from lmjax.data.tokenizer import Tokenizer, resolve_tokenizer


def _example(row: np.ndarray) -> dict[str, np.ndarray]:
    """A row of L + 1 packed tokens -> next-token inputs, targets and weights of length L.

    Every target counts (weight 1): packed rows have no padding, and predicting the first token
    of a document after an EOS is part of the task.
    """
    row = np.asarray(row, np.int32)
    return {
        "inputs": row[:-1],
        "targets": row[1:],
        "weights": np.ones(len(row) - 1, np.float32),
    }


class BatchIterator:
    """Infinite iterator over this process's rows of each global batch; state is {"step": k}."""

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


@dataclasses.dataclass
class Data:
    train: BatchIterator  # infinite; this process's part of each global batch
    eval_batches: list[dict]  # fixed held-out batches (host-local numpy), same format as train
    tokenizer: Tokenizer | None  # None for the synthetic source


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

    if d.source == "synthetic":
        tokenizer = None
        train_rows = sources.synthetic_rows(cfg, split=0)
        eval_rows = sources.synthetic_rows(cfg, split=1)
    elif d.source == "text":
        tokenizer = Tokenizer.load(resolve_tokenizer(d.tokenizer))
        if cfg.model.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                f"tokenizer {d.tokenizer!r} ({tokenizer.vocab_size})."
            )
        paths = sources.resolve_text(d.text)
        train_stream, eval_stream = sources.text_streams(paths, tokenizer, d.eval_fraction)
        train_rows = sources.windows(train_stream, d.seq_len)
        eval_rows = sources.windows(eval_stream, d.seq_len)
        if len(train_rows) < d.global_batch_size:
            raise ValueError(
                f"data.text={d.text!r} makes {len(train_rows)} training sequences of "
                f"seq_len+1={d.seq_len + 1} tokens, fewer than one global batch of "
                f"{d.global_batch_size}."
            )
    else:
        raise ValueError(f"data.source={d.source!r} is unknown; use 'text' or 'synthetic'.")

    train = (
        grain.MapDataset.source(train_rows)
        .shuffle(seed=cfg.seed)
        .repeat()
        .map(_example)
        .batch(per_process)
    )
    return Data(
        train=BatchIterator(train, process_index, process_count),
        eval_batches=_eval_batches(cfg, eval_rows, per_process, process_index, process_count),
        tokenizer=tokenizer,
    )


def _eval_batches(
    cfg: ml_collections.ConfigDict,
    rows: np.ndarray | sources.SyntheticRows,
    per_process: int,
    process_index: int,
    process_count: int,
) -> list[dict]:
    """Consecutive held-out rows, unshuffled, cut into global batches as training is; at most
    `train.eval_batches` of them. No eval split (eval_fraction 0) means no batches."""
    d = cfg.data
    if cfg.train.eval_batches == 0 or (d.source == "text" and d.eval_fraction == 0):
        return []
    n = min(cfg.train.eval_batches, len(rows) // d.global_batch_size)
    if n == 0:
        raise ValueError(
            f"The held-out text (data.eval_fraction={d.eval_fraction}) makes {len(rows)} "
            f"sequences of seq_len+1={d.seq_len + 1} tokens, fewer than one global batch of "
            f"{d.global_batch_size}; raise eval_fraction or lower seq_len."
        )
    batches = grain.MapDataset.source(rows).map(_example).batch(per_process)
    return [batches[i * process_count + process_index] for i in range(n)]
