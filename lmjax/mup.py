"""μP: hyperparameters tuned on a narrow model stay optimal on a wide (and, optionally, deep) one.

Maximal-update parametrization, Adam version (Yang et al. 2022, "Tensor Programs V", arXiv
2203.03466, Table 3, written relative to a base model as in its Table 8 and the `mup` package).
Base shapes (mup's set_base_shapes): the model's widths at the size it was tuned at, one per
axis a matrix's fan-in runs over, so each matrix gets its own fan-in multiplier

    m_D = d_model / mup_base_width        (q, k, v, up, gate, and the readout)
    m_A = num_heads*head_dim / mup_base_attn_dim         (o)
    m_F = mlp_dim / mup_base_mlp_dim                     (down)

| parameter (by module name, any layer layout) | init std               | multiplier  | Adam LR
|----------------------------------------------|------------------------|-------------|------------
| embed, pos_embed (input weights)             | init_std               | α_embed     | lr η_embed
| attn q, k, v; mlp up, gate (hidden)          | init_std / sqrt(m_D)   | 1           | lr η_hid/m_D
| attn o (hidden, residual branch)             | init_std/sqrt(m_A 2L)  | 1           | lr η_hid/m_A
| mlp down (hidden, residual branch)           | init_std/sqrt(m_F 2L)  | 1           | lr η_hid/m_F
| unembed (readout; the tied table too)        | init_std σ_out         | α_out / m_D | lr η_readout
| norm scales, biases                          | 1, 0                   | 1           | lr
| attention scores: q.k α_attn sqrt(H0) / H, not q.k / sqrt(H); H0 = mup_base_head_dim

α_embed, α_out, α_attn (mup_*_mult), σ_out (mup_readout_init_mult; 0 zero-initialises the
readout), η_* (mup_lr_embed, _hidden, _readout) and mup_zero_query (q starts at 0: attention
starts uniform) are the knobs μTransfer tunes at the base width (Tensor Programs V sec. 6,
App. D.2). At their defaults (1, no zero-init) and at the base shapes every row is standard
parametrization (SP), so a model tuned under SP at the base size is the μP base model as is.
The readout keeps a nonzero init and multiplies the logits by α_out/m_D (Table 8's form), so
its logits at init shrink like 1/sqrt(m_D): untuned, that (not the per-group LR balance) was
most of μP's gap to SP in a short run; with α_out tuned at the base width (8 there), μP beats
SP's best at 8x the width (experiments/mup_transfer_cpu).
Tied embeddings: the table is an input weight and the logits still get α_out/m_D (mup's
MuSharedReadout); σ_out must stay 1 there.

Base shapes are checked as mup's assert_hidden_size_inf does: a hidden matrix whose fan-in
differs from its base while its fan-out does not is a readout in disguise, which the hidden row
mis-scales; so d_model, heads x head_dim and mlp_dim must all differ from their bases or all
equal them (k and v's fan-out num_kv_heads*head_dim has no base and is not checked: with
num_kv_heads held fixed while d_model grows they are readout-like, and their init is then too
large by sqrt(m_D)).

Weight decay (model.mup_decay): 'independent', as mup's MuAdamW (its group weight_decay x
width_mult undoes the lr / width_mult), decays every matrix by lr η wd p per step at any width
and depth: the 1/m and depth factors scale Adam's update, not the decay. 'scaled' decays by the
parameter's whole μP learning rate (lr η wd p / m: torch AdamW with per-group LRs, and this
module before it had the choice). Not Wortsman et al. 2024's lr-free decay.

Not width-aware, by choice: Adam's ε and the global-norm clip. Under μP every gradient entry
shrinks like 1/width (the logits carry 1/m_D; measured at init on configs/smoke.py's model at
widths 32..256, base 32: q's gradient RMS 2.0e-5 -> 2.3e-6, the readout's and embeddings'
2.0e-3 -> 2.5e-4), so a fixed ε damps Adam's steps more at larger widths: keep optim.eps far
below the smallest gradient RMS of the widest model (1e-8 is, up to m of a few hundred), or
scale it per layer with 1/fan-in as Everett et al. 2024 ("Scaling exponents across
parameterizations and optimizers") do. The global gradient norm falls with width too (same
measurement: 0.75 -> 0.32 under μP, 0.75 -> 4.6 under SP; at init the readout and embeddings
dominate it, each ~1/sqrt(width)), so optim.clip_norm tuned at the base width clips less often
at a wider one; set it to 0 to rule it out of a transfer study.

Depth-μP (model.mup_base_depth = L0 > 0; Yang et al. 2023, "Tensor Programs VI", arXiv
2310.02244; Bordelon et al. 2023, arXiv 2309.16620): every residual branch is multiplied by
(L0/L)^α (α = mup_depth_alpha: 1/2 is Depth-μP, 1 is CompleteP, Dey et al. 2025), the residual
init uses L0 instead of L (so init is depth-free and the multiplier alone scales the branches),
and Adam's LR of every block parameter is multiplied by (L/L0)^(α-1), i.e. 1/sqrt(L/L0) at
α = 1/2 (the decay, under 'independent', stays lr η wd). Transformer blocks hold two layers per
branch, where Tensor Programs VI proves transfer only approximately. Under 'sp' none of this
runs: the model and optimizer are as before.
"""

import math

import jax
import ml_collections

from lmjax import config

HIDDEN = ("q", "k", "v", "o", "up", "gate", "down")  # modules whose kernel is a hidden matrix
READOUT = ("unembed",)
INPUT = ("embed", "pos_embed")
# The width a hidden matrix's fan-in runs over: d_model, heads x head_dim, or mlp_dim.
FAN_IN = {"q": "d_model", "k": "d_model", "v": "d_model", "up": "d_model", "gate": "d_model",
          "o": "attn", "down": "mlp"}
DECAYS = ("independent", "scaled")


def _on(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.parametrization == "mup"


def widths(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, int, str]]:
    """{fan-in axis: (width, base width, the base's key)}."""
    return {"d_model": (cfg.d_model, cfg.mup_base_width, "mup_base_width"),
            "attn": (cfg.num_heads * cfg.head_dim, cfg.mup_base_attn_dim, "mup_base_attn_dim"),
            "mlp": (cfg.mlp_dim, cfg.mup_base_mlp_dim, "mup_base_mlp_dim")}


def fan_in_mult(cfg: ml_collections.ConfigDict, module: str = "q") -> float:
    """m of `module`'s kernel (a hidden module, or 'unembed'): its fan-in over the base's; 1
    under SP, so every μP factor below is 1."""
    if not _on(cfg):
        return 1.0
    width, base, _ = widths(cfg)[FAN_IN.get(module, "d_model")]
    return width / base


def width_mult(cfg: ml_collections.ConfigDict) -> float:
    """m_D = d_model / base width under μP (the readout's fan-in multiplier); 1 under SP."""
    return fan_in_mult(cfg, "unembed")


def hidden_init_scale(cfg: ml_collections.ConfigDict, module: str = "q") -> float:
    """Factor on init_std of a hidden matrix: variance ∝ 1/fan_in."""
    return fan_in_mult(cfg, module) ** -0.5


def residual_divisor(cfg: ml_collections.ConfigDict) -> float:
    """GPT-2's residual scaling: the init of o and down / sqrt(2 L); under depth-μP the base
    depth's L0, as the branch multiplier alone scales branches with depth."""
    layers = cfg.mup_base_depth if _depth_on(cfg) else cfg.num_layers
    return math.sqrt(2 * layers)


def query_init_scale(cfg: ml_collections.ConfigDict) -> float:
    """0 under μP with mup_zero_query (every head starts attending uniformly), else 1."""
    return 0.0 if _on(cfg) and cfg.mup_zero_query else 1.0


def readout_std(cfg: ml_collections.ConfigDict) -> float:
    """Init std of the untied readout: init_std x σ_out under μP (0 = zero-init)."""
    return cfg.init_std * (cfg.mup_readout_init_mult if _on(cfg) else 1.0)


def query_multiplier(cfg: ml_collections.ConfigDict) -> float:
    """Queries x α_attn sqrt(H0 / H), so every attention kernel's q.k / sqrt(H) becomes
    α_attn q.k sqrt(H0) / H: under μP q and k grow correlated in training, so q.k grows like H."""
    return cfg.mup_attn_mult * (cfg.mup_base_head_dim / cfg.head_dim) ** 0.5


def output_multiplier(cfg: ml_collections.ConfigDict) -> float:
    """Logits x α_out / m_D: an O(1) readout update moves logits by O(1) at any width."""
    return cfg.mup_output_mult / width_mult(cfg)


def embed_multiplier(cfg: ml_collections.ConfigDict) -> float:
    """α_embed on the input layer's output (token plus position embeddings); 1 under SP."""
    return cfg.mup_embed_mult if _on(cfg) else 1.0


def _depth_on(cfg: ml_collections.ConfigDict) -> bool:
    return _on(cfg) and cfg.mup_base_depth > 0


def branch_multiplier(cfg: ml_collections.ConfigDict) -> float:
    """(L0 / L)^α on every residual branch under depth-μP; 1 otherwise."""
    if not _depth_on(cfg):
        return 1.0
    return (cfg.mup_base_depth / cfg.num_layers) ** cfg.mup_depth_alpha


def _depth_lr(cfg: ml_collections.ConfigDict) -> float:
    """(L / L0)^(α - 1) on Adam's LR of block parameters (1/sqrt(L/L0) at α = 1/2)."""
    if not _depth_on(cfg):
        return 1.0
    return (cfg.num_layers / cfg.mup_base_depth) ** (cfg.mup_depth_alpha - 1)


def _names(path) -> list[str]:
    """Module and parameter names of a state path, without layer indices or nnx's 'value'."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return [n for n in names if n != "value" and not n.lstrip("-").isdigit()]


def role(path) -> str:
    """'hidden' | 'readout' | 'input' | 'vector' for a parameter's path in the model state.

    By module and parameter name only, so unrolled (`blocks/3/attn/q/kernel`) and scanned
    (`blocks/attn/q/kernel`, a leading layers axis) models get the same table."""
    names = _names(path)
    module, leaf = (names[-2], names[-1]) if len(names) >= 2 else ("", names[-1])
    if leaf == "kernel" and module in HIDDEN:
        return "hidden"
    if leaf == "kernel" and module in READOUT:
        return "readout"
    if leaf == "embedding" and module in INPUT:
        return "input"
    return "vector"  # norm scales and biases


def label(path) -> str:
    """A leaf's learning-rate group: its role, hidden matrices split by fan-in axis
    ('hidden/d_model', 'hidden/attn', 'hidden/mlp'), and 'block_vector' for a block's norms
    and biases (depth-μP scales every block parameter's LR)."""
    kind = role(path)
    names = _names(path)
    if kind == "hidden":
        return f"hidden/{FAN_IN[names[-2]]}"
    if kind == "vector" and "blocks" in names:
        return "block_vector"
    return kind


def lr_labels(params) -> dict:
    """The label of every leaf of `params` (a label tree for optim.make)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: label(path), params)


def lr_scales(cfg: ml_collections.ConfigDict) -> dict[str, float] | None:
    """Per-label factor on the optimizer's update (before decay); None under SP, where the
    optimizer stays the plain chain and its state tree (so checkpoints) is unchanged."""
    if not _on(cfg):
        return None
    depth = _depth_lr(cfg)
    hidden = {f"hidden/{axis}": cfg.mup_lr_hidden * depth * base / width
              for axis, (width, base, _) in widths(cfg).items()}
    return {**hidden, "block_vector": depth, "vector": 1.0, "input": cfg.mup_lr_embed,
            "readout": cfg.mup_lr_readout}


def decay_scales(cfg: ml_collections.ConfigDict) -> dict[str, float] | None:
    """Per-label factor on decoupled weight decay (lr wd p): the group's η only under
    'independent' (MuAdamW: lr η wd per step at any width and depth), lr_scales under 'scaled'."""
    scales = lr_scales(cfg)
    if scales is None or cfg.mup_decay == "scaled":
        return scales
    return {**{k: cfg.mup_lr_hidden for k in scales if k.startswith("hidden/")},
            "block_vector": 1.0, "vector": 1.0, "input": cfg.mup_lr_embed,
            "readout": cfg.mup_lr_readout}


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError on a μP setting the table above cannot honour (model.*; ranges are in
    validate.RANGES). Nothing is checked under SP, which reads none of these keys."""
    config.check_choices(cfg, {"model.mup_decay": DECAYS})
    m = cfg.model
    if not _on(m):
        return
    grown = {axis: width != base for axis, (width, base, _) in widths(m).items()}
    if len(set(grown.values())) > 1:
        _, base, key = widths(m)[next(axis for axis, g in grown.items() if not g)]
        width, moved_base, moved_key = widths(m)[next(axis for axis, g in grown.items() if g)]
        raise ValueError(
            f"model.{key}={base} equals this model's width there while model.{moved_key}="
            f"{moved_base} differs from its {width}: under μP every hidden width must differ "
            f"from its base or none (a matrix whose fan-in grows while its fan-out does not is a "
            f"readout); set each model.mup_base_* to the base model's width (lmjax/mup.py).")
    if m.tie_embeddings and m.mup_readout_init_mult != 1:
        raise ValueError(f"model.mup_readout_init_mult={m.mup_readout_init_mult} needs an untied "
                         f"readout: with model.tie_embeddings the table is the embedding.")
