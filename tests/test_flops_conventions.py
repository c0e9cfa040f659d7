"""The three FLOP conventions: hand counts for a tiny shape, Chinchilla's Table A4, budgets in
each convention, and the `tokens` / `flops` columns of every logged row."""

import json
import os

import pytest

from configs import base, smoke
from lmjax import flops, train, validate


def tiny_model():
    """V=64 D=16, 2 layers, 2 heads x 8 (MHA), GELU MLP F=32, RMSNorm, untied, no biases."""
    m = base.get_config().model
    m.update(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
             mlp="gelu", mlp_dim=32)
    return m


def test_tiny_shape_by_hand_in_every_convention():
    m, T = tiny_model(), 10
    # per block: q k v o 4·16·16 = 1024, MLP 2·16·32 = 1024, two norm scales 32 -> 2,080
    # non-embedding: 2 blocks 4,160 + final norm 16 + untied unembedding 16·64 = 1,024
    assert flops.count_params(m) == {"total": 6224, "embedding": 1024, "non_embedding": 5200,
                                     "active": 6224, "active_non_embedding": 5200}
    # project: 6·5,200 + 6·layers 2·T 10·d_attn 16 = 31,200 + 1,920
    assert flops.flops_per_token(m, T) == flops.flops_per_token(m, T, "project") == 33_120
    # kaplan: 6 x (5,200 - unembedding 1,024)
    assert flops.flops_per_token(m, T, "kaplan") == 6 * 4176 == 25_056
    # chinchilla, forward per token: embeddings 2·64·16 = 2,048; per layer QKV 2·16·48 = 1,536,
    # logits 2·10·16 = 320, softmax 3·2·10 = 60, A·V 320, output 2·16·16 = 512 -> 2,748 x 2;
    # dense 2 layers x 2·(2 matrices)·16·32 = 4,096; final logits 2·16·64 = 2,048
    assert flops.chinchilla_terms(m, T) == {"embeddings": 2048, "attention": 5496,
                                            "dense": 4096, "logits": 2048}
    assert flops.flops_per_token(m, T, "chinchilla") == 3 * 13_688 == 41_064


def test_kaplan_count_is_the_same_tied_or_untied():
    tied = tiny_model()
    tied.tie_embeddings = True
    assert flops.flops_per_token(tied, 10, "kaplan") == flops.flops_per_token(tiny_model(), 10,
                                                                              "kaplan")


def test_swiglu_and_gqa_change_the_chinchilla_terms_as_the_matrices_do():
    m = tiny_model()
    m.update(mlp="swiglu", num_kv_heads=1)
    terms = flops.chinchilla_terms(m, 10)
    assert terms["dense"] == 2 * 2 * 3 * 16 * 32  # gate, up, down
    assert terms["attention"] == 2 * (2 * 16 * (16 + 2 * 8) + 320 + 60 + 320 + 512)


# Hoffmann et al. 2022, Table A4: (layers, d_model, ffw_size, heads, kv_size, ratio Ours/6ND).
TABLE_A4 = {"73M": (10, 640, 2560, 10, 64, 1.03), "305M": (20, 1024, 4096, 16, 64, 1.10),
            "552M": (24, 1280, 5120, 10, 128, 1.08), "1.1B": (26, 1792, 7168, 14, 128, 1.04),
            "1.6B": (28, 2048, 8192, 16, 128, 1.03), "6.8B": (40, 3584, 14336, 28, 128, 0.99)}


@pytest.mark.parametrize("name", TABLE_A4)
def test_chinchilla_table_a4_ratios(name):
    """Every ratio of Table A4 to its two printed decimals, with seq_len 2,048 and vocab 32,000
    (Gopher's), N = their parameter count: blocks, a relative-position projection per layer
    (Transformer-XL, as in Gopher) and one V x D table. The table's FLOPs leave out Appendix F's
    embedding and logit terms: with them the 73M model's ratio would be 1.58, not 1.03."""
    layers, d, ffw, heads, kv, ratio = TABLE_A4[name]
    m = tiny_model()
    m.update(vocab_size=32_000, d_model=d, num_layers=layers, num_heads=heads,
             num_kv_heads=heads, head_dim=kv, mlp_dim=ffw)
    terms = flops.chinchilla_terms(m, 2048)
    n = layers * (4 * d * heads * kv + 2 * d * ffw) + layers * d * heads * kv + 32_000 * d
    assert round(3 * (terms["attention"] + terms["dense"]) / (6 * n), 2) == ratio
    if name == "73M":
        assert round(flops.flops_per_token(m, 2048, "chinchilla") / (6 * n), 2) == 1.58


@pytest.mark.parametrize("convention", flops.CONVENTIONS)
def test_flops_budget_counts_in_the_chosen_convention(convention):
    cfg = validate.load("configs/smoke.py", ["train.flops_budget=1e9",
                                           f"train.flops_convention={convention}"])
    per_step = flops.flops_per_token(cfg.model, 32, convention) * 8 * 32
    assert cfg.train.steps == round(1e9 / per_step)
    assert flops.report_dict(cfg)["flops_total"] == pytest.approx(1e9, rel=per_step / 2e9)


def test_unknown_convention_is_one_sentence_naming_the_key():
    cfg = validate.load("configs/smoke.py", ["train.flops_convention=palm"])
    with pytest.raises(ValueError, match=r"train.flops_convention='palm' is not one of"):
        validate.validate(cfg, 1)
    with pytest.raises(ValueError, match=r"train.flops_convention='palm' is not one of"):
        validate.load("configs/smoke.py", ["train.flops_convention=palm", "train.flops_budget=1e9"])


@pytest.mark.slow
def test_every_logged_row_has_tokens_and_flops_in_the_run_convention(tmp_path):
    cfg = smoke.get_config()
    cfg.train.update(steps=4, log_every=2, eval_every=4, eval_batches=1, flops_convention="kaplan")
    cfg.checkpoint.every, cfg.optim.warmup_steps = 4, 2
    train.run(cfg, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    per_token = flops.flops_per_token(cfg.model, 32, "kaplan")
    assert per_token == 6 * flops.kaplan_params(cfg.model, flops.count_params(cfg.model)[
        "non_embedding"])
    assert sorted({r["step"] for r in rows}) == [2, 4]
    for r in rows:
        assert r["tokens"] == r["step"] * 8 * 32
        assert r["flops"] == r["tokens"] * per_token
