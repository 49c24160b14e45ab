"""LayerNorm (with or without bias) and RMSNorm, computed in float32 (their weights stay float32;
`out_dtype` is the dtype of what they return)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.params import dtypes, param


class LayerNorm(nnx.Module):
    def __init__(self, d: int, *, eps: float, bias: bool, dtype, param_dtype):
        self.weight = param(None, (d,), ("norm",), "ones", dtype=param_dtype)
        self.bias = param(None, (d,), ("norm",), "zeros", dtype=param_dtype) if bias else None
        self.eps, self.out_dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.weight[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.out_dtype)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, *, eps: float, dtype, param_dtype):
        self.weight = param(None, (d,), ("norm",), "ones", dtype=param_dtype)
        self.eps, self.out_dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.weight[...]
        return y.astype(self.out_dtype)


def make_norm(cfg: ModelConfig) -> LayerNorm | RMSNorm:
    dtype, param_dtype = dtypes(cfg)
    if cfg.norm.kind == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm.eps, dtype=dtype, param_dtype=param_dtype)
    return LayerNorm(cfg.d_model, eps=cfg.norm.eps, bias=cfg.norm.bias, dtype=dtype, param_dtype=param_dtype)
