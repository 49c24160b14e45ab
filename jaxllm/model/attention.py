"""Causal self-attention: multi-head, grouped-query and multi-query, optional sliding window.

Letters: B batch, T query positions, S key positions, D model width, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.embeddings import apply_rope, rope_angles
from jaxllm.model.params import Einsum, dtypes


def causal_mask(t: int, s: int, window: int | None = None) -> jax.Array:
    """[T, S] booleans: query i (the last T of S positions) sees key j iff 0 <= i - j < window."""
    i = jnp.arange(t)[:, None] + (s - t)
    j = jnp.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def position_mask(q_positions: jax.Array, k_positions: jax.Array, window: int | None = None) -> jax.Array:
    """[B, T, S] booleans from the positions of queries [B, T] and keys [B, S] (-1: an empty cache
    slot or a padding token): query i sees key j iff j holds a token and 0 <= i - j < window. The
    decode caches use it for prefill and for every step; it equals `causal_mask` on 0..S-1."""
    d = q_positions[:, :, None] - k_positions[:, None, :]
    allowed = (k_positions[:, None, :] >= 0) & (d >= 0)
    if window is not None:
        allowed &= d < window
    return allowed


def write_cache(buf: jax.Array, new: jax.Array, step: jax.Array) -> jax.Array:
    """buf [B, S, ...] with new [B, T, ...] written at time steps step..step+T-1, slot = time mod S:
    a plain buffer when S covers every step, a rolling buffer of the last S otherwise (a sliding
    window). Of T > S new entries only the last S are kept."""
    s, t = buf.shape[1], new.shape[1]
    if t > s:
        new, step, t = new[:, t - s:], step + (t - s), s
    new = new.astype(buf.dtype)
    if t == 1:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, step % s, axis=1)
    return buf.at[:, (step + jnp.arange(t)) % s].set(new)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's decode cache, as its attention's `__call__` takes and returns it: the buffers
    [B, S, ...] its `init_cache` made (keys and values; MLA: c_kv and k_rope), and what the call
    needs to know: `step`, the time step of the first new token (written at slot step mod S, see
    `write_cache`), and `prefill` (static): the new tokens attend over themselves only (the cache
    starts empty) rather than over every slot."""
    buffers: tuple[jax.Array, ...]
    step: jax.Array
    prefill: bool = dataclasses.field(metadata=dict(static=True))

    def write(self, *new: jax.Array) -> "LayerCache":
        """The cache with new [B, T, ...] entries (one per buffer) written at time steps step.."""
        return dataclasses.replace(self, buffers=tuple(write_cache(b, n, self.step) for b, n in zip(self.buffers, new)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """The model's decode cache (`Transformer.init_cache`): each layer's buffers, and the `step` and
    `prefill` that every layer's call shares (see LayerCache). The model returns it with the new
    entries written, `step` advanced past them and `prefill` off: ready for the next call."""
    layers: tuple[tuple[jax.Array, ...], ...]
    step: jax.Array
    prefill: bool = dataclasses.field(metadata=dict(static=True))

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.layers[i], self.step, self.prefill)

    def advanced(self, layers: list[LayerCache], t: int) -> "DecodeCache":
        """The cache after a call of t new tokens that left the layers' caches `layers`."""
        return DecodeCache(tuple(c.buffers for c in layers), self.step + t, False)


def attend(q, k, v, *, window: int | None, mask: jax.Array | None = None,
           dropout: nnx.Dropout | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v for q [B,T,N,H], k and v [B,S,K,H]; returns [B,T,N,H].

    Without `mask` each query sees the causal sliding window of the last T of S positions. A
    `mask` [B or 1, T, S] (True: may attend) replaces that pattern entirely (e.g. TiDAR's
    block-diffusion mask, built once per shape with any window already applied).

    The fused `jax.nn.dot_product_attention` is used unless attention dropout is active, which it
    cannot apply; then the same maths runs as explicit einsums.
    """
    if dropout is None or dropout.deterministic or dropout.rate == 0.0:
        if mask is not None:
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
        window_size = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window_size)
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k).astype(jnp.float32) * h**-0.5
    allowed = causal_mask(t, k.shape[1], window) if mask is None else mask[:, None, None]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(q.dtype))
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        a = cfg.attention
        d, n, k, h = cfg.d_model, a.n_head, a.n_kv_head, a.head_dim
        dtype, param_dtype = dtypes(cfg)
        kw = dict(std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Einsum((d,), (n, h), ("embed",), ("heads", "head_dim"), bias=a.qkv_bias, **kw)
        self.k_proj = Einsum((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), bias=a.qkv_bias, **kw)
        self.v_proj = Einsum((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), bias=a.qkv_bias, **kw)
        self.o_proj = Einsum((n, h), (d,), ("heads", "head_dim"), ("embed",), bias=a.out_bias, **kw)
        self.dropout = nnx.Dropout(a.dropout, deterministic=True, rngs=rngs)
        self.window = a.window
        self.rope_theta = cfg.position.rope_theta if cfg.position.kind == "rope" else None

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None = None,
                 cache: LayerCache | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
        """x [B, T, D] -> [B, T, D]. With a decode `cache` (keys and values [B, S, K, H], see
        LayerCache) the T new keys and values are written at time steps step.. and the output comes
        with the updated cache: in a prefill the T queries attend over the T new keys (mask
        [B, T, T] or causal), otherwise over the whole cache (mask [B, T, S])."""
        q, k, v = self.qkv(x, positions)
        if cache is not None:
            cache = cache.write(k, v)
            if not cache.prefill:
                k, v = cache.buffers
        o = self.o_proj("BTNH,NHD->BTD", attend(q, k, v, window=self.window, mask=mask, dropout=self.dropout))
        return o if cache is None else (o, cache)

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q [B, T, N, H] and k, v [B, T, K, H], rope applied."""
        q = self.q_proj("BTD,DNH->BTNH", x)
        k = self.k_proj("BSD,DKH->BSKH", x)
        v = self.v_proj("BSD,DKH->BSKH", x)
        if self.rope_theta is not None:
            rope = rope_angles(positions, q.shape[-1], self.rope_theta)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def init_cache(self, batch: int, size: int, dtype) -> tuple[jax.Array, jax.Array]:
        """Empty keys and values [B, S, K, H] for a decode cache of `size` slots."""
        shape = (batch, size, *self.k_proj.weight.shape[1:])
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
