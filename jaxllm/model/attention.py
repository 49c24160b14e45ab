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


def visible(q_pos: jax.Array, q_group: jax.Array, k_pos: jax.Array, k_group: jax.Array,
            window: int | None) -> jax.Array:
    """The attention rule of every forward that is not plain causal (docs/sampling.md, "The mask"):
    [B, T, S] booleans from each query's and key's position (-1: padding or an empty slot) and group
    (0: a causal token; g >= 1: a mask token of TiDAR draft block g; -1: padding).

    A causal query sees the causal keys at positions <= its own within the window; a mask query
    sees the causal keys before its block's first position (within the window of its own position)
    and every token of its block; padding sees padding only (no query row is empty) and nobody
    sees padding."""
    same_block = q_group[:, :, None] == q_group[:, None, :]
    first = jnp.min(jnp.where(same_block, q_pos[:, None, :], jnp.iinfo(jnp.int32).max), axis=-1)
    horizon = jnp.where(q_group == 0, q_pos, first - 1)  # the last causal position a query may see
    d = q_pos[:, :, None] - k_pos[:, None, :]
    causal_key = (k_group[:, None, :] == 0) & (k_pos[:, None, :] >= 0)
    sees = causal_key & (k_pos[:, None, :] <= horizon[:, :, None])
    if window is not None:
        sees &= d < window
    return sees | ((q_group[:, :, None] != 0) & (q_group[:, :, None] == k_group[:, None, :]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Who attends to whom in one forward, built once by the model and read by every layer:
    `allowed` [B or 1, T, S] (True: may attend; from `visible`), or None for the plain causal
    sliding window of `window` over the T new tokens (the fused attention path)."""
    allowed: jax.Array | None
    window: int | None = dataclasses.field(metadata=dict(static=True))


def write_cache(buf: jax.Array, new: jax.Array, step: jax.Array, axis: int = 1) -> jax.Array:
    """buf [B, ..., S, ...] (slots on `axis`) with new [B, ..., T, ...] written at each row's time
    steps step[b]..step[b]+T-1 (step [B], or a scalar shared by every row), slot = time mod S: a
    plain buffer when S covers every step, a rolling buffer of the last S otherwise (a sliding
    window). Of T > S new entries only the last S are kept."""
    s, t = buf.shape[axis], new.shape[axis]
    if t > s:
        new, step, t = jax.lax.slice_in_dim(new, t - s, t, axis=axis), step + (t - s), s
    new = new.astype(buf.dtype)
    between = (slice(None),) * (axis - 1)
    if jnp.ndim(step) == 0:
        if t == 1:
            return jax.lax.dynamic_update_slice_in_dim(buf, new, step % s, axis=axis)
        return buf.at[(slice(None), *between, (step + jnp.arange(t)) % s)].set(new)
    slots = (step[:, None] + jnp.arange(t)) % s  # [B, T]
    # the advanced indices (rows, slots) put [B, T] first in the indexed shape
    return buf.at[(jnp.arange(buf.shape[0])[:, None], *between, slots)].set(jnp.moveaxis(new, axis, 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's decode cache, as its attention's `__call__` takes and returns it: the buffers
    its `init_cache` made (keys and values [B, K, S, H]; MLA: c_kv [B, S, C] and k_rope), and what the call
    needs to know (see DecodeCache): `step`, the time step of the first new token (a scalar, or
    [B] per row),
    `prefill` (static: the new tokens attend over themselves only) and `write` (static: how many
    of the new tokens go into the cache; None: all)."""
    buffers: tuple[jax.Array, ...]
    step: jax.Array
    prefill: bool = dataclasses.field(metadata=dict(static=True))
    write: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def update(self, *new: jax.Array, axis: int = 1) -> tuple["LayerCache", tuple[jax.Array, ...]]:
        """Write the first `write` of the new entries (one per buffer, laid out as it is: time on
        `axis`, the slot axis); returns the cache and what the new queries attend over: in a
        prefill the new entries, in a step every slot followed by the new entries not written."""
        t = new[0].shape[axis]
        n = t if self.write is None else self.write
        head = lambda x: jax.lax.slice_in_dim(x, 0, n, axis=axis)  # noqa: E731
        buffers = tuple(write_cache(b, head(x), self.step, axis) for b, x in zip(self.buffers, new))
        cache = dataclasses.replace(self, buffers=buffers)
        if self.prefill:
            return cache, new
        if n == t:
            return cache, buffers
        return cache, tuple(jnp.concatenate([b, jax.lax.slice_in_dim(x, n, t, axis=axis).astype(b.dtype)], axis=axis)
                            for b, x in zip(buffers, new))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """The model's decode cache (`Transformer.init_cache`): each layer's buffers (a looped core's
    layers: one set per core application, stacked on a leading axis), `positions` [B, S] the token
    position held in each slot (-1: empty or padding), `step` the time step of the next write
    (time step t lives in slot t mod S): a scalar when every row writes the same slots (plain
    decoding), [B] when rows commit different numbers of tokens (TiDAR); and `prefill` (static:
    nothing written yet).

    A forward given the cache writes the first `write` new tokens (all by default) at time steps
    step.. of each row and returns the cache with `step` advanced past them and `prefill` off.
    Rolling back (TiDAR's rejected drafts) is `rollback(step)`: the slots past it are stale, and
    are rewritten before any later query can see them."""
    layers: tuple[tuple[jax.Array, ...], ...]
    positions: jax.Array
    step: jax.Array
    prefill: bool = dataclasses.field(metadata=dict(static=True))

    def layer(self, i: int, write: int | None = None) -> LayerCache:
        return LayerCache(self.layers[i], self.step, self.prefill, write)

    def rollback(self, step: jax.Array) -> "DecodeCache":
        """The cache with each row's committed length set to `step` [B]."""
        return dataclasses.replace(self, step=step)


def implementation(choice: str, dtype, head_dim: int, masked: bool, backend: str | None = None) -> str:
    """The attention kernel `attend` runs: `choice` unless it is 'auto', which picks cuDNN's fused
    kernel on an NVIDIA GPU where it applies (16-bit dtype, head_dim a multiple of 8 up to 128,
    the plain causal sliding window rather than an explicit mask) and 'einsum' everywhere else.
    'einsum' is the maths jax.nn.dot_product_attention's 'xla' kernel also runs, but written so
    that XLA:CPU runs it forward+backward in half the time (docs/perf.md), and it reads a decode
    cache in its own layout without a copy."""
    if choice != "auto":
        return choice
    backend = backend or jax.default_backend()
    if (backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128 and not masked):
        return "cudnn"
    return "einsum"


def attend(q, k, v, mask: AttentionMask, *, dropout: nnx.Dropout | None = None, kernel: str = "auto",
           heads_major: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v for q [B,T,N,H], k and v [B,S,K,H] (`heads_major`: [B,K,S,H], a
    decode cache's layout); returns [B,T,N,H], each query seeing the keys `mask` allows (with
    `mask.allowed` None: the causal sliding window of the last T of S positions).

    `kernel` (model.attention.implementation, resolved by `implementation`): 'xla' or 'cudnn' run
    the fused `jax.nn.dot_product_attention`; 'einsum' the same maths as explicit einsums, which is
    also what runs under active attention dropout (the fused kernels cannot apply it).
    """
    dropping = dropout is not None and not dropout.deterministic and dropout.rate > 0.0
    kernel = "einsum" if dropping else implementation(kernel, q.dtype, q.shape[-1], mask.allowed is not None)
    if kernel != "einsum":
        if heads_major:
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        if mask.allowed is not None:
            return jax.nn.dot_product_attention(q, k, v, mask=mask.allowed[:, None], implementation=kernel)
        window_size = None if mask.window is None else (mask.window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window_size,
                                            implementation=kernel)
    b, t, n, h = q.shape
    kv_heads, s = (k.shape[1], k.shape[2]) if heads_major else (k.shape[2], k.shape[1])
    kv = "BKSH" if heads_major else "BSKH"
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum(f"BTKGH,{kv}->BKGTS", q, k).astype(jnp.float32) * h**-0.5
    allowed = causal_mask(t, s, mask.window) if mask.allowed is None else mask.allowed[:, None, None]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    # the softmax over [B, N, T, S]: XLA:CPU's reduction over the 5-d layout runs 3x slower
    probs = jax.nn.softmax(scores.reshape(b, n, t, -1), axis=-1).reshape(scores.shape).astype(q.dtype)
    if dropping:
        probs = dropout(probs)
    return jnp.einsum(f"BKGTS,{kv}->BTKGH", probs, v).reshape(b, t, n, h)


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
        self.rope_theta = cfg.position.rope_theta if cfg.position.kind == "rope" else None
        self.kernel = a.implementation

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask,
                 cache: LayerCache | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
        """x [B, T, D] -> [B, T, D]. With a decode `cache` (keys and values [B, K, S, H], see
        LayerCache) the new keys and values are written and the output comes with the updated
        cache; the queries attend over what `LayerCache.update` returns, as `mask` says."""
        q, k, v = self.qkv(x, positions)
        if cache is None:
            return self.o_proj("BTNH,NHD->BTD", attend(q, k, v, mask, dropout=self.dropout, kernel=self.kernel))
        # the cache keeps keys and values heads-major [B, K, S, H]: a step's attention then reads
        # it in place (in [B, S, K, H] every step would copy the whole cache into that layout)
        cache, (k, v) = cache.update(k.swapaxes(1, 2), v.swapaxes(1, 2), axis=2)
        o = attend(q, k, v, mask, dropout=self.dropout, kernel=self.kernel, heads_major=True)
        return self.o_proj("BTNH,NHD->BTD", o), cache

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
        """Empty keys and values [B, K, S, H] (heads-major) for a decode cache of `size` slots."""
        kv_heads, h = self.k_proj.weight.shape[1:]
        shape = (batch, kv_heads, size, h)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
