"""Mixtral and Qwen3-MoE interop (lmjax/interop/hf_moe.py): logits equal transformers' random
tiny models imported (unrolled and under scan_layers), exported, and through a converted
workdir; router settings Hugging Face cannot hold are refused in one sentence."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the [hf] extra; CI installs it
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lmjax import config, flops  # noqa: E402
from lmjax.interop import hf  # noqa: E402
from tests.test_families import scanned_twin, torch_logits  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 12))


def build(kind):
    """A random tiny transformers model, every weight perturbed so routers are not near-ties."""
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)
    if kind == "mixtral":  # every layer MoE, 4 experts of 48
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, intermediate_size=48, num_local_experts=4))
    else:  # layer 0 dense (48 wide), layer 1 MoE of 8 experts of 16; q/k norms, tied
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
            decoder_sparse_step=2, norm_topk_prob=True, head_dim=16, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@nnx.jit
def logits(model, tokens):
    """One compilation rather than op-by-op dispatch: 3x faster on a busy CPU."""
    return model(tokens)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_logits_match_transformers_both_ways(kind, tmp_path):
    torch_model = build(kind)
    torch_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch_model, TOKENS)
    model, cfg = hf.from_pretrained(str(tmp_path / "hf"))
    e = cfg.model.moe
    assert (e.num_experts, e.top_k, e.expert_mlp_dim, e.every_nth_layer, e.score) == {
        "mixtral": (4, 2, 48, 1, "softmax"), "qwen3_moe": (8, 2, 16, 2, "softmax")}[kind]
    np.testing.assert_allclose(logits(model, jnp.asarray(TOKENS)), want, atol=1e-4)
    if kind == "mixtral":  # scan_layers needs every layer MoE
        np.testing.assert_allclose(logits(scanned_twin(model, cfg), jnp.asarray(TOKENS)), want,
                                   atol=1e-4)
    hf.save_pretrained(model, cfg, str(tmp_path / "out"))
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(auto) is type(torch_model)
    np.testing.assert_allclose(torch_logits(auto, TOKENS), want, atol=1e-4)


def test_converted_workdir_round_trips_to_the_same_logits(tmp_path):
    """`lmjax convert --from_hf` then `--to_hf`: the same model, through a checkpoint."""
    torch_model = build("mixtral")
    torch_model.save_pretrained(str(tmp_path / "hf"))
    hf.convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    hf.convert_to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    np.testing.assert_allclose(torch_logits(auto, TOKENS), torch_logits(torch_model, TOKENS),
                               atol=1e-4)


def test_moe_presets_export_and_qwen3_tiny_counts():
    cfg = config.load("configs/moe.py:qwen3_tiny")
    m = cfg.model
    D, V, F, E, K = m.d_model, m.vocab_size, m.moe.expert_mlp_dim, m.moe.num_experts, m.moe.top_k
    attention = D * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim + m.num_heads * m.head_dim * D
    per_layer = attention + 2 * m.head_dim + 2 * D + D * E  # q/k norms, two norms, router
    counts = flops.count_params(m)
    assert counts["total"] == 2 * V * D + D + m.num_layers * (per_layer + 3 * E * D * F)
    assert counts["active"] == 2 * V * D + D + m.num_layers * (per_layer + 3 * K * D * F)
    assert hf.family(m) == "qwen3_moe" and hf.config_to_hf(cfg)["num_experts"] == E
    for preset, kind in (("8x7b", "mixtral"), ("30b_a3b", "qwen3_moe")):
        assert hf.family(config.load(f"configs/moe.py:{preset}").model) == kind


@pytest.mark.parametrize(("override", "message"), [
    (dict(score="sigmoid"), r"model.moe.score='sigmoid' has no mixtral equivalent"),
    (dict(num_shared_experts=1), r"model.moe.num_shared_experts=1 has no mixtral equivalent"),
    (dict(every_nth_layer=2), r"model.moe.every_nth_layer=2 has no mixtral equivalent"),
])
def test_export_refuses_routers_hugging_face_cannot_hold(override, message):
    m = config.load("configs/moe.py:tiny").model
    m.moe.update(**override)
    with pytest.raises(ValueError, match=message):
        hf.family(m)


def test_import_refuses_qwen3_moe_without_renormalised_gates(tmp_path):
    torch_model = build("qwen3_moe")
    torch_model.config.norm_topk_prob = False
    torch_model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="norm_topk_prob=false; lmjax's router always"):
        hf.from_pretrained(str(tmp_path))
