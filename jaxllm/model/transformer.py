"""The decoder-only language model."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.attention import DecodeCache
from jaxllm.model.blocks import Block, LayerDrop, RecursiveBlock
from jaxllm.model.embeddings import Embed
from jaxllm.model.moe import init_expert_loads
from jaxllm.model.norms import make_norm
from jaxllm.model.params import AuxLoss, dtypes, param, pop_aux_losses


def _run_block(block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
               router_noise: jax.Array | None) -> jax.Array:
    return block(x, positions, mask, router_noise)


def _skip_block(block: Block, x: jax.Array, positions: jax.Array, mask, router_noise) -> tuple[jax.Array, jax.Array]:
    return x, jnp.zeros((), jnp.float32)


_run_block_remat = nnx.remat(_run_block)


def _run_block_and_pop_aux(run, block: Block, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
                           router_noise: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """LayerDrop's kept branch: the block's aux losses leave as a value, because both nnx.cond
    branches must leave the same state (a skipped layer records none; its expert loads, made
    before the cond, stay 0)."""
    x = run(block, x, positions, mask, router_noise)
    return x, pop_aux_losses(block)


class Transformer(nnx.Module):
    """tokens [B, T] (and optional positions [B, T]) -> float32 logits [B, T, V].

    `mask` [B or 1, T, T] (True: may attend) replaces the causal sliding-window pattern in every
    attention layer (TiDAR's training mask; see `attend`).

    `router_noise` [B, T, E] replaces the noisy router's random draw in every MoE layer in training,
    so that two implementations can be fed the same noise (parity tests; not with recursion).

    With a decode `cache` (`init_cache`; see DecodeCache) the same forward serves a prefill and
    every decode step: each layer writes the new tokens' keys and values (MLA: latents) at time
    steps cache.step.. and the call returns (logits, the updated cache). A prefill attends over the
    new tokens (mask [B, T, T], or causal); a step over the cache slots, so it needs the mask
    [B, T, S] of the slots (decode.py builds it from the slots' positions). `last_only`: the final
    norm and head on the last position only, logits [B, 1, V] (what a decode step samples from).

    The model is built in eval mode (no dropout, no LayerDrop); call `.train()` to train. Only a
    training forward records anything (MoE aux losses and expert loads): an eval forward mutates
    nothing.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = dtypes(cfg)
        kw = dict(std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), **kw)
        self.embed_positions = (Embed(cfg.max_seq_len, cfg.d_model, ("positions", "embed"), **kw)
                                if cfg.position.kind == "learned" else None)
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.layerdrop = LayerDrop(cfg.layerdrop, rngs=rngs)
        self.recursion = RecursiveBlock(cfg, rngs=rngs) if cfg.recursion.mode != "none" else None
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg, rngs=rngs)
        self.lm_head_bias = param(None, (cfg.vocab_size,), ("vocab",), "zeros") if cfg.lm_head_bias else None

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
                 *, cache: DecodeCache | None = None, router_noise: jax.Array | None = None,
                 last_only: bool = False) -> jax.Array | tuple[jax.Array, DecodeCache]:
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            if cache is not None:
                positions = positions + cache.step
        x = self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        x = self.dropout(x)
        if cache is not None:
            if self.recursion is not None:
                raise ValueError("a decode cache is not supported with model.recursion yet")
            if mask is None and not cache.prefill:
                raise ValueError("a decode step needs the mask [B, T, S] of the cache slots")
            layer_caches = []
            for i, block in enumerate(self.layers):
                x, layer_cache = block(x, positions, mask, router_noise, cache=cache.layer(i))
                layer_caches.append(layer_cache)
            cache = cache.advanced(layer_caches, tokens.shape[1])
        elif self.recursion is None:
            x = self._run_layers(self.layers, x, positions, mask, router_noise)
        else:  # prelude, the looped core, coda
            if router_noise is not None:
                raise ValueError("router_noise is not supported with model.recursion")
            r = cfg.recursion
            core_end = r.n_prelude + r.n_core
            e = self._run_layers(self.layers[:r.n_prelude], x, positions, mask)
            x, aux = self.recursion(self.layers[r.n_prelude:core_end], e, positions, mask)
            if not self.recursion.deterministic:  # training: the core's aux losses, for lm_loss
                self.sow(AuxLoss, "recursion_aux_losses", aux)
            x = self._run_layers(self.layers[core_end:], x, positions, mask)
        x = self.final_norm(x[:, -1:] if last_only else x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias[...].astype(logits.dtype)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, cache)

    def init_cache(self, batch: int, size: int) -> DecodeCache:
        """An empty decode cache of `size` slots per layer (each attention's `init_cache`, in the
        embedding's compute dtype), set for a prefill at time step 0."""
        dtype = self.embed_tokens.dtype
        return DecodeCache(tuple(block.attn.init_cache(batch, size, dtype) for block in self.layers),
                           jnp.int32(0), True)

    def _run_layers(self, layers, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
                    router_noise: jax.Array | None = None) -> jax.Array:
        """Each layer once, rematerialised when configured; LayerDrop in training."""
        run = _run_block_remat if self.cfg.remat else _run_block
        keep = self.layerdrop.keep(len(layers))
        for i, block in enumerate(layers):
            if keep is None:
                x = run(block, x, positions, mask, router_noise)
            else:
                init_expert_loads(block)  # both branches of the cond must leave the same state
                x, aux = nnx.cond(keep[i], functools.partial(_run_block_and_pop_aux, run), _skip_block,
                                  block, x, positions, mask, router_noise)
                self.sow(AuxLoss, "layerdrop_aux_losses", aux)
        return x


def abstract_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """The Transformer of `cfg` built by `nnx.eval_shape`: every variable a ShapeDtypeStruct, no
    random number drawn (for shapes, parameter counts, shardings, and loading weights into)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))


class LMHead(nnx.Module):
    """An untied output projection [D, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype, param_dtype = dtypes(cfg)
        self.weight = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                            dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,DV->BTV", x.astype(self.dtype), self.weight[...].astype(self.dtype))
