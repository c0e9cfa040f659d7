import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import loss


def test_cross_entropy_golden():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3))
    weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    want = (nll * weights).sum() / weights.sum()
    log_z = np.log(np.exp(logits).sum(-1))
    want_z = (log_z**2 * weights).sum() / weights.sum()
    total, aux = loss.cross_entropy(jnp.array(logits), jnp.array(targets), jnp.array(weights),
                                    z_loss=1e-2)
    assert float(aux["loss"]) == pytest.approx(want, rel=1e-6)
    assert float(aux["log_z_squared"]) == pytest.approx(want_z, rel=1e-6)
    assert float(total) == pytest.approx(want + 1e-2 * want_z, rel=1e-6)
    acc = ((logits.argmax(-1) == targets) * weights).sum() / weights.sum()
    assert float(aux["accuracy"]) == pytest.approx(acc)
    assert float(aux["num_tokens"]) == 4


def test_uniform_logits_give_log_vocab():
    _, aux = loss.cross_entropy(jnp.zeros((1, 4, 7)), jnp.zeros((1, 4), jnp.int32),
                                jnp.ones((1, 4)))
    assert float(aux["loss"]) == pytest.approx(np.log(7), rel=1e-6)
