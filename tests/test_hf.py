"""Hugging Face interop: logits equal transformers' for GPT-2 and LLaMA (GQA) in both
directions, RoPE layouts, bad checkpoints, and workdir conversion both ways."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")  # the [hf] extra; CI installs it
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lmjax import config, evaluate, inference, positions, train  # noqa: E402
from lmjax.interop import hf  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 12))


def build(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
            eos_token_id=0))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=kind == "llama_tied"))


def torch_logits(model, tokens):
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (saved directory, its logits on TOKENS)."""
    out = {}
    for kind in ("gpt2", "llama", "llama_tied"):
        model = build(kind)
        path = str(tmp_path_factory.mktemp(kind))
        model.save_pretrained(path)
        out[kind] = (path, torch_logits(model, TOKENS))
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_tied"])
def test_logits_match_transformers_both_ways(checkpoints, kind, tmp_path):
    path, want = checkpoints[kind]
    model, cfg = hf.from_pretrained(path)
    np.testing.assert_allclose(model(jnp.asarray(TOKENS)), want, atol=1e-4)
    assert cfg.model.num_kv_heads == (4 if kind == "gpt2" else 2)
    hf.save_pretrained(model, cfg, str(tmp_path))
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    np.testing.assert_allclose(torch_logits(auto, TOKENS), want, atol=1e-4)


def test_rope_layout_is_explicit(checkpoints, tmp_path):
    """The same weights with q/k rows in Meta's interleaved order load with
    rope_layout='interleaved' (and only then) to the same logits."""
    path, want = checkpoints["llama"]
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for name in tensors:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = 4 if name.endswith("q_proj.weight") else 2
            tensors[name] = hf.half_split_to_interleaved(tensors[name], heads)
            np.testing.assert_array_equal(hf.interleaved_to_half_split(tensors[name], heads),
                                          load_file(os.path.join(path, "model.safetensors"))[name])
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    model, _ = hf.from_pretrained(str(tmp_path), rope_layout="interleaved")
    np.testing.assert_allclose(model(jnp.asarray(TOKENS)), want, atol=1e-4)
    wrong, _ = hf.from_pretrained(str(tmp_path))
    assert np.abs(np.asarray(wrong(jnp.asarray(TOKENS))) - want).max() > 1e-3


def broken_copy(path, tmp_path, edit_config=None, edit_tensors=None):
    target = tmp_path / "broken"
    shutil.copytree(path, target)
    if edit_config:
        cfg = json.load(open(target / "config.json"))
        edit_config(cfg)
        json.dump(cfg, open(target / "config.json", "w"))
    if edit_tensors:
        tensors = load_file(target / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, target / "model.safetensors")
    return str(target)


def test_bad_checkpoints_name_the_cause(checkpoints, tmp_path):
    path, _ = checkpoints["llama"]
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face checkpoint: it has no "
                                                "config.json"):
        hf.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(FileNotFoundError, match=r"has no \*.safetensors file"):
        hf.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="model_type='bert'"):
        hf.from_pretrained(broken_copy(path, tmp_path / "a", lambda c: c.update(
            model_type="bert", architectures=["BertModel"])))
    with pytest.raises(ValueError, match="RoPE scaling"):
        hf.from_pretrained(broken_copy(path, tmp_path / "b", lambda c: c.update(
            rope_parameters={"rope_type": "llama3", "rope_theta": 1e4})))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape "
                                         r"\(32, 32\), which does not fit blocks/1/attn/k/kernel"):
        hf.from_pretrained(broken_copy(path, tmp_path / "c", edit_tensors=lambda t: t.update({
            "model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)})))
    with pytest.raises(KeyError, match="no tensor 'model.norm.weight'"):
        hf.from_pretrained(broken_copy(path, tmp_path / "d", edit_tensors=lambda t: t.pop(
            "model.norm.weight")))
    with pytest.raises(ValueError, match="first 'model.extra.weight'"):
        hf.from_pretrained(broken_copy(path, tmp_path / "e", edit_tensors=lambda t: t.update({
            "model.extra.weight": np.zeros(3, np.float32)})))


def test_unreadable_files_name_the_file_and_the_cause(checkpoints, tmp_path):
    """Random, truncated or lying safetensors files and a broken config.json: one ValueError
    naming the file, never safetensors' or json's own traceback."""
    path, _ = checkpoints["llama"]
    weights = open(os.path.join(path, "model.safetensors"), "rb").read()
    size = len(weights)
    lying = (size + 1).to_bytes(8, "little") + weights[8:]  # the header alone outgrows the file
    cases = [
        ("model.safetensors", np.random.default_rng(0).bytes(size),
         rf"is truncated or not a safetensors file: its header claims \d+ bytes, the file "
         rf"holds {size}\."),
        ("model.safetensors", b"", "its header claims 8 bytes, the file holds 0."),
        ("model.safetensors", lying, f"its header claims {size + 9} bytes, the file holds {size}."),
        ("model.safetensors", weights[:size // 2],
         rf"model.safetensors is truncated: its header claims {size} bytes, the file holds "
         rf"{size // 2}\."),
        ("model.safetensors", (8).to_bytes(8, "little") + b"not json" + weights[16:],
         "is not a safetensors file: its header is not a table of tensors."),
        ("config.json", open(os.path.join(path, "config.json"), "rb").read()[:40],
         r"config.json is not valid JSON \("),
        ("config.json", b"[1, 2]", "config.json holds a JSON list, not an object"),
        ("config.json", json.dumps({**json.load(open(os.path.join(path, "config.json"))),
                                    "num_attention_heads": "4"}).encode(),
         "config.json of a llama checkpoint has a value of the wrong type"),
    ]
    for i, (name, data, message) in enumerate(cases):
        broken = broken_copy(path, tmp_path / str(i))
        open(os.path.join(broken, name), "wb").write(data)
        with pytest.raises(ValueError, match=message):
            hf.from_pretrained(broken)


def test_export_refuses_models_without_an_hf_twin(checkpoints):
    _, cfg = hf.from_pretrained(checkpoints["llama"][0])
    cfg.model.update(qk_norm=True, attention_window=8)  # Qwen3's norms, Mistral's window
    with pytest.raises(ValueError, match="model.attention_window=8 has no qwen3 equivalent"):
        hf.family(cfg.model)
    cfg.model.position = "sinusoidal"
    with pytest.raises(ValueError, match="model.position='sinusoidal' has no Hugging Face"):
        hf.family(cfg.model)


@pytest.mark.slow
def test_workdir_to_hf_and_back(smoke_workdir, tmp_path):
    """A trained run exported is the same model to transformers; imported again, it evaluates
    to the same numbers as the original run."""
    hf.convert_to_hf(smoke_workdir, str(tmp_path / "hf"))
    model, _, _ = inference.load(smoke_workdir)
    tokens = np.random.default_rng(1).integers(0, 2048, (2, 16))
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    np.testing.assert_allclose(torch_logits(auto, tokens), model(jnp.asarray(tokens)),
                               atol=1e-4)
    hf.convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert os.path.isfile(tmp_path / "back" / "tokenizer.model")
    a = evaluate.evaluate(smoke_workdir, batches=1, devices=jax.devices()[:1])
    b = evaluate.evaluate(str(tmp_path / "back"), batches=1, devices=jax.devices()[:1],
                          overrides=("data.seq_len=32", "data.global_batch_size=8"))  # smoke's
    assert b["eval/loss"] == pytest.approx(a["eval/loss"], abs=1e-5) and b["step"] == 0
    with pytest.raises(ValueError, match="already holds checkpoints"):
        hf.convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))


@pytest.mark.slow
def test_train_finetunes_an_imported_checkpoint(tmp_path):
    """The first training loss of a converted workdir is the HF model's own loss on that
    batch: training continued from the imported weights, not from a fresh init."""
    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    source.save_pretrained(str(tmp_path / "hf"))
    workdir = str(tmp_path / "run")
    hf.convert_from_hf(str(tmp_path / "hf"), workdir)
    cfg = config.load(os.path.join(workdir, "config.json"), [
        "train.steps=2", "train.log_every=1", "optim.warmup_steps=1", "data.seq_len=32",
        "data.global_batch_size=8", "train.eval_every=0", "train.eval_batches=1"])
    train.run(cfg, workdir, force_resume=True)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    from lmjax.data import pipeline

    batch = next(pipeline.build(cfg).train)
    with torch.no_grad():
        logits = source.eval()(torch.tensor(batch["inputs"], dtype=torch.long)).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 2048),
                                                 torch.tensor(batch["targets"]).long().reshape(-1))
    assert rows[0]["step"] == 1
    assert rows[0]["train/loss"] == pytest.approx(float(want), abs=1e-4)


def test_bf16_rope_is_transformers_bit_for_bit():
    """In bfloat16 the rotation runs in bfloat16 with the sines and cosines cast first, as
    LLaMA's apply_rotary_pos_emb does: every element equal (rotating in float32 and rounding
    once matched 72% of them, off by up to 2^-6)."""
    from transformers.models.llama import modeling_llama as llama
    B, L, N, H = 2, 64, 4, 64
    q = np.random.default_rng(0).normal(size=(B, L, N, H)).astype(np.float32)
    cfg = transformers.LlamaConfig(hidden_size=N * H, num_attention_heads=N, head_dim=H,
                                   rope_theta=1e4, max_position_embeddings=L)
    positions_BL = torch.arange(L)[None].repeat(B, 1)
    q_BNLH = torch.tensor(q).to(torch.bfloat16).transpose(1, 2)
    cos, sin = llama.LlamaRotaryEmbedding(cfg)(q_BNLH, positions_BL)
    want, _ = llama.apply_rotary_pos_emb(q_BNLH, q_BNLH, cos, sin)
    got = positions.rope(jnp.asarray(q, jnp.bfloat16), jnp.asarray(positions_BL.numpy()), 1e4)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  want.transpose(1, 2).float().numpy())
