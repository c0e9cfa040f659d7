"""The batch contract (lmjax/data/batch.py): what passes, and the sentence for what does not."""

import jax
import numpy as np
import pytest

from lmjax import sharding
from lmjax.data import batch


def rows(**extra):
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    return {"inputs": ids, "targets": ids + 1, "weights": np.ones((2, 4), np.float32), **extra}


def test_plain_and_packed_batches_pass():
    batch.check(rows())
    batch.check(rows(segment_ids=np.ones((2, 4), np.int32), positions=np.zeros((2, 4), np.int64)))


@pytest.mark.parametrize("bad,says", [
    ({"weights": None}, "lacks ['weights']"),
    ({"labels": np.zeros((2, 4), np.int32)}, "unknown ['labels']"),
    ({"segment_ids": np.ones((2, 4), np.int32)}, "both segment_ids and positions"),
    ({"targets": np.zeros((2, 5), np.int32)}, "'targets' has shape (2, 5)"),
    ({"inputs": np.zeros((2, 4), np.float32)}, "'inputs' has dtype float32"),
])
def test_a_broken_batch_is_refused_naming_the_key(bad, says):
    b = {k: v for k, v in {**rows(), **bad}.items() if v is not None}
    with pytest.raises(ValueError) as e:
        batch.check(b)
    assert says in str(e.value)


def test_every_batch_is_checked_on_its_way_to_the_devices():
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    good = {k: np.tile(v, (4, 1)) for k, v in rows().items()}
    assert sharding.to_global(good, mesh)["inputs"].shape == (8, 4)
    with pytest.raises(ValueError, match="lacks"):
        sharding.to_global({"inputs": good["inputs"]}, mesh)


def test_the_abstract_batch_is_the_contract():
    packed = batch.abstract((8, 16), packed=True)
    assert set(packed) == set(batch.FIELDS)
    assert {k: v.dtype for k, v in packed.items()} == {k: np.dtype(v)
                                                      for k, v in batch.FIELDS.items()}
    assert set(batch.abstract((8, 16), packed=False)) == set(batch.REQUIRED)
