"""The training losses: next-token cross-entropy, TiDAR's dual-mode loss, and the auxiliary losses
(MoE balance, z-loss, ...) that layers record during the forward.

This module sits above the model (it imports `transformer` and `diffusion`; neither imports it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxllm.model.diffusion import tidar_forward
from jaxllm.model.params import pop_aux_losses
from jaxllm.model.transformer import Transformer


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over all positions (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def lm_loss(model: Transformer, tokens: jax.Array, targets: jax.Array,
            router_noise: jax.Array | None = None) -> jax.Array:
    """The training loss: next-token cross-entropy, or TiDAR's (alpha * AR + diffusion) / (1 + alpha)
    when model.diffusion is on, plus every auxiliary loss (MoE balance, z-loss...) of the forward
    (recorded in training mode only). `router_noise`: see `Transformer` (not with diffusion)."""
    if model.cfg.diffusion.enabled:
        if router_noise is not None:
            raise ValueError("router_noise is not supported with model.diffusion")
        return tidar_losses(model, tokens, targets)[0] + pop_aux_losses(model)
    logits = model(tokens, router_noise=router_noise)
    return cross_entropy(logits, targets) + pop_aux_losses(model)


def tidar_losses(model, tokens: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(combined, AR, diffusion) losses: AR is next-token cross-entropy of the clean half on
    `targets`; diffusion is cross-entropy of each mask token on the clean token it stands for
    (unshifted labels, every token masked); combined = (alpha * AR + diffusion) / (1 + alpha)."""
    alpha = model.cfg.diffusion.alpha
    clean, masked = tidar_forward(model, tokens)
    ar, diffusion = cross_entropy(clean, targets), cross_entropy(masked, tokens)
    return (alpha * ar + diffusion) / (1 + alpha), ar, diffusion
