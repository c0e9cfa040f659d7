"""The FLOP convention against XLA's count of the whole compiled train step on the bench model."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lmjax import attention, config, flops, sharding, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_bench_train_step_flops_match_xla_cost_analysis(monkeypatch):
    """XLA counts the step at 1.047x our figure (measured: 8.436e10 vs 8.056e10 FLOPs/step).
    Most of the gap is attention: XLA computes the full T x T scores and masks them, we count
    the causal half; against the full-attention count XLA is 1.007x, the rest being softmax,
    norms, loss and the AdamW update (~20 FLOPs per parameter), none of which we count.

    The other conventions: XLA is 0.77x Chinchilla's count, which charges the embedding lookup
    as a V x D matmul (23% of it here, V = 8192); without that term, 1.007x, as full attention.
    XLA is 1.64x Kaplan's 6N, which leaves out the unembedding matmul and attention.

    All with every score computed: xla_attention's causal split, which skips a quarter of
    them, is off here (tests/test_flops.py measures what it saves)."""
    monkeypatch.setattr(attention, "CAUSAL_SPLIT_MIN_LEN", 10**9)
    # unrolled: XLA's cost_analysis counts a scanned loop body once, not once per layer
    cfg = config.load(str(CONFIGS / "bench.py"), ["model.scan_layers=false"])
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    B, L = cfg.data.global_batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, L), jnp.float32 if k == "weights" else jnp.int32)
             for k in ("inputs", "targets", "weights")}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        fns = train.compile_fns(cfg, mesh)
        cost = fns.step.lower(fns.abstract_state, batch).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = flops.report_dict(cfg)["flops_per_step"]
    m = cfg.model
    full_attention = ours + 6 * m.num_layers * L * m.num_heads * m.head_dim * B * L
    assert 1.0 < xla / ours < 1.06
    assert 1.0 < xla / full_attention < 1.02
    per_step = {c: flops.flops_per_token(m, L, c) * B * L for c in flops.CONVENTIONS}
    lookup = 3 * flops.chinchilla_terms(m, L)["embeddings"] * B * L
    assert 0.75 < xla / per_step["chinchilla"] < 0.8
    assert 1.0 < xla / (per_step["chinchilla"] - lookup) < 1.02
    assert 1.6 < xla / per_step["kaplan"] < 1.7
