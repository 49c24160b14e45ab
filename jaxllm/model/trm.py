"""The Tiny Recursive Model (TRM, Jolicoeur-Martineau 2025; papers.md §2.1-2.2): one small network
that recurses on an answer state y and a latent state z to solve a puzzle, as the official
`models/recursive_reasoning/trm.py` does.

One call is one supervision step, a *deep recursion* (paper Fig. 3):

    x = embed(puzzle)                                   # [B, P + L, D], P learned prefix positions
    repeat T - 1 times, without gradient:  y, z = latent_recursion(x, y, z)
    y, z = latent_recursion(x, y, z)                    # the one cycle with gradient (full BPTT)
    return (y, z) detached, lm_head(y)[:, P:], q_head(y[:, 0])

    latent_recursion: z = core(x + y + z) n times ("think"), then y = core(y + z) ("act")

`core` is n_layer post-norm blocks, h = rms_norm(h + mixer(h)); h = rms_norm(h + SwiGLU(h)) with
the parameter-free RMSNorm, where the mixer is non-causal attention or, for TRM-MLP, a SwiGLU over
the sequence axis (normalised over the sequence, as the official code does). The initial y and z
are fixed random buffers; the halting head starts at weight 0, bias -5. Mode `plain` is the
non-recursive baseline: the core once on x, the same parameters.

Letters: B batch, T positions (prefix + puzzle), L puzzle cells, D width, F ffn width, V vocab.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig, default_d_ff
from jaxllm.model.attention import Attention, AttentionMask
from jaxllm.model.embeddings import Embed
from jaxllm.model.mlp import MLP
from jaxllm.model.params import Buffer, Einsum, dtypes, param


# the std of a standard normal truncated to [-2, 2]
TRUNCATED_NORMAL_STD = 0.87962566103423978


def rms_norm(x: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """The parameter-free RMSNorm of TRM's post-norm blocks (float32 inside)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axis, keepdims=True) + eps)).astype(x.dtype)


def n_positions(cfg: ModelConfig) -> int:
    """Positions the core sees: the learned prefix and the puzzle's cells."""
    return cfg.trm.n_prefix + cfg.max_seq_len


class SequenceMLP(nnx.Module):
    """TRM-MLP's token mixer: a SwiGLU over the sequence axis (MLP-Mixer style), one for all
    channels; its width is the official round(4 * T * 2/3) rounded up to 256."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        t = n_positions(cfg)
        f = default_d_ff("swiglu", t)
        dtype, param_dtype = dtypes(cfg)
        kw = dict(bias=False, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Einsum((t,), (f,), ("positions",), ("mlp",), **kw)
        self.up_proj = Einsum((t,), (f,), ("positions",), ("mlp",), **kw)
        self.down_proj = Einsum((f,), (t,), ("mlp",), ("positions",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D], each channel mixed over the positions."""
        hidden = jax.nn.silu(self.gate_proj("BTD,TF->BDF", x)) * self.up_proj("BTD,TF->BDF", x)
        return self.down_proj("BDF,FT->BTD", hidden)


class TRMBlock(nnx.Module):
    """h = rms_norm(h + mixer(h)); h = rms_norm(h + mlp(h)) (post-norm, no learned norm weights)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.norm.eps
        self.mixer = cfg.trm.mixer
        if self.mixer == "attention":
            self.attn = Attention(cfg, rngs=rngs)
        else:
            self.mlp_t = SequenceMLP(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, h: jax.Array, positions: jax.Array, mask: AttentionMask) -> jax.Array:
        if self.mixer == "attention":
            h = rms_norm(h + self.attn(h, positions, mask), self.eps)
        else:  # the official code normalises the sequence-mixed state over the sequence axis
            h = rms_norm(h + self.mlp_t(h), self.eps, axis=1)
        return rms_norm(h + self.mlp(h), self.eps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TRMOutput:
    """One supervision step's result: the new (y, z) [B, T, D] (detached: nothing flows back across
    steps), the answer's float32 logits [B, L, V] and the halting logit q [B] (float32)."""
    y: jax.Array
    z: jax.Array
    logits: jax.Array
    q_halt: jax.Array


class TRM(nnx.Module):
    """puzzle tokens [B, L] and the carried (y, z) -> TRMOutput (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        t, d = cfg.trm, cfg.d_model
        dtype, param_dtype = dtypes(cfg)
        self.dtype = dtype
        # token table std 1/sqrt(D), scaled by sqrt(D) on lookup (the official embed_scale)
        self.embed_tokens = Embed(cfg.vocab_size, d, ("vocab", "embed"), std=d**-0.5, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.embed_prefix = param(None, (t.n_prefix, d), ("positions", "embed"), "zeros", dtype=param_dtype) \
            if t.n_prefix else None
        self.embed_positions = (Embed(n_positions(cfg), d, ("positions", "embed"), std=d**-0.5, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
                                if cfg.position.kind == "learned" else None)
        self.layers = nnx.List([TRMBlock(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.lm_head = Einsum((d,), (cfg.vocab_size,), ("embed",), ("vocab",), bias=False, std=cfg.init_std,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_head = Einsum((d,), (1,), ("embed",), ("halt",), bias=True, std=cfg.init_std, dtype=jnp.float32,
                             param_dtype=param_dtype, rngs=rngs)
        self.q_head.weight[...] = jnp.zeros_like(self.q_head.weight[...])
        self.q_head.bias[...] = jnp.full_like(self.q_head.bias[...], -5.0)
        # the fixed random initial y and z (H_init, L_init), never trained: the official
        # trunc_normal_init_(std=1), a normal cut at 2 of its std and scaled so the draw's std is 1
        # (jax.random.truncated_normal(-2, 2) alone has std 0.88)
        self.init_state = Buffer(jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (2, d), param_dtype)
                                 / TRUNCATED_NORMAL_STD, axes=("state", "embed"))

    def initial_state(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """(y, z) of a fresh puzzle: H_init and L_init broadcast to [batch, T, D]."""
        shape = (batch, n_positions(self.cfg), self.cfg.d_model)
        y0, z0 = (self.init_state[i].astype(self.dtype) for i in range(2))
        return jnp.broadcast_to(y0, shape), jnp.broadcast_to(z0, shape)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """x [B, T, D]: the prefix and the cells' token embeddings (+ learned positions, scaled by
        1/sqrt(2) as the official code does), times sqrt(D)."""
        x = self.embed_tokens(tokens)
        if self.embed_prefix is not None:
            prefix = self.embed_prefix[...].astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(prefix, (x.shape[0], *prefix.shape)), x], axis=1)
        if self.embed_positions is not None:
            x = 0.707106781 * (x + self.embed_positions.weight[...].astype(x.dtype))
        return x * jnp.asarray(self.cfg.d_model**0.5, x.dtype)

    def core(self, h: jax.Array) -> jax.Array:
        """The network: every block once, each position seeing every other."""
        positions = jnp.arange(h.shape[1])[None]
        mask = AttentionMask(allowed=jnp.ones((1, h.shape[1], h.shape[1]), bool), window=None)
        for block in self.layers:
            h = block(h, positions, mask)
        return h

    def __call__(self, tokens: jax.Array, y: jax.Array, z: jax.Array, *, h_cycles: int | None = None,
                 l_cycles: int | None = None) -> TRMOutput:
        """One supervision step from the carried (y, z) [B, T, D]; h_cycles / l_cycles (T, n)
        default to the config's (test-time depth may differ from training)."""
        t = self.cfg.trm
        h_cycles, l_cycles = h_cycles or t.h_cycles, l_cycles or t.l_cycles
        x = self.embed(tokens)
        if t.mode == "plain":
            y = self.core(x)
        else:
            y, z = jax.lax.stop_gradient((y, z))  # the carry never takes a gradient
            if h_cycles > 1:  # T - 1 cycles on stop-gradient parameters and inputs
                graphdef, params, rest = nnx.split(self, nnx.Param, ...)
                frozen = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
                x_frozen = jax.lax.stop_gradient(x)
                y, z = jax.lax.fori_loop(0, h_cycles - 1,
                                         lambda _, yz: frozen.latent_recursion(x_frozen, *yz, l_cycles), (y, z))
            y, z = self.latent_recursion(x, y, z, l_cycles)
        n_prefix = t.n_prefix
        logits = self.lm_head("BLD,DV->BLV", y[:, n_prefix:]).astype(jnp.float32)
        q_halt = self.q_head("BD,DQ->BQ", y[:, 0].astype(jnp.float32))[:, 0]
        return TRMOutput(*jax.lax.stop_gradient((y, z)), logits, q_halt)

    def latent_recursion(self, x: jax.Array, y: jax.Array, z: jax.Array, l_cycles: int) -> tuple[jax.Array, jax.Array]:
        """n latent updates z = core(x + y + z) (input injection by addition), then y = core(y + z)."""
        z = jax.lax.fori_loop(0, l_cycles, lambda _, z: self.core(x + y + z), z)
        return self.core(y + z), z


def abstract_trm(cfg: ModelConfig, seed: int = 0) -> TRM:
    """The TRM of `cfg` built by `nnx.eval_shape` (shapes only, nothing drawn)."""
    return nnx.eval_shape(lambda: TRM(cfg, rngs=nnx.Rngs(seed)))


def solve(model: TRM, tokens: jax.Array, n_sup: int, *, h_cycles: int | None = None,
          l_cycles: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Evaluation: n_sup supervision steps from a fresh state, every one of them (as the official
    evaluation; halting is read off afterwards). Returns (the predicted cells after each step
    [n_sup, B, L] int32, the halting logit after each step [n_sup, B] float32)."""
    def step(yz, _):
        out = model(tokens, *yz, h_cycles=h_cycles, l_cycles=l_cycles)
        return (out.y, out.z), (jnp.argmax(out.logits, -1).astype(jnp.int32), out.q_halt)

    _, (predictions, q_halt) = jax.lax.scan(step, model.initial_state(tokens.shape[0]), None, length=n_sup)
    return predictions, q_halt
