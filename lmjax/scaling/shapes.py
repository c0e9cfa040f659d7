"""Model shapes for scaling studies: a shape for a target parameter count at a fixed aspect
ratio, and GPT-3's published shapes to compare against.

Kaplan et al. 2020 (fig. 5) found loss depends on N and only weakly on the shape at fixed N,
within aspect ratios d_model / n_layers of about 20-200; holding the ratio fixed across a sweep
removes shape as a confounder, so a size is one number.
"""

import functools
import os

import ml_collections
import numpy as np

from lmjax import config, flops

# (layers, d_model, heads, head_dim, mlp_dim): GPT-3 (Brown et al. 2020, table 2.1), the family
# Kaplan's laws were extrapolated to.
GPT3 = {
    "small": (12, 768, 12, 64, 3072), "medium": (24, 1024, 16, 64, 4096),
    "large": (24, 1536, 16, 96, 6144), "xl": (24, 2048, 24, 128, 8192),
    "2.7b": (32, 2560, 32, 80, 10240), "6.7b": (32, 4096, 32, 128, 16384),
    "13b": (40, 5140, 40, 128, 20560), "175b": (96, 12288, 96, 128, 49152),
}


def shape(d_model: int, aspect: int, head_dim: int, mlp_ratio: float) -> dict:
    """Model overrides for a width: layers = d_model / aspect, heads of head_dim."""
    if d_model % head_dim:
        raise ValueError(f"d_model={d_model} is not a multiple of head_dim={head_dim}.")
    heads = d_model // head_dim
    return {"d_model": d_model, "num_layers": max(1, round(d_model / aspect)),
            "num_heads": heads, "num_kv_heads": heads, "head_dim": head_dim,
            "mlp_dim": int(round(mlp_ratio * d_model))}


def moe_shape(mlp_dim: int, expansion: int, granularity: int, top_k: int = 1) -> dict:
    """Model overrides (`moe.*`) for one point of Krajewski et al. 2024's fine-grained MoE grid
    around a dense MLP of mlp_dim: `expansion` E experts of mlp_dim each at granularity 1, and
    granularity G = mlp_dim / expert_mlp_dim. G cuts every expert into G narrower ones and
    routes to G times as many, so total and active parameters stay those of G = 1 while G
    varies: sweep expansion x granularity (x size and tokens) and fit L(N, D, G) to the rows."""
    if mlp_dim % granularity:
        raise ValueError(f"Granularity {granularity} does not divide mlp_dim={mlp_dim}.")
    return {"moe.num_experts": expansion * granularity, "moe.top_k": top_k * granularity,
            "moe.expert_mlp_dim": mlp_dim // granularity}


def shape_for_params(target: float, model_cfg: ml_collections.ConfigDict, aspect: int = 32,
                     head_dim: int = 16, mlp_ratio: float = 4.0,
                     kind: str = "non_embedding") -> dict:
    """The shape (widths in steps of head_dim) whose `kind` parameter count ('non_embedding' or
    'total', counted exactly from model_cfg with the shape applied) is nearest `target` in log
    scale. Other model keys (vocab, mlp type, tying) come from model_cfg."""
    best, width = None, head_dim
    while True:
        candidate = shape(width, aspect, head_dim, mlp_ratio)
        cfg = model_cfg.copy_and_resolve_references()
        cfg.unlock()
        cfg.update(candidate)
        n = flops.count_params(cfg)[kind]
        error = abs(n / target - 1) if n >= target else abs(target / n - 1)
        if best is None or error < best[0]:
            best = (error, candidate, n)
        if n > 2 * target:
            return {**best[1], "params": best[2]}
        width += head_dim


@functools.cache
def gpt3_counts() -> dict[str, dict[str, int]]:
    """Parameter counts of GPT3's shapes, as configs/gpt2.py builds them (GPT-3 is GPT-2's
    architecture: vocabulary 50257, tied embeddings) with GPT-3's 2,048-token context."""
    base = config.load(os.path.join(config.configs_dir(), "gpt2.py") + ":small").model
    counts = {}
    for name, (layers, d_model, heads, head_dim, mlp_dim) in GPT3.items():
        model = base.copy_and_resolve_references()
        model.update(num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=heads,
                     head_dim=head_dim, mlp_dim=mlp_dim, max_len=2048)
        counts[name] = flops.count_params(model)
    return counts


def nearest_gpt3(n: float, kind: str = "non_embedding") -> tuple[str, int]:
    """(name, count) of the GPT-3 shape whose `kind` count ('total', 'non_embedding'; Kaplan's
    count is the non-embedding one for these tied models) is nearest n in log scale."""
    kind = "non_embedding" if kind == "kaplan" else kind
    name = min(GPT3, key=lambda k: abs(np.log(gpt3_counts()[k][kind] / n)))
    return name, gpt3_counts()[name][kind]
