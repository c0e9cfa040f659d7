"""The mixture-of-experts half of lmjax/interop/hf.py: Mixtral and Qwen3-MoE config keys and
expert tensors.

Both store one torch [out, in] tensor per expert and weight (Mixtral:
`block_sparse_moe.experts.<e>.w1/w3/w2` = gate/up/down; Qwen3-MoE:
`mlp.experts.<e>.gate_proj/up_proj/down_proj`); lmjax holds each weight of a layer's experts as
one [E, in, out] array (lmjax/moe.py). Import stacks a layer's per-expert tensors into one under
a name of its own (`...experts.w1`: [E, out, in]) before hf.py's table maps it, and export splits
it again, so the table keeps one rule per lmjax parameter. (transformers 5 fuses the experts
into `gate_up_proj` in memory, but its save_pretrained writes the per-expert files, as on the
Hub.) The router `gate.weight` [E, D] is an nn.Linear like any other.

Routing: both take a float32 softmax over all experts, then the top_k, then renormalise them to
sum to 1 (Qwen3-MoE only when norm_topk_prob): lmjax's `model.moe.score='softmax'` exactly.
Qwen3-MoE's `decoder_sparse_step` is `model.moe.every_nth_layer` (layer i is MoE when
(i + 1) % step == 0 in both). Neither has shared experts or sigmoid scores, so a model with those
is not exported; Qwen3-MoE without norm_topk_prob and `mlp_only_layers` are refused on import.
"""

import ml_collections
import numpy as np

from lmjax import moe
from lmjax.interop.rules import Rule, torch_linear

FAMILIES = ("mixtral", "qwen3_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# family -> (the MoE block's module name, lmjax weight -> Hugging Face expert weight)
BLOCKS = {"mixtral": ("block_sparse_moe.", {"gate": "w1", "up": "w3", "down": "w2"}),
          "qwen3_moe": ("mlp.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})}


def config_from_hf(hf: dict, m: ml_collections.ConfigDict) -> None:
    """Set m.moe from a config.json of FAMILIES (hf.py sets the rest). router_aux_loss_coef is
    not carried either way: transformers' balance loss pools the layers and sums over the top_k
    choices, so its coefficient does not mean model.moe.aux_loss_weight."""
    kind = hf["model_type"]
    if kind == "mixtral":
        m.moe.update(num_experts=hf["num_local_experts"], expert_mlp_dim=hf["intermediate_size"],
                     every_nth_layer=1)
    else:
        if not hf.get("norm_topk_prob"):
            raise ValueError("config.json has norm_topk_prob=false; lmjax's router always "
                             "renormalises the top_k gates to sum to 1.")
        if hf.get("mlp_only_layers"):
            raise ValueError(f"config.json has mlp_only_layers={hf['mlp_only_layers']}; lmjax "
                             "places MoE layers by model.moe.every_nth_layer alone.")
        m.moe.update(num_experts=hf.get("num_experts") or hf["num_local_experts"],
                     expert_mlp_dim=hf["moe_intermediate_size"],
                     every_nth_layer=hf.get("decoder_sparse_step") or 1)
    m.moe.update(top_k=hf["num_experts_per_tok"], num_shared_experts=0, score="softmax",
                 dispatch="dropless")


def check(m: ml_collections.ConfigDict, kind: str) -> None:
    """Raise ValueError naming the first model.moe setting `kind` has no equivalent for."""
    wants = {"score": "softmax", "num_shared_experts": 0}
    if kind == "mixtral":
        wants["every_nth_layer"] = 1
    for key, value in wants.items():
        if m.moe[key] != value:
            raise ValueError(f"model.moe.{key}={m.moe[key]!r} has no {kind} equivalent in "
                             f"Hugging Face ({kind} needs {value!r}).")


def config_to_hf(m: ml_collections.ConfigDict, kind: str) -> dict:
    """The MoE keys of `kind`'s config.json (they override hf.py's LLaMA keys); {} if dense."""
    if kind not in FAMILIES:
        return {}
    e = m.moe
    common = {"num_local_experts": e.num_experts, "num_experts_per_tok": e.top_k,
              "output_router_logits": False}
    if kind == "mixtral":  # intermediate_size is the experts' width: every layer is MoE
        return {**common, "intermediate_size": e.expert_mlp_dim, "router_jitter_noise": 0.0,
                "sliding_window": m.attention_window or None}
    return {**common, "num_experts": e.num_experts, "moe_intermediate_size": e.expert_mlp_dim,
            "decoder_sparse_step": e.every_nth_layer, "norm_topk_prob": True,
            "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None}


def _stacked(prefix: str, kind: str, weight: str) -> str:
    return f"{prefix}{BLOCKS[kind][0]}experts.{BLOCKS[kind][1][weight]}"


def rules(m: ml_collections.ConfigDict, b: tuple, prefix: str, kind: str) -> list[Rule]:
    """The MoE block of layer `b`: its router, and its experts under their stacked names."""
    router = f"{prefix}{BLOCKS[kind][0]}gate.weight"
    return [torch_linear(b + ("mlp", "router"), router, (m.d_model, m.moe.num_experts)),
            *(Rule(b + ("mlp", w), _stacked(prefix, kind, w), _swap, _swap)
              for w in ("gate", "up", "down"))]


def _swap(w: np.ndarray) -> np.ndarray:
    """[E, out, in] <-> [E, in, out]: its own inverse."""
    return w.transpose(0, 2, 1)


def _expert_names(m: ml_collections.ConfigDict, kind: str):
    """(stacked name, [each expert's tensor name]) for every MoE layer and weight."""
    for i in range(m.num_layers):
        if moe.is_moe_layer(m, i):
            for weight in ("gate", "up", "down"):
                stacked = _stacked(f"model.layers.{i}.", kind, weight)
                head, tail = stacked.rsplit(".", 1)
                yield stacked, [f"{head}.{e}.{tail}.weight" for e in range(m.moe.num_experts)]


def stack_experts(tensors: dict, m: ml_collections.ConfigDict, kind: str, path) -> dict:
    """`tensors` with each layer's per-expert tensors stacked under their rules' names (a dense
    model's unchanged)."""
    out = dict(tensors)
    for stacked, names in _expert_names(m, kind):
        missing = [n for n in names if n not in out]
        if missing:
            raise KeyError(f"{path} has no tensor {missing[0]!r}, which a {kind} checkpoint with "
                           f"this config.json needs.")
        shapes = {out[n].shape for n in names}
        if len(shapes) > 1:
            raise ValueError(f"{path} holds experts of different shapes ({sorted(shapes)}) in "
                             f"{names[0]!r} and its siblings.")
        out[stacked] = np.stack([out.pop(n) for n in names])
    return out


def unstack_experts(tensors: dict, m: ml_collections.ConfigDict, kind: str) -> dict:
    """The inverse of stack_experts: one tensor per expert, as transformers writes them."""
    out = dict(tensors)
    for stacked, names in _expert_names(m, kind):
        out.update((n, np.ascontiguousarray(w)) for n, w in zip(names, out.pop(stacked),
                                                                   strict=True))
    return out
