"""Parameter counts against published figures, and the FLOP convention against XLA's own count."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from lmjax import attention, config, flops
from lmjax.model import Transformer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """A config loaded by path, as `--config=configs/name.py:arg` is."""
    return config.load(f"{CONFIGS / name}.py" + (f":{arg}" if arg else ""))


# Published totals: GPT-2 as in HF transformers (tied lm head), TinyLlama-1.1B and OpenLLaMA-3B
# model cards, LLaMA-2 7B (Meta's 6,738,415,616).
PUBLISHED = {
    ("gpt2", "small"): 124_439_808,
    ("gpt2", "medium"): 354_823_168,
    ("gpt2", "large"): 774_030_080,
    ("gpt2", "xl"): 1_557_611_200,
    ("llama", "1b"): 1_100_048_384,
    ("llama", "3b"): 3_426_473_600,
    ("llama", "7b"): 6_738_415_616,
}


@pytest.mark.parametrize(("file", "arg"), PUBLISHED)
def test_presets_match_published_param_counts(file, arg):
    counts = flops.count_params(load(file, arg).model)
    assert counts["total"] == PUBLISHED[file, arg]
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]


@pytest.mark.parametrize(("file", "arg"), [*PUBLISHED, ("llama", "tiny")])
def test_presets_override_at_most_20_keys_of_base(file, arg):
    def flat(c: ml_collections.ConfigDict) -> dict:
        return {f"{group}.{k}": v for group, sub in c.items()
                if isinstance(sub, ml_collections.ConfigDict) for k, v in sub.items()}

    base, preset = flat(load("base")), flat(load(file, arg))
    assert preset.keys() == base.keys()  # presets override, never invent keys
    changed = [k for k in base if base[k] != preset[k]]
    assert len(changed) <= 20, changed


@pytest.mark.parametrize("file", ["gpt2", "llama"])
def test_unknown_preset_names_the_valid_ones(file):
    with pytest.raises(ValueError, match="choose one of"):
        load(file, "huge")


def small_model(kind: str) -> ml_collections.ConfigDict:
    """base.py shrunk; GPT-2 style (tied, biases, learned positions) or LLaMA style (GQA)."""
    m = load("base").model
    m.update(vocab_size=1024, d_model=128, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=64,
             mlp_dim=512, max_len=1024)
    m.scan_layers = False  # XLA's cost_analysis counts a loop body once, not once per layer
    if kind == "gpt2":
        m.update(mlp="gelu", norm="layer", position="learned", use_bias=True, tie_embeddings=True)
    else:
        m.update(num_kv_heads=1)
    return m


def test_golden_counts_for_base_config():
    # V=2048 D=256 4 layers N=K=4 H=64 F=1024 swiglu rms rope, untied, no biases.
    m = load("base").model
    embed = 2048 * 256
    block = 4 * 256 * 256 + 3 * 256 * 1024 + 2 * 256  # q k v o, gate up down, two RMSNorm scales
    non_embedding = 4 * block + 256 + 256 * 2048  # blocks, final norm, untied unembedding
    assert non_embedding == 4_720_896
    assert flops.count_params(m) == {"total": 5_245_184, "embedding": embed,
                                     "non_embedding": non_embedding, "active": 5_245_184,
                                     "active_non_embedding": non_embedding}  # dense: all active
    # 6 * 4,720,896 + 6 * layers 4 * T 256 * d_attn 256
    assert flops.flops_per_token(m, 256) == 28_325_376 + 1_572_864 == 29_898_240
    assert flops.forward_flops_per_token(m, 256) == 29_898_240 / 3


def test_tied_unembedding_is_counted_once_as_a_matmul():
    gpt2 = small_model("gpt2")
    counts = flops.count_params(gpt2)
    assert counts["embedding"] == (1024 + 1024) * 128  # token table + learned position table
    tied = flops.flops_per_token(gpt2, 0)
    assert tied == 6 * (counts["non_embedding"] + 128 * 1024)
    untied = gpt2.copy_and_resolve_references()
    untied.tie_embeddings = False
    untied_counts = flops.count_params(untied)
    assert untied_counts["non_embedding"] == counts["non_embedding"] + 128 * 1024
    assert flops.flops_per_token(untied, 0) == tied  # same matmuls, same FLOPs


def xla_forward_flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))))
    forward = lambda state, tokens: nnx.merge(graphdef, state)(tokens)
    batch = 2
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    cost = jax.jit(forward).lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / (batch * seq_len)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_forward_flops_agree_with_xla(kind, monkeypatch):
    """XLA counts every matmul (2 FLOPs per multiply-add) plus elementwise work, and computes the
    full T x T score matrix before masking. So per token, XLA = a + b·T with

      a ~ 2·N_matmul (our seq_len=0 figure), plus elementwise work of O(D + F) per layer
          against the O(D·(D + F)) matmuls: under 1% at D=128, hence 3%;
      b ~ 4·layers·d_attn = twice our causal slope, plus softmax/mask/scale at a few FLOPs per
          score against 4·H = 256 matmul FLOPs per score: about 2.5%, hence 5%.

    Dropping the tied unembedding or counting the untied one twice moves `a` by ~20%; counting
    full instead of causal attention halves the slope ratio; so a wrong formula fails.
    """
    m = small_model(kind)
    # all T x T scores, as the formula's reasoning assumes (the causal split: the test below)
    monkeypatch.setattr(attention, "CAUSAL_SPLIT_MIN_LEN", 10**9)
    t1, t2 = 128, 1024
    x1, x2 = xla_forward_flops_per_token(m, t1), xla_forward_flops_per_token(m, t2)
    f1, f2 = flops.forward_flops_per_token(m, t1), flops.forward_flops_per_token(m, t2)
    xla_slope, our_slope = (x2 - x1) / (t2 - t1), (f2 - f1) / (t2 - t1)
    assert our_slope == 2 * m.num_layers * m.num_heads * m.head_dim
    assert 1.0 <= xla_slope / (2 * our_slope) < 1.05
    xla_intercept = x1 - xla_slope * t1
    assert 1.0 <= xla_intercept / flops.forward_flops_per_token(m, 0) < 1.03
    # And XLA's total lies between the causal count and the full (non-causal) count, + 3%.
    for t, x, f in ((t1, x1, f1), (t2, x2, f2)):
        full = f + 2 * m.num_layers * t * m.num_heads * m.head_dim
        assert f < x < 1.03 * full


def test_causal_split_skips_a_quarter_of_the_scores(monkeypatch):
    """xla_attention's two query halves: XLA counts 3/4 of the full score and value matmuls
    (plus the same elementwise work per score), the rest of the forward unchanged."""
    m = small_model("llama")
    T = 1024
    split = xla_forward_flops_per_token(m, T)
    monkeypatch.setattr(attention, "CAUSAL_SPLIT_MIN_LEN", 10**9)
    full = xla_forward_flops_per_token(m, T)
    full_scores = 2 * 2 * m.num_layers * T * m.num_heads * m.head_dim  # QK and PV, per token
    assert 0.23 < (full - split) / full_scores < 0.27


def test_report_shows_every_figure():
    cfg = load("gpt2", "small")
    r = flops.report_dict(cfg)
    assert r["params"] == 124_439_808
    assert r["flops_per_step"] == r["flops_per_token"] * 1024 * 512
    assert r["param_and_adamw_bytes"] == 3 * 4 * 124_439_808  # float32 params, mu, nu
    text = flops.report(cfg)
    for figure in ("124,439,808", "39,383,808", "85,056,000", "524,288"):
        assert figure in text
