"""RoPE frequencies for context extension: run a model past the length it was trained at.

RoPE turns dimension pair d at angle p * theta_d, theta_d = base^(-2d/H). Past the trained
length, low-frequency pairs reach angles never seen in training. Two published remedies:

- 'linear', position interpolation (Chen et al. 2023, arXiv 2306.15595): every angle divided by
  s, so positions 0..sL map onto the trained range 0..L: theta_d / s.
- 'yarn' (Peng et al. 2023, arXiv 2309.00071): "NTK-by-parts". A pair that turns r(d) =
  L / (2 pi / theta_d) times over the trained length L keeps its frequency when r > beta (high
  frequencies carry local order, interpolating them hurts), is interpolated when r < alpha, and
  blends in between: h(theta_d) = (1 - gamma) theta_d / s + gamma theta_d. Queries and keys are
  also scaled by sqrt(1/t) = 0.1 ln(s) + 1, which sharpens the softmax that longer contexts
  flatten. The ramp gamma is linear in the dimension index between the (floored, ceiled) indices
  where r = beta and r = alpha, as in the authors' released code and in Hugging Face
  transformers (`_compute_yarn_parameters`), not linear in r as the paper's eq. 18 reads: the
  two agree at both ends, and checkpoints trained with YaRN used the code's.
"""

import math

import ml_collections
import numpy as np

from lmjax import config

SCALINGS = ("none", "linear", "yarn")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """model.rope_scaling and the keys of the scaling it names."""
    m = cfg.model
    config.check_choices(cfg, {"model.rope_scaling": SCALINGS})
    if m.rope_scaling == "none":
        return
    if m.position != "rope":
        raise ValueError(f"model.rope_scaling={m.rope_scaling!r} needs model.position='rope', "
                         f"not {m.position!r}.")
    if m.rope_scaling == "yarn" and m.rope_original_max_len < 1:
        raise ValueError("model.rope_scaling='yarn' needs model.rope_original_max_len, the "
                         "context the model was trained at.")
    if m.rope_scaling == "yarn" and not 0 < m.rope_yarn_alpha < m.rope_yarn_beta:
        raise ValueError(f"model.rope_yarn_alpha={m.rope_yarn_alpha} and rope_yarn_beta="
                         f"{m.rope_yarn_beta} must satisfy 0 < alpha < beta.")


def frequencies(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, float]:
    """(inv_freq [H/2] float32, attention factor) of the model config `cfg` (cfg.model)."""
    H, base, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor
    inv_freq_H2 = base ** (-np.arange(0, H, 2, dtype=np.float64) / H)
    if cfg.rope_scaling == "none":
        return inv_freq_H2.astype(np.float32), 1.0
    if cfg.rope_scaling == "linear":
        return (inv_freq_H2 / s).astype(np.float32), 1.0
    if cfg.rope_scaling != "yarn":
        raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r} is not one of {SCALINGS}.")

    def dim_turning(rotations: float) -> float:  # d at which r(d) = rotations, continuous
        return H * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(dim_turning(cfg.rope_yarn_beta)), 0)
    high = min(math.ceil(dim_turning(cfg.rope_yarn_alpha)), H - 1)
    ramp_H2 = np.clip((np.arange(H // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    gamma_H2 = 1.0 - ramp_H2  # 1: keep the frequency; 0: interpolate it
    inv_freq_H2 = (1 - gamma_H2) * inv_freq_H2 / s + gamma_H2 * inv_freq_H2
    return inv_freq_H2.astype(np.float32), attention_factor(s)


def attention_factor(s: float) -> float:
    """YaRN's sqrt(1/t) = 0.1 ln(s) + 1, applied to queries and keys alike (1 for s <= 1)."""
    return 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
