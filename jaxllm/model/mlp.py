"""Feed-forward sublayer: GELU (exact or tanh) or SwiGLU.  Letters: B, T, D, F ffn width."""
from __future__ import annotations

import jax
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.params import Einsum, dtypes


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written with erf as torch writes it: jax.nn.gelu's erfc form costs
    XLA:CPU twice the time forward and backward (docs/perf.md); they differ by < 1e-6."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 2.0**-0.5))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.mlp
        d, f = cfg.d_model, m.d_ff
        dtype, param_dtype = dtypes(cfg)
        kw = dict(bias=m.bias, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.kind = m.kind
        if m.kind == "swiglu":
            self.gate_proj = Einsum((d,), (f,), ("embed",), ("mlp",), **kw)
        self.up_proj = Einsum((d,), (f,), ("embed",), ("mlp",), **kw)
        self.down_proj = Einsum((f,), (d,), ("mlp",), ("embed",), **kw)
        self.dropout = nnx.Dropout(m.dropout, deterministic=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        up = self.up_proj("BTD,DF->BTF", x)
        if self.kind == "swiglu":
            hidden = jax.nn.silu(self.gate_proj("BTD,DF->BTF", x)) * up
        else:
            hidden = jax.nn.gelu(up, approximate=True) if self.kind == "gelu_tanh" else gelu(up)
        return self.down_proj("BTF,FD->BTD", self.dropout(hidden))
