"""Where a token is: rotary embeddings (Su et al. 2021) and fixed sinusoids (Vaswani et al.
2017). A context-extended model brings its own rotary frequencies (rope_scaling.py)."""

import jax
import jax.numpy as jnp

Rotary = tuple[jax.Array, jax.Array]  # sin and cos of the rotary angles, [B, L, 1, H/2] each


def rope_sin_cos(positions_BL: jax.Array, head_dim: int, theta: float,
                 inv_freq_H2: jax.Array | None = None, scale: float = 1.0) -> Rotary:
    """The rotation angles' sines and cosines (half-split layout: dims i and i + H/2 form a
    pair). A context-extended model passes its own frequencies and scale (rope_scaling.py)."""
    if inv_freq_H2 is None:
        inv_freq_H2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BLH2 = positions_BL[..., None].astype(jnp.float32) * inv_freq_H2
    sin, cos = jnp.sin(angle_BLH2)[:, :, None, :], jnp.cos(angle_BLH2)[:, :, None, :]
    return sin * scale, cos * scale  # YaRN's temperature, on queries and keys alike


def rotate(x_BLNH: jax.Array, sin_BL1H2: jax.Array, cos_BL1H2: jax.Array) -> jax.Array:
    """Rotary embedding (Su et al. 2021) with precomputed angles (rope_sin_cos), in x's dtype:
    angles in float32, their sines and cosines cast to x's dtype before they multiply it, as
    Hugging Face's LLaMA and MaxText do (bit for bit, tests/test_hf.py). Rotating in float32
    kept f32 copies of q and k (LLaMA-2 7B on 2 x v5p-64: 57 MiB more peak per chip)."""
    sin, cos = sin_BL1H2.astype(x_BLNH.dtype), cos_BL1H2.astype(x_BLNH.dtype)
    x1, x2 = jnp.split(x_BLNH, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float,
         inv_freq_H2: jax.Array | None = None, scale: float = 1.0) -> jax.Array:
    """Rotary embedding of x at `positions_BL`: rotate() with rope_sin_cos()'s angles."""
    return rotate(x_BLNH, *rope_sin_cos(positions_BL, x_BLNH.shape[-1], theta, inv_freq_H2,
                                        scale))


def sinusoidal(positions_BL: jax.Array, d: int) -> jax.Array:
    """Fixed positions of Vaswani et al. 2017: sin on the first half of the width, cos after."""
    inv_freq = 10_000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = positions_BL[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
