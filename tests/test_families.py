"""Qwen3, Mistral and Gemma: presets with the published parameter counts, and logits equal to
transformers' random tiny models of each family: imported (unrolled and under scan_layers) and
exported."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the [hf] extra; CI installs it
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lmjax import config, flops  # noqa: E402
from lmjax import model as model_lib  # noqa: E402
from lmjax.interop import hf  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 12))

# Published totals: Qwen3-0.6B's and Gemma-2B's (tied) and Mistral-7B-v0.1's model cards;
# the other Qwen3 sizes as KerasHub's presets of the released weights give them.
PUBLISHED = {("qwen3", "0.6b"): 596_049_920, ("mistral", "7b"): 7_241_732_096,
             ("gemma", "2b"): 2_506_172_416, ("qwen3", "1.7b"): 1_720_574_976,
             ("qwen3", "4b"): 4_022_468_096, ("qwen3", "8b"): 8_190_735_360,
             ("qwen3", "14b"): 14_768_307_200, ("qwen3", "32b"): 32_762_123_264}


@pytest.mark.parametrize(("file", "arg"), PUBLISHED)
def test_presets_match_published_param_counts(file, arg):
    counts = flops.count_params(config.load(f"configs/{file}.py:{arg}").model)
    assert counts["total"] == PUBLISHED[file, arg]


@pytest.mark.parametrize("file", ["qwen3", "mistral", "gemma"])
def test_presets_override_at_most_20_base_keys_and_export(file):
    def flat(c) -> dict:
        return {f"{g}.{k}": v for g, sub in c.to_dict().items() if isinstance(sub, dict)
                for k, v in sub.items()}

    base = flat(config.load("configs/base.py"))
    for arg in ("tiny", next(a for f, a in PUBLISHED if f == file)):
        cfg = config.load(f"configs/{file}.py:{arg}")
        preset = flat(cfg)
        assert preset.keys() == base.keys()  # presets override, never invent keys
        assert sum(base[k] != preset[k] for k in base) <= 20
        assert hf.family(cfg.model) == file


def build(kind):
    """A random tiny transformers model; every weight perturbed, so norm weights (ones, or
    Gemma's zeros) are not trivially their init."""
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "qwen3":  # GQA, tied, RoPE base 1e6, head_dim != hidden / heads
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    elif kind == "mistral":  # a window of 4 over 12 tokens: the window's edge is exercised
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **common, num_key_value_heads=2, sliding_window=4, attn_implementation="eager"))
    else:  # MQA, 16-wide heads, tied, embeddings x sqrt(32)
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
            **common, num_key_value_heads=1, head_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def torch_logits(model, tokens):
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.numpy()


def scanned_twin(model, cfg):
    """The same weights in a scan_layers=True model (flops.count_params traces that layout)."""
    cfg = copy.deepcopy(cfg.model)
    cfg.scan_layers = True
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, model_lib.stack_layers(nnx.to_pure_dict(nnx.state(model))))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("kind", ["qwen3", "mistral", "gemma"])
def test_logits_match_transformers_both_ways(kind, tmp_path):
    torch_model = build(kind)
    torch_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch_model, TOKENS)
    model, cfg = hf.from_pretrained(str(tmp_path / "hf"))
    m = cfg.model
    assert (m.qk_norm, m.attention_window, m.mlp, m.embed_scale, m.tie_embeddings) == {
        "qwen3": (True, 0, "swiglu", False, True), "mistral": (False, 4, "swiglu", False, False),
        "gemma": (False, 0, "geglu", True, True)}[kind]
    np.testing.assert_allclose(model(jnp.asarray(TOKENS)), want, atol=1e-4)
    np.testing.assert_allclose(scanned_twin(model, cfg)(jnp.asarray(TOKENS)), want, atol=1e-4)
    hf.save_pretrained(model, cfg, str(tmp_path / "out"))
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(auto) is type(torch_model)
    np.testing.assert_allclose(torch_logits(auto, TOKENS), want, atol=1e-4)


def test_mistral_window_is_hugging_faces_sliding_window(tmp_path):
    """A query at i sees i - window < j <= i in both: one key more or less changes the logits."""
    torch_model = build("mistral")
    torch_model.save_pretrained(str(tmp_path))
    want = torch_logits(torch_model, TOKENS)
    model, cfg = hf.from_pretrained(str(tmp_path))
    for window, same in ((3, False), (4, True), (5, False), (0, False)):
        cfg.model.attention_window = window  # the model reads its config at call time
        assert np.allclose(model(jnp.asarray(TOKENS)), want, atol=1e-4) == same, window


def test_gemma_norm_offset_is_converted_at_the_boundary(tmp_path):
    """Gemma stores w for a (1 + w) scale; lmjax holds 1 + w and writes w back."""
    torch_model = build("gemma")
    torch_model.save_pretrained(str(tmp_path))
    model, _ = hf.from_pretrained(str(tmp_path))
    w = torch_model.model.layers[1].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(model.blocks[1].attn_norm.scale[...], 1 + w, rtol=1e-6)
