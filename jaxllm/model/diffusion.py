"""TiDAR dual-mode training (papers.md §1.2): "think in diffusion, talk in autoregression".

Seed 000's `DiffusionHead` is, as in the paper, logic and no weights: one backbone and one LM
head read a doubled sequence

    tokens    [x_0 ... x_{S-1} | M ... M]      (M: the reserved mask token, every copy masked)
    positions [0   ...   S-1   | 0 ... S-1]    (a mask copy has its clean token's position)

under a structured attention mask; the loss (`jaxllm.model.losses.tidar_losses`) mixes next-token cross-entropy on the clean half
with unshifted cross-entropy on the masked half: (alpha * AR + diffusion) / (1 + alpha).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


def mask_token_id(cfg: ModelConfig) -> int:
    d = cfg.diffusion
    return cfg.vocab_size - 1 if d.mask_token_id is None else d.mask_token_id


def tidar_mask(s: int, block_size: int, window: int | None = None) -> jax.Array:
    """[2S, 2S] booleans (True: query may attend key) for the doubled sequence of S clean tokens.

    - A clean query sees clean keys causally and never a mask token.
    - A mask query at position j in block b = j // block_size sees the clean keys strictly before
      its block (k < b * block_size: k = b * block_size would be its own label) and every mask
      token of its own block (bidirectional), never another block.
    - A sliding window limits clean keys to positions p with j - p < window, as in plain training.
    """
    index = jnp.arange(2 * s)
    is_clean = index < s
    position = jnp.where(is_clean, index, index - s)
    block = position // block_size
    q_clean, k_clean = is_clean[:, None], is_clean[None, :]
    q_pos, k_pos = position[:, None], position[None, :]
    clean_to_clean = q_clean & k_clean & (k_pos <= q_pos)
    mask_to_clean = ~q_clean & k_clean & (k_pos < block[:, None] * block_size)
    mask_to_mask = ~q_clean & ~k_clean & (block[:, None] == block[None, :])
    allowed = clean_to_clean | mask_to_clean | mask_to_mask
    if window is not None:
        allowed &= ~k_clean | (q_pos - k_pos < window)
    return allowed


def tidar_inputs(tokens: jax.Array, mask_id: int) -> tuple[jax.Array, jax.Array]:
    """The doubled sequence [B, 2S] and its positions [B, 2S] for clean tokens [B, S]."""
    s = tokens.shape[1]
    doubled = jnp.concatenate([tokens, jnp.full_like(tokens, mask_id)], axis=1)
    positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(s), jnp.arange(s)]), doubled.shape)
    return doubled, positions


def tidar_forward(model, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(clean-half logits [B, S, V], mask-half logits [B, S, V]) of one forward on the doubled
    sequence. The clean half equals a plain causal forward of `tokens`."""
    cfg = model.cfg
    s = tokens.shape[1]
    doubled, positions = tidar_inputs(tokens, mask_token_id(cfg))
    mask = tidar_mask(s, cfg.diffusion.block_size, cfg.attention.window)
    logits = model(doubled, positions, mask[None])
    return logits[:, :s], logits[:, s:]
