"""Hugging Face checkpoints (GPT-2, LLaMA, Mistral, Qwen3, Gemma; Mixtral and Qwen3-MoE in
interop/hf_moe.py) to lmjax and back, via safetensors.

    model, cfg = from_pretrained("path/to/hf_dir")      # config.json + *.safetensors
    lmjax convert --from_hf=HF_DIR --workdir=OUT         # an lmjax workdir: train, eval, sample
    lmjax convert --to_hf --workdir=DIR --out=HF_DIR     # loadable by transformers

Tensors are read with the `safetensors` package as numpy arrays: no torch and no pickle at run
time (a pytorch_model.bin is refused, not unpickled); interop/files.py reads and writes the
files, local or gs://. One table per family maps each lmjax parameter to its Hugging Face
tensor with a function each way (interop/rules.py), so import and export cannot drift apart.
Layout facts the table encodes:

- torch `nn.Linear` stores [out, in]; lmjax kernels are [in, out] with heads split out
  (q: [D, N, H], o: [N, H, D]). GPT-2's `Conv1D` is already [in, out], and fuses q, k, v into
  one `c_attn` of [D, 3D].
- RoPE: Hugging Face LLaMA rotates dimension i with i + H/2 (`rotate_half`), the half-split
  layout of `lmjax.model.rope`, so its q/k rows load unchanged. Meta's original checkpoints
  (and GPT-J-style code) rotate adjacent pairs (2i, 2i+1); `rope_layout="interleaved"`
  permutes such q/k rows on import (`interleaved_to_half_split`, the permutation
  transformers' convert_llama_weights_to_hf.py applies).
- Mistral, Qwen3 and Gemma are LLaMA's tensors under their own model_type, plus Qwen3's q_norm
  and k_norm. Gemma's RMSNorm multiplies by (1 + w): import adds 1 to each norm weight, export
  subtracts it, so lmjax's one RMSNorm serves (the same function; Adam is blind to the shift and
  norms are never decayed, so training is unchanged too).
"""

import jax
import ml_collections
import numpy as np
from flax import nnx

from lmjax import checkpoint, inference, moe, optim, paths
from lmjax import config as config_lib
from lmjax import model as model_lib
from lmjax.interop import files, hf_moe
from lmjax.interop.rules import Rule, conv1d, same, torch_linear
from lmjax.model import Transformer

FAMILIES = ("gpt2", "llama", "mistral", "qwen3", "gemma", *hf_moe.FAMILIES)
# model_type -> the transformers class save_pretrained's config.json names
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma": "GemmaForCausalLM", **hf_moe.ARCHITECTURES}
# Tensors a checkpoint may hold that are not parameters: GPT-2's causal-mask buffers, RoPE tables.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _gpt2_rules(m: ml_collections.ConfigDict) -> list[Rule]:
    D, N, H, F = m.d_model, m.num_heads, m.head_dim, m.mlp_dim
    rules = [same(("embed", "embedding"), "transformer.wte.weight"),
             same(("pos_embed", "embedding"), "transformer.wpe.weight"),
             same(("final_norm", "scale"), "transformer.ln_f.weight"),
             same(("final_norm", "bias"), "transformer.ln_f.bias")]
    for i in range(m.num_layers):
        b, h = ("blocks", i), f"transformer.h.{i}."
        for j, name in enumerate("qkv"):  # c_attn = [q | k | v] along its output axis
            rules += [
                Rule(b + ("attn", name, "kernel"), h + "attn.c_attn.weight",
                     lambda w, j=j: w[:, j * D:(j + 1) * D].reshape(D, N, H),
                     lambda k: k.reshape(D, N * H)),
                Rule(b + ("attn", name, "bias"), h + "attn.c_attn.bias",
                     lambda w, j=j: w[j * D:(j + 1) * D].reshape(N, H),
                     lambda k: k.reshape(N * H))]
        rules += [
            same(b + ("attn_norm", "scale"), h + "ln_1.weight"),
            same(b + ("attn_norm", "bias"), h + "ln_1.bias"),
            conv1d(b + ("attn", "o", "kernel"), h + "attn.c_proj.weight", (N, H, D), n_in=2),
            same(b + ("attn", "o", "bias"), h + "attn.c_proj.bias"),
            same(b + ("mlp_norm", "scale"), h + "ln_2.weight"),
            same(b + ("mlp_norm", "bias"), h + "ln_2.bias"),
            conv1d(b + ("mlp", "up", "kernel"), h + "mlp.c_fc.weight", (D, F)),
            same(b + ("mlp", "up", "bias"), h + "mlp.c_fc.bias"),
            conv1d(b + ("mlp", "down", "kernel"), h + "mlp.c_proj.weight", (F, D)),
            same(b + ("mlp", "down", "bias"), h + "mlp.c_proj.bias")]
    return rules


def _gemma_norm(path, hf):
    """Gemma's RMSNorm scales by (1 + w), lmjax's by w."""
    return Rule(path, hf, lambda w: w + 1, lambda w: w - 1)


def _llama_rules(m: ml_collections.ConfigDict, kind: str = "llama") -> list[Rule]:
    """LLaMA and the families built on its tensor names (Mistral, Qwen3, Gemma, the MoEs)."""
    D, N, K, H, F = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    norm = _gemma_norm if kind == "gemma" else same
    rules = [same(("embed", "embedding"), "model.embed_tokens.weight"),
             norm(("final_norm", "scale"), "model.norm.weight")]
    if not m.tie_embeddings:
        rules.append(torch_linear(("unembed", "kernel"), "lm_head.weight", (D, m.vocab_size)))
    for i in range(m.num_layers):
        b, h = ("blocks", i), f"model.layers.{i}."
        rules += [
            norm(b + ("attn_norm", "scale"), h + "input_layernorm.weight"),
            torch_linear(b + ("attn", "q", "kernel"), h + "self_attn.q_proj.weight", (D, N, H)),
            torch_linear(b + ("attn", "k", "kernel"), h + "self_attn.k_proj.weight", (D, K, H)),
            torch_linear(b + ("attn", "v", "kernel"), h + "self_attn.v_proj.weight", (D, K, H)),
            torch_linear(b + ("attn", "o", "kernel"), h + "self_attn.o_proj.weight", (N, H, D),
                         n_in=2),
            norm(b + ("mlp_norm", "scale"), h + "post_attention_layernorm.weight")]
        if moe.is_moe_layer(m, i):
            rules += hf_moe.rules(m, b, h, kind)
        else:
            rules += [
                torch_linear(b + ("mlp", "gate", "kernel"), h + "mlp.gate_proj.weight", (D, F)),
                torch_linear(b + ("mlp", "up", "kernel"), h + "mlp.up_proj.weight", (D, F)),
                torch_linear(b + ("mlp", "down", "kernel"), h + "mlp.down_proj.weight", (F, D))]
        if m.qk_norm:  # Qwen3: RMSNorm over head_dim on queries and keys, before RoPE
            rules += [same(b + ("attn", "q_norm", "scale"), h + "self_attn.q_norm.weight"),
                      same(b + ("attn", "k_norm", "scale"), h + "self_attn.k_norm.weight")]
    return rules


def _rules(kind: str, m: ml_collections.ConfigDict) -> list[Rule]:
    return _gpt2_rules(m) if kind == "gpt2" else _llama_rules(m, kind)


def interleaved_to_half_split(w: np.ndarray, num_heads: int) -> np.ndarray:
    """q/k projection rows [num_heads * H, D] from the interleaved RoPE layout (pairs 2i, 2i+1)
    to the half-split one (pairs i, i + H/2): per head, even rows first, then odd rows."""
    rows, d = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, d).swapaxes(1, 2).reshape(rows, d)


def half_split_to_interleaved(w: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of interleaved_to_half_split."""
    rows, d = w.shape
    return w.reshape(num_heads, 2, rows // num_heads // 2, d).swapaxes(1, 2).reshape(rows, d)


# ------------------------------------------------------------------------------ configs


def _require(hf: dict, key: str, allowed, what: str) -> None:
    if hf.get(key) not in allowed:
        raise ValueError(f"config.json has {key}={hf.get(key)!r}; lmjax's {what} needs one of "
                         f"{list(allowed)}.")


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """configs/base.py with the model keys of a config.json of one of FAMILIES (float32)."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"config.json has model_type={kind!r} "
                         f"(architectures={hf.get('architectures')}); lmjax imports "
                         f"{' and '.join(FAMILIES)} checkpoints.")
    cfg = config_lib.load(config_lib.BASE)
    m = cfg.model
    try:
        if kind == "gpt2":
            _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "GPT-2 MLP")
            _require(hf, "scale_attn_by_inverse_layer_idx", (False, None), "GPT-2 attention")
            m.update(vocab_size=hf["vocab_size"], d_model=hf["n_embd"],
                     num_layers=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
                     head_dim=hf["n_embd"] // hf["n_head"],
                     mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"], mlp="gelu", norm="layer",
                     norm_eps=hf["layer_norm_epsilon"], position="learned",
                     max_len=hf["n_positions"], use_bias=True, tie_embeddings=True)
        else:
            gemma = kind == "gemma"
            if gemma:  # "gelu" is the legacy name of the same tanh approximation (transformers)
                _require(hf, "hidden_act", ("gelu_pytorch_tanh", "gelu"), "Gemma MLP (GeGLU)")
            else:
                _require(hf, "hidden_act", ("silu",), f"{kind} MLP (SwiGLU)")
            _require(hf, "use_sliding_window", (False, None), "Qwen3 (full attention)")
            _require(hf, "attention_bias", (False, None), "LLaMA attention")
            _require(hf, "mlp_bias", (False, None), "LLaMA MLP")
            rope = hf.get("rope_parameters") or {}  # transformers >= 5; older: top-level keys
            rope_type = rope.get("rope_type") or (hf.get("rope_scaling") or {}).get("rope_type")
            if rope_type not in (None, "default") or hf.get("rope_scaling"):
                raise ValueError(f"config.json asks for RoPE scaling ({rope_type!r}); lmjax "
                                 "implements plain RoPE only.")
            heads = hf["num_attention_heads"]
            m.update(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                     num_layers=hf["num_hidden_layers"], num_heads=heads,
                     num_kv_heads=hf.get("num_key_value_heads") or heads,
                     head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                     mlp_dim=hf["intermediate_size"], mlp="geglu" if gemma else "swiglu",
                     norm="rms", embed_scale=gemma, qk_norm=kind.startswith("qwen3"),
                     attention_window=(hf.get("sliding_window") or 0)
                     if kind in ("mistral", "mixtral") else 0,
                     norm_eps=hf["rms_norm_eps"], position="rope",
                     rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 1e4),
                     max_len=hf["max_position_embeddings"], use_bias=False,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)))
            if kind in hf_moe.FAMILIES:
                hf_moe.config_from_hf(hf, m)
    except KeyError as e:
        raise KeyError(f"config.json of a {kind} checkpoint lacks the key {e.args[0]!r}.") \
            from None
    except (TypeError, ZeroDivisionError) as e:  # e.g. "n_head": "12", or 0 heads
        raise ValueError(f"config.json of a {kind} checkpoint has a value of the wrong type or "
                         f"range ({e}).") from None
    m.update(dtype="float32", param_dtype="float32", dropout=0.0)
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def _rope_family(m: ml_collections.ConfigDict) -> str:
    """The LLaMA-like family a RoPE model's switches point to; family() then checks the rest."""
    if m.mlp == "geglu" or m.embed_scale:
        return "gemma"
    if m.moe.num_experts:
        return "qwen3_moe" if m.qk_norm else "mixtral"
    return "qwen3" if m.qk_norm else "mistral" if m.attention_window else "llama"


def family(m: ml_collections.ConfigDict) -> str:
    """One of FAMILIES: which Hugging Face architecture holds this model exactly."""
    common = dict(position="rope", norm="rms", use_bias=False, rope_scaling="none",
                  parametrization="sp")  # not exported yet: refuse, not drop (μP's multipliers)
    plain = dict(mlp="swiglu", qk_norm=False, embed_scale=False)
    wants_of = {
        "gpt2": dict(position="learned", norm="layer", mlp="gelu", use_bias=True,
                     tie_embeddings=True, qk_norm=False, num_kv_heads=m.num_heads,
                     d_model=m.num_heads * m.head_dim, attention_window=0, embed_scale=False,
                     parametrization="sp"),
        "llama": dict(common, **plain, attention_window=0),
        "mistral": dict(common, **plain),
        "qwen3": dict(common, **{**plain, "qk_norm": True}, attention_window=0),
        "gemma": dict(common, mlp="geglu", embed_scale=True, qk_norm=False, attention_window=0)}
    wants_of.update(mixtral=wants_of["mistral"], qwen3_moe=wants_of["qwen3"])
    if m.position not in ("learned", "rope"):
        raise ValueError(f"model.position={m.position!r} has no Hugging Face equivalent: GPT-2 "
                         "uses 'learned', the others 'rope'.")
    name = "gpt2" if m.position == "learned" else _rope_family(m)
    for key, value in wants_of[name].items():
        if m[key] != value:
            raise ValueError(f"model.{key}={m[key]!r} has no {name} equivalent in Hugging Face "
                             f"({name} needs {value!r}).")
    if m.moe.num_experts:  # GPT-2 and Gemma have no MoE twin: their wants above refuse it
        hf_moe.check(m, name)
    return name


def config_to_hf(cfg: ml_collections.ConfigDict, eos_id: int | None = None) -> dict:
    m = cfg.model
    kind, special = family(m), {"bos_token_id": eos_id, "eos_token_id": eos_id}
    if kind == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": m.vocab_size, "n_embd": m.d_model, "n_layer": m.num_layers,
                "n_head": m.num_heads, "n_inner": m.mlp_dim, "n_positions": m.max_len,
                "n_ctx": m.max_len, "layer_norm_epsilon": m.norm_eps,
                "activation_function": "gelu_new", "scale_attn_weights": True,
                "tie_word_embeddings": True, "attn_pdrop": 0.0, "embd_pdrop": 0.0,
                "resid_pdrop": 0.0, "dtype": "float32", **special}
    own = {"mistral": {"sliding_window": m.attention_window},
           "qwen3": {"use_sliding_window": False, "sliding_window": None},
           "gemma": {"hidden_act": "gelu_pytorch_tanh"}}.get(kind, {})
    return {"architectures": [ARCHITECTURES[kind]], "model_type": kind,
            "vocab_size": m.vocab_size, "hidden_size": m.d_model,
            "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_len,
            "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": m.tie_embeddings, "dtype": "float32", **special, **own,
            **hf_moe.config_to_hf(m, kind)}


# ------------------------------------------------------------------------------ weights


def _normalise(tensors: dict, kind: str) -> dict:
    """Drop non-parameter buffers; give GPT-2's bare names (openai-community/gpt2's own files
    say `h.0...`, `wte.weight`) the `transformer.` prefix GPT2LMHeadModel writes."""
    out = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if kind == "gpt2":
        out = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
               for k, v in out.items()}
    return out


def from_pretrained(path: paths.PathLike, rope_layout: str = "half_split"
                    ) -> tuple[Transformer, ml_collections.ConfigDict]:
    """(model, config) from a Hugging Face directory (local or gs://): model(tokens_BL) ->
    logits_BLV.

    rope_layout: 'half_split' for Hugging Face LLaMA files; 'interleaved' for q/k rows in
    Meta's original layout (permuted on load).
    """
    if rope_layout not in ("half_split", "interleaved"):
        raise ValueError(f"rope_layout={rope_layout!r} must be 'half_split' or 'interleaved'.")
    hf = files.read_config(path)
    cfg = config_from_hf(hf)
    kind, m = hf["model_type"], cfg.model
    tensors = _normalise(files.read_tensors(path), kind)
    tensors = hf_moe.stack_experts(tensors, m, kind, path)
    if m.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a copy of the embedding, when written at all
    if kind == "llama" and rope_layout == "interleaved":
        for name in [k for k in tensors if k.endswith(("q_proj.weight", "k_proj.weight"))]:
            heads = m.num_heads if name.endswith("q_proj.weight") else m.num_kv_heads
            tensors[name] = interleaved_to_half_split(tensors[name], heads)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))))
    params = nnx.to_pure_dict(state)
    if m.scan_layers:  # the rules name layers one by one (blocks/<i>/...): fill that layout
        params = jax.eval_shape(model_lib.unstack_layers, params)
    used = set()
    for rule in _rules(kind, m):
        if rule.hf not in tensors:
            raise KeyError(f"{path} has no tensor {rule.hf!r}, which a {kind} checkpoint with "
                           f"this config.json needs.")
        value, expected = tensors[rule.hf], _get(params, rule.path)
        try:
            converted = rule.to_lmjax(value)
        except ValueError:
            converted = None
        if converted is None or converted.shape != expected.shape:
            raise ValueError(f"Tensor {rule.hf!r} has shape {tuple(value.shape)}, which does not "
                             f"fit {'/'.join(map(str, rule.path))} of shape {expected.shape} "
                             f"that config.json implies.")
        _set(params, rule.path, jax.numpy.asarray(converted, expected.dtype))
        used.add(rule.hf)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path} holds tensors a {kind} model with this config.json does not "
                         f"have, first {unused[0]!r} ({len(unused)} in all).")
    nnx.replace_by_pure_dict(state, model_lib.stack_layers(params) if m.scan_layers else params)
    return nnx.merge(graphdef, state), cfg


def save_pretrained(model: Transformer, cfg: ml_collections.ConfigDict, out: paths.PathLike,
                    tokenizer=None) -> None:
    """Write `out/config.json` and `out/model.safetensors` that transformers loads as
    one of ARCHITECTURES (and tokenizer.model, if the run had one)."""
    kind = family(cfg.model)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if cfg.model.scan_layers:
        params = model_lib.unstack_layers(params)
    parts: dict[str, list[np.ndarray]] = {}
    for rule in _rules(kind, cfg.model):
        value = np.asarray(_get(params, rule.path), np.float32)
        parts.setdefault(rule.hf, []).append(rule.to_hf(value))
    tensors = {name: np.ascontiguousarray(np.concatenate(p, axis=-1) if len(p) > 1 else p[0])
               for name, p in parts.items()}
    tensors = hf_moe.unstack_experts(tensors, cfg.model, kind)  # a dense model's: unchanged
    eos, spm = (None, None) if tokenizer is None else (tokenizer.eos_id, tokenizer.serialized())
    files.write(out, config_to_hf(cfg, eos), tensors, spm)


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    _get(tree, path[:-1])[path[-1]] = value


# ------------------------------------------------------------------------------ workdirs


def convert_from_hf(src: paths.PathLike, workdir: paths.PathLike) -> ml_collections.ConfigDict:
    """An lmjax workdir from a Hugging Face directory: config.json and a step-0 checkpoint
    with a fresh optimizer, so `lmjax train` finetunes from it and eval/sample read it. A
    SentencePiece tokenizer.model beside the weights (LLaMA) is copied and used as the run's.
    Either side may be a gs:// folder."""
    target = paths.resolve(workdir)
    if (target / "checkpoints").exists():
        raise ValueError(f"{workdir} already holds checkpoints; convert into a new workdir.")
    model, cfg = from_pretrained(src)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = paths.resolve(src) / "tokenizer.model"
    if tokenizer.is_file():
        (target / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        cfg.data.tokenizer = str(target / "tokenizer.model")
    optimizer = nnx.Optimizer(model, optim.make(cfg.optim, cfg.train.steps), wrt=nnx.Param)
    mngr = checkpoint.manager(str(target), cfg.checkpoint)
    checkpoint.save(mngr, 0, nnx.state((model, optimizer)), {"step": 0})
    mngr.wait_until_finished()
    mngr.close()
    config_lib.save(cfg, target / "config.json")
    return cfg


def convert_to_hf(workdir: paths.PathLike, out: paths.PathLike, step: int | None = None) -> None:
    model, cfg, tokenizer = inference.load(workdir, step)
    save_pretrained(model, cfg, out, tokenizer)
