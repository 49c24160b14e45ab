"""The pre-norm transformer block, with ReZero and LayerDrop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.attention import Attention
from jaxllm.model.mla import MultiHeadLatentAttention
from jaxllm.model.mlp import MLP
from jaxllm.model.moe import MoE
from jaxllm.model.norms import make_norm
from jaxllm.model.params import param


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    moe = cfg.moe
    return moe.n_routed_experts > 0 and layer >= moe.first_k_dense and (layer - moe.first_k_dense) % moe.moe_every == 0


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.attention.kind == "mla":
        return MultiHeadLatentAttention(cfg, rngs=rngs)
    return Attention(cfg, rngs=rngs)


def make_mlp(cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
    if is_moe_layer(cfg, layer):
        return MoE(cfg, rngs=rngs)
    return MLP(cfg, rngs=rngs)


class Block(nnx.Module):
    """x + f(norm(x)) for f in (attention, mlp).

    With ReZero the norms are gone and one learned scalar per layer, initialised to 0, scales both
    sublayers: x + alpha * f(x) (Bachlechner et al. 2020, as in the official `rztx.py`).
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = None if cfg.rezero else make_norm(cfg)
        self.attn = make_attention(cfg, rngs=rngs)
        self.mlp_norm = None if cfg.rezero else make_norm(cfg)
        self.mlp = make_mlp(cfg, layer, rngs=rngs)
        self.rezero_alpha = param(None, (), (), "zeros") if cfg.rezero else None
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True, rngs=rngs)

    def _residual(self, x: jax.Array, f_x: jax.Array) -> jax.Array:
        f_x = self.dropout(f_x)
        if self.rezero_alpha is not None:
            f_x = self.rezero_alpha[...].astype(f_x.dtype) * f_x
        return x + f_x

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = x if self.attn_norm is None else self.attn_norm(x)
        x = self._residual(x, self.attn(h, positions, mask))
        h = x if self.mlp_norm is None else self.mlp_norm(x)
        return self._residual(x, self.mlp(h))

    def cached(self, x: jax.Array, positions: jax.Array, cache, step: jax.Array, mask: jax.Array,
               prefill: bool):
        """The block with its attention reading and writing a decode cache (see Attention.cached);
        returns (x, the updated cache)."""
        h = x if self.attn_norm is None else self.attn_norm(x)
        a, cache = self.attn.cached(h, positions, cache, step, mask, prefill)
        x = self._residual(x, a)
        h = x if self.mlp_norm is None else self.mlp_norm(x)
        return self._residual(x, self.mlp(h)), cache


class LayerDrop(nnx.Module):
    """Draws, in training only, which layers run: each is skipped with probability `rate`
    (Fan et al. 2019; nothing is rescaled). In eval mode every layer runs."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.deterministic = True
        self.rngs = rngs["dropout"].fork()

    def keep(self, n_layer: int) -> jax.Array | None:
        """A [n_layer] boolean array, or None when every layer runs."""
        if self.deterministic or self.rate == 0.0:
            return None
        return jax.random.uniform(self.rngs(), (n_layer,)) >= self.rate
