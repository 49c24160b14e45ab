"""The decoder-only language model."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.attention import AttentionMask, DecodeCache, visible, write_cache
from jaxllm.model.blocks import Block, LayerDrop, RecursiveBlock
from jaxllm.model.embeddings import Embed
from jaxllm.model.moe import init_expert_loads
from jaxllm.model.norms import make_norm
from jaxllm.model.params import AuxLoss, apply_init_scheme, apply_lora, dtypes, param, pop_aux_losses, project


def _run_block(block: Block, x: jax.Array, positions: jax.Array, mask: AttentionMask,
               router_noise: jax.Array | None) -> jax.Array:
    return block(x, positions, mask, router_noise)


def _skip_block(block: Block, x: jax.Array, positions: jax.Array, mask, router_noise) -> tuple[jax.Array, jax.Array]:
    return x, jnp.zeros((), jnp.float32)


_run_block_remat = nnx.remat(_run_block)


def _run_block_and_pop_aux(run, block: Block, x: jax.Array, positions: jax.Array, mask: AttentionMask,
                           router_noise: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """LayerDrop's kept branch: the block's aux losses leave as a value, because both nnx.cond
    branches must leave the same state (a skipped layer records none; its expert loads, made
    before the cond, stay 0)."""
    x = run(block, x, positions, mask, router_noise)
    return x, pop_aux_losses(block)


def _scan_blocks(layers, x: jax.Array, positions: jax.Array, mask: AttentionMask, remat: bool) -> jax.Array:
    """The blocks applied in turn as one `lax.scan` over their states stacked inside the step (a copy
    of the layers' weights; the model keeps one module per layer, so checkpoints, converters and
    parity see the same layout with or without it): XLA compiles one block instead of n_layer.
    Only for blocks that record nothing and draw no randomness (config validation: no dropout,
    LayerDrop, MoE or recursion)."""
    graphdef, first = nnx.split(layers[0])
    states = [first] + [nnx.split(block)[1] for block in layers[1:]]
    if any(nnx.graphdef(block) != graphdef for block in layers[1:]):
        raise ValueError("model.scan_layers needs every layer to have the same structure")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def body(x, state):
        return nnx.merge(graphdef, state)(x, positions, mask, None), None

    x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, stacked)
    return x


class Transformer(nnx.Module):
    """tokens [B, T] (and optional positions [B, T]) -> float32 logits [B, T, V].

    The attention pattern is built once per forward (`attention_mask`) and read by every layer:
    with no positions, groups or cache, the plain causal sliding window (no mask array: the kernel applies it);
    otherwise the rule of `visible` on each token's position (-1: left padding) and group
    (`groups` [B or 1, T]: 0 for causal tokens, g >= 1 for the mask tokens of TiDAR draft block g).

    `router_noise` [B, T, E] replaces the noisy router's random draw in every MoE layer in training,
    so that two implementations can be fed the same noise (parity tests; not with recursion).

    With a decode `cache` (`init_cache`; see DecodeCache) the same forward serves a prefill and
    every decode step: each layer writes the first `write` (default: all) new tokens' keys and
    values (MLA: latents) at each row's time steps cache.step.. and the call returns (logits, the
    updated cache). A prefill attends over the new tokens, a step over every cache slot and the
    new tokens it does not write. `last_only`: the final norm and head on the last position only,
    logits [B, 1, V] (what a decode step samples from). `head=False`: the final-normed hidden
    states [B, T, D] instead of logits, for a loss that applies `head` itself chunk by chunk.

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
        apply_init_scheme(self, cfg.init, cfg.n_layer, rngs)
        apply_lora(self, cfg.lora, rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, groups: jax.Array | None = None,
                 cache: DecodeCache | None = None, write: int | None = None, router_noise: jax.Array | None = None,
                 last_only: bool = False, head: bool = True) -> jax.Array | tuple[jax.Array, DecodeCache]:
        cfg = self.cfg
        plain_causal = positions is None and groups is None and cache is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            if cache is not None:
                positions = positions + jnp.asarray(cache.step)[..., None]
        slot_positions = None if cache is None else write_cache(
            cache.positions, positions[:, :write], cache.step)
        mask = (AttentionMask(None, cfg.attention.window) if plain_causal
                else self.attention_mask(positions, groups, cache, slot_positions, write))
        positions = jnp.clip(positions, 0, cfg.max_seq_len - 1)  # padding (-1) and drafts past the context
        x = self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        x = self.dropout(x)
        if cache is not None:
            x, layers = self._cached_layers(x, positions, mask, cache, write, router_noise)
            n = tokens.shape[1] if write is None else write
            cache = DecodeCache(layers, slot_positions, cache.step + n, False)
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
        out = self.head(x) if head else x
        return out if cache is None else (out, cache)

    def head(self, x: jax.Array) -> jax.Array:
        """float32 logits [B, T, V] of final-normed hidden states x [B, T, D]: the tied embedding
        or the untied LM head, and the head bias."""
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias[...].astype(logits.dtype)
        return logits.astype(jnp.float32)

    def attention_mask(self, positions: jax.Array, groups: jax.Array | None, cache: DecodeCache | None,
                       slot_positions: jax.Array | None, write: int | None) -> AttentionMask:
        """The attention pattern of a forward that is not plain causal (see the class docstring and
        `visible`): the queries are the new tokens; the keys are the new tokens too, except in a
        decode step: every cache slot (`slot_positions`, after this call's writes), then the new
        tokens not written."""
        window = self.cfg.attention.window
        groups = jnp.zeros(positions.shape, jnp.int32) if groups is None else jnp.broadcast_to(groups, positions.shape)
        groups = jnp.where(positions < 0, -1, groups)
        k_pos, k_group = positions, groups
        if cache is not None and not cache.prefill:
            n = positions.shape[1] if write is None else write
            k_pos = jnp.concatenate([slot_positions, positions[:, n:]], axis=1)
            k_group = jnp.concatenate([jnp.where(slot_positions >= 0, 0, -2), groups[:, n:]], axis=1)
        return AttentionMask(visible(positions, groups, k_pos, k_group, window), window)

    def init_cache(self, batch: int, length: int, *, slack: int = 0, per_row: bool = False) -> DecodeCache:
        """An empty decode cache for `length` time steps, set for a prefill: per layer (each
        attention's `init_cache`, in the embedding's compute dtype; a looped core's layers one per
        core call) a slot for every step, or with a sliding window the last `window` of them (a
        rolling buffer), plus `slack` slots (TiDAR: drafts written past the committed length).
        `per_row`: a committed length per row (TiDAR) rather than one for the batch."""
        window = self.cfg.attention.window
        size = (length if window is None else min(window, length)) + slack
        dtype = self.embed_tokens.dtype
        layers = []
        for i, block in enumerate(self.layers):
            buffers = block.attn.init_cache(batch, size, dtype)
            if self._in_core(i):
                buffers = tuple(jnp.zeros((self.recursion.n_calls, *b.shape), b.dtype) for b in buffers)
            layers.append(buffers)
        step = jnp.zeros((batch,) if per_row else (), jnp.int32)
        return DecodeCache(tuple(layers), jnp.full((batch, size), -1, jnp.int32), step, True)

    def insert_cache(self, cache: DecodeCache, row: DecodeCache, slot: jax.Array) -> DecodeCache:
        """`cache` (a per-row cache, `init_cache(..., per_row=True)`) with batch row `slot` replaced
        by `row`, a one-row cache of the same size (a prefill's): a server's sequence slot taking a
        new request. Buffers, slot positions and committed length all come from `row`."""
        def put(buf, new, axis):  # batch on `axis`: 1 for a looped core's stacked buffers
            return jax.lax.dynamic_update_index_in_dim(buf, jax.lax.index_in_dim(new, 0, axis, keepdims=False),
                                                       slot, axis)

        layers = tuple(tuple(put(b, n, 1 if self._in_core(i) else 0) for b, n in zip(bufs, new))
                       for i, (bufs, new) in enumerate(zip(cache.layers, row.layers)))
        step = jnp.broadcast_to(row.step, (1,))
        return DecodeCache(layers, put(cache.positions, row.positions, 0), put(cache.step, step, 0), False)

    def _in_core(self, i: int) -> bool:
        r = self.cfg.recursion
        return self.recursion is not None and r.n_prelude <= i < r.n_prelude + r.n_core

    def _cached_layers(self, x, positions, mask, cache: DecodeCache, write, router_noise):
        """Every layer with its cache (the looped core with one per call): (x, the new buffers)."""
        layers = list(cache.layers)
        i = 0
        while i < len(self.layers):
            if self._in_core(i):
                n_core = self.cfg.recursion.n_core
                core = dataclasses.replace(cache, layers=tuple(layers[i:i + n_core]))
                x, layers[i:i + n_core] = self.recursion(self.layers[i:i + n_core], x, positions, mask, core, write)
                i += n_core
                continue
            x, layer_cache = self.layers[i](x, positions, mask, router_noise, cache=cache.layer(i, write))
            layers[i] = layer_cache.buffers
            i += 1
        return x, tuple(layers)

    def _run_layers(self, layers, x: jax.Array, positions: jax.Array, mask: AttentionMask,
                    router_noise: jax.Array | None = None) -> jax.Array:
        """Each layer once, rematerialised when configured; LayerDrop in training."""
        run = _run_block_remat if self.cfg.remat else _run_block
        keep = self.layerdrop.keep(len(layers))
        if self.cfg.scan_layers and len(layers) > 1:
            return _scan_blocks(layers, x, positions, mask, self.cfg.remat)
        for i, block in enumerate(layers):
            if keep is None:
                x = run(block, x, positions, mask, router_noise)
            else:
                init_expert_loads(block)  # both branches of the cond must leave the same state
                x, aux = nnx.cond(keep[i], functools.partial(_run_block_and_pop_aux, run), _skip_block,
                                  block, x, positions, mask, router_noise)
                self.sow(AuxLoss, "layerdrop_aux_losses", aux)
        return x

    def for_inference(self) -> "Transformer":
        """A copy of the model in eval mode whose weights are already in the compute dtype of the
        layer that reads them: every module with a compute `dtype` casts its own floating weights
        at each use (`weight.astype(self.dtype)`), so doing that cast once here, before decoding,
        gives the same numbers and halves a bfloat16 decode step's weight traffic. Float32
        weights stay float32 (norms, which compute in float32, have no compute dtype; routers'
        is float32). The caller's model is left as it is."""
        graphdef, state = nnx.split(self)
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables
        model.eval()
        for _, module in nnx.iter_modules(model):
            dtype = getattr(module, "dtype", None)
            if dtype is None:
                continue
            for name, var in vars(module).items():
                if isinstance(var, nnx.Param) and jnp.issubdtype(var.dtype, jnp.floating) and var.dtype != dtype:
                    var.set_value(var[...].astype(dtype))
        return model


def abstract_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """The Transformer of `cfg` built by `nnx.eval_shape`: every variable a ShapeDtypeStruct, no
    random number drawn (for shapes, parameter counts, shardings, and loading weights into)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of the model `cfg` describes, without allocating it."""
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))


class LMHead(nnx.Module):
    """An untied output projection [D, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype, param_dtype = dtypes(cfg)
        self.weight = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                            dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return project("BTD,DV->BTV", x.astype(self.dtype), self.weight[...].astype(self.dtype))
