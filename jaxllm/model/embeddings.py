"""Token and learned position embeddings, and rotary position embeddings (RoPE)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model.params import param, project


class Embed(nnx.Module):
    """A [V, D] table; `attend` reuses it as a tied output projection."""

    def __init__(self, n: int, d: int, axes, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (n, d), axes, std=std, dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return project("BTD,VD->BTV", x.astype(self.dtype), self.weight[...].astype(self.dtype))


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape [B, T, H] for Hugging Face's half-split layout (float32)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, H] by the angles; pairs are (i, i + H/2), as in Hugging Face Llama."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    y = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return y.astype(x.dtype)
