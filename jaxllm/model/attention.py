"""Causal self-attention: multi-head, grouped-query and multi-query, optional sliding window.

Letters: B batch, T query positions, S key positions, D model width, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.embeddings import apply_rope, rope_angles
from jaxllm.model.params import DTYPES, Einsum


def causal_mask(t: int, s: int, window: int | None = None) -> jax.Array:
    """[T, S] booleans: query i (the last T of S positions) sees key j iff 0 <= i - j < window."""
    i = jnp.arange(t)[:, None] + (s - t)
    j = jnp.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


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
        kw = dict(std=cfg.init_std, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        self.q_proj = Einsum((d,), (n, h), ("embed",), ("heads", "head_dim"), bias=a.qkv_bias, **kw)
        self.k_proj = Einsum((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), bias=a.qkv_bias, **kw)
        self.v_proj = Einsum((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), bias=a.qkv_bias, **kw)
        self.o_proj = Einsum((n, h), (d,), ("heads", "head_dim"), ("embed",), bias=a.out_bias, **kw)
        self.dropout = nnx.Dropout(a.dropout, deterministic=True, rngs=rngs)
        self.window = a.window
        self.rope_theta = cfg.position.rope_theta if cfg.position.kind == "rope" else None

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        q = self.q_proj("BTD,DNH->BTNH", x)
        k = self.k_proj("BSD,DKH->BSKH", x)
        v = self.v_proj("BSD,DKH->BSKH", x)
        if self.rope_theta is not None:
            rope = rope_angles(positions, q.shape[-1], self.rope_theta)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attend(q, k, v, window=self.window, mask=mask, dropout=self.dropout)
        return self.o_proj("BTNH,NHD->BTD", o)
