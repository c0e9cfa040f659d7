"""Next-token cross-entropy, weighted, with PaLM's optional z-loss.

Computed in float32 from float32 logits whatever the compute dtype: a bf16 log-sum-exp over a
large vocabulary loses the digits that distinguish a good model from a slightly worse one.
"""

import jax
import jax.numpy as jnp
import ml_collections


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array,
                  z_loss: float = 0.0, with_accuracy: bool = True
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over weighted target tokens, and the sums that let callers re-average exactly.

    z-loss (Chowdhery et al. 2022) adds z * log(Z)^2 per token, where Z is the softmax normaliser,
    to keep logits from drifting; it is part of the optimised loss but not of the reported one.
    Accuracy needs an argmax over the vocabulary, ~5% of a CPU train step: eval asks for it.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # A masked sum, not a gather: it fuses with the widening to f32 as logsumexp does, where
    # a gather's operand is a whole [B, L, V] f32 buffer (1B on v5p-8: 1.95 GiB of HBM a chip)
    vocab_V = jnp.arange(logits_BLV.shape[-1], dtype=targets_BL.dtype)
    target_logit_BL = jnp.where(vocab_V == targets_BL[..., None], logits_BLV, 0.0).sum(-1)
    nll_BL = log_z_BL - target_logit_BL
    weights_BL = weights_BL.astype(jnp.float32)
    num_tokens = jnp.maximum(weights_BL.sum(), 1.0)
    nll = (nll_BL * weights_BL).sum() / num_tokens
    z = (jnp.square(log_z_BL) * weights_BL).sum() / num_tokens
    aux = {
        "loss": nll,
        "log_z_squared": z,  # the z-loss term before its coefficient
        "num_tokens": weights_BL.sum(),
    }
    if with_accuracy:
        correct = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
        aux["accuracy"] = (correct * weights_BL).sum() / num_tokens
    return nll + z_loss * z, aux


def router_loss(stats: dict[str, jax.Array], moe_cfg: ml_collections.ConfigDict
                ) -> jax.Array | float:
    """The MoE router's part of the optimised loss (lmjax/moe.py's load-balancing and z losses,
    weighted by model.moe.*_weight); 0 for a dense model. Eval reports cross-entropy alone."""
    if not stats:
        return 0.0
    return (moe_cfg.aux_loss_weight * stats["moe_aux_loss"]
            + moe_cfg.z_loss_weight * stats["moe_z_loss"])
