"""The batch contract: what every batch the model trains and is evaluated on holds.

Rows are [B, L] (B: this process's rows, L: data.seq_len), one array per key:

  inputs       int32    the token ids the model reads
  targets      int32    the token each position predicts (inputs shifted left by one)
  weights      float32  1 where the loss counts, 0 on padding
  segment_ids  int32    packed rows only: the document of each token, from 1 (0: padding)
  positions    int32    packed rows only: each token's position within its document

The pipeline, the evaluation rows, the bench's synthetic batches and the planner's abstract
batch all follow it; `check` is the one place it is enforced (sharding.to_global, the door
every batch goes through onto the devices). Integer keys may come as any integer type (JAX
takes int64 ids as int32), weights as any float type.
"""

import jax
import numpy as np

REQUIRED = {"inputs": np.int32, "targets": np.int32, "weights": np.float32}
PACKED = {"segment_ids": np.int32, "positions": np.int32}
FIELDS = {**REQUIRED, **PACKED}


def check(batch: dict) -> None:
    """Raise ValueError naming the first key that breaks the contract."""
    missing = [key for key in REQUIRED if key not in batch]
    unknown = [key for key in batch if key not in FIELDS]
    if missing or unknown:
        raise ValueError(f"A batch needs keys {sorted(REQUIRED)} (+ {sorted(PACKED)} when "
                         f"packed); this one lacks {missing} and has unknown {unknown}.")
    if ("segment_ids" in batch) != ("positions" in batch):
        raise ValueError("A packed batch carries both segment_ids and positions, or neither.")
    shape = np.shape(batch["inputs"])
    for key, value in batch.items():
        if np.shape(value) != shape or len(shape) != 2:
            raise ValueError(f"Batch key {key!r} has shape {np.shape(value)}; every key must be "
                             f"[rows, seq_len] like inputs {shape}.")
        if np.dtype(value.dtype).kind != np.dtype(FIELDS[key]).kind:  # int64 ids are fine
            raise ValueError(f"Batch key {key!r} has dtype {value.dtype}; it holds "
                             f"{np.dtype(FIELDS[key])} values.")


def abstract(shape: tuple[int, int], packed: bool, sharding=None) -> dict:
    """The contract as ShapeDtypeStructs (no memory): what lmjax plan compiles the step for."""
    keys = FIELDS if packed else REQUIRED
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for key, dtype in keys.items()}
