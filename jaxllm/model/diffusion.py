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
from jaxllm.model.attention import visible


def mask_token_id(cfg: ModelConfig) -> int:
    d = cfg.diffusion
    return cfg.vocab_size - 1 if d.mask_token_id is None else d.mask_token_id


def tidar_groups(s: int, block_size: int) -> jax.Array:
    """[2S] attention groups of the doubled sequence: 0 for the clean tokens, 1 + j // block_size
    for the mask copy of position j (see `jaxllm.model.attention.visible`)."""
    return jnp.concatenate([jnp.zeros((s,), jnp.int32), 1 + jnp.arange(s, dtype=jnp.int32) // block_size])


def tidar_inputs(tokens: jax.Array, mask_id: int) -> tuple[jax.Array, jax.Array]:
    """The doubled sequence [B, 2S] and its positions [B, 2S] for clean tokens [B, S]."""
    s = tokens.shape[1]
    doubled = jnp.concatenate([tokens, jnp.full_like(tokens, mask_id)], axis=1)
    positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(s), jnp.arange(s)]), doubled.shape)
    return doubled, positions


def tidar_mask(s: int, block_size: int, window: int | None = None) -> jax.Array:
    """[2S, 2S] booleans (True: query may attend key) for the doubled sequence of S clean tokens:
    the model's one attention rule (`visible`) on its positions and groups, that is:

    - A clean query sees clean keys causally and never a mask token.
    - A mask query at position j in block b = j // block_size sees the clean keys strictly before
      its block (k < b * block_size: k = b * block_size would be its own label) and every mask
      token of its own block (bidirectional), never another block.
    - A sliding window limits clean keys to positions p with j - p < window, as in plain training.
    """
    positions = jnp.concatenate([jnp.arange(s), jnp.arange(s)])[None]
    groups = tidar_groups(s, block_size)[None]
    return visible(positions, groups, positions, groups, window)[0]


def tidar_forward(model, tokens: jax.Array, head: bool = True) -> tuple[jax.Array, jax.Array]:
    """(clean-half logits [B, S, V], mask-half logits [B, S, V]) of one forward on the doubled
    sequence. The clean half equals a plain causal forward of `tokens`. `head=False`: the
    final-normed hidden states [B, S, D] of each half instead (see `Transformer`)."""
    s = tokens.shape[1]
    doubled, positions = tidar_inputs(tokens, mask_token_id(model.cfg))
    out = model(doubled, positions, groups=tidar_groups(s, model.cfg.diffusion.block_size)[None], head=head)
    return out[:, :s], out[:, s:]
