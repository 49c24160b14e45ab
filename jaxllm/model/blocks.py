"""The pre-norm transformer block (with ReZero and LayerDrop), and the recursive block that loops a core of them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.attention import Attention, AttentionMask, DecodeCache, LayerCache
from jaxllm.model.mla import MultiHeadLatentAttention
from jaxllm.model.mlp import MLP
from jaxllm.model.moe import MoE, init_expert_loads
from jaxllm.model.norms import make_norm
from jaxllm.model.params import Buffer, Einsum, dtypes, param, pop_aux_losses


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

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask,
                 router_noise: jax.Array | None = None, *, cache: LayerCache | None = None):
        """x [B, T, D] -> [B, T, D]; with a decode `cache` (the attention's, see LayerCache),
        (x, the updated cache). router_noise [B, T, E]: the noisy router's eps in training, for an
        MoE layer (see MoE)."""
        h = x if self.attn_norm is None else self.attn_norm(x)
        a = self.attn(h, positions, mask, cache)
        if cache is not None:
            a, cache = a
        x = self._residual(x, a)
        h = x if self.mlp_norm is None else self.mlp_norm(x)
        x = self._residual(x, self.mlp(h, router_noise) if isinstance(self.mlp, MoE) else self.mlp(h))
        return x if cache is None else (x, cache)


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


def run_layers(layers, x: jax.Array, positions: jax.Array, mask: AttentionMask,
               caches: list[LayerCache] | None = None) -> jax.Array | tuple[jax.Array, list[LayerCache]]:
    """Each block once; with `caches` (one LayerCache per block), (x, the updated caches)."""
    if caches is None:
        for block in layers:
            x = block(x, positions, mask)
        return x
    new = []
    for block, cache in zip(layers, caches):
        x, cache = block(x, positions, mask, cache=cache)
        new.append(cache)
    return x, new


class RecursiveBlock(nnx.Module):
    """The looped core of a recurrent-depth model (papers.md §2.6) or the TRM recursion (§2.1).

    It owns only the recursion's own state: the concat adapter (Huginn's Linear(2D -> D)) and the
    fixed random initial states (TRM's H_init / L_init); the core layers are the model's
    `layers[n_prelude : n_prelude + n_core]` and are passed in, so their parameters keep their
    names and are shared by every loop. Each core call is one step of a `lax.fori_loop` (a scan
    when the trip count is static), rematerialised when `model.remat` is on:

    - loop: s <- core(inject(s, e)), n_loops times, e the prelude's output;
    - trm: each cycle is n_latent_steps updates z <- core(inject(y + z, e)) and then one
      y <- core(y + z); n_loops cycles; the answer y goes on to the coda.

    The first n_loops - n_grad_loops loops (cycles) run on stop-gradient parameters and inputs,
    so they carry no gradient. In training with `random_loops`, the number of loops is drawn per
    step as Poisson(LogNormal(ln n_loops - 1/8, 1/2)) + 1 (Huginn) and at most n_grad_loops of
    them take gradients; in eval mode n_loops always run.

    Decoding (eval mode) gives it the core's part of the model's DecodeCache: each core layer's
    buffers stacked on a leading axis of n_loops * steps_per_loop, one cache per core call.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        r, d = cfg.recursion, cfg.d_model
        dtype, param_dtype = dtypes(cfg)
        self.mode, self.n_loops, self.n_latent_steps = r.mode, r.n_loops, r.n_latent_steps
        self.n_grad_loops = r.n_loops if r.n_grad_loops is None else r.n_grad_loops
        self.init, self.random_loops, self.remat = r.init, r.random_loops, cfg.remat
        self.adapter = (Einsum((2 * d,), (d,), ("inject",), ("embed",), bias=False, std=cfg.init_std,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                        if r.inject == "concat" else None)
        self.n_states = 2 if r.mode == "trm" else 1  # (y, z) or s
        self.init_state = (Buffer(cfg.init_std * jax.random.normal(rngs.params(), (self.n_states, d)),
                                  axes=("inject", "embed"))
                           if r.init == "random" else None)
        self.deterministic = True
        self.rngs = rngs["dropout"].fork()

    @property
    def steps_per_loop(self) -> int:
        return self.n_latent_steps + 1 if self.mode == "trm" else 1

    def inject(self, s: jax.Array, e: jax.Array) -> jax.Array:
        if self.adapter is None:
            return s + e
        return self.adapter("BTI,IE->BTE", jnp.concatenate([s, e], axis=-1).astype(s.dtype))

    def initial_state(self, e: jax.Array) -> tuple[jax.Array, ...]:
        if self.init == "zeros":
            return (jnp.zeros_like(e),) * self.n_states
        if self.init == "embedding":
            return (e,) * self.n_states
        return tuple(jnp.broadcast_to(self.init_state[i].astype(e.dtype), e.shape) for i in range(self.n_states))

    @property
    def n_calls(self) -> int:
        """Core calls per forward in eval mode (each has its own decode cache)."""
        return self.n_loops * self.steps_per_loop

    def step(self, core, state: tuple[jax.Array, ...], e: jax.Array, i: jax.Array, positions, mask,
             caches: list[LayerCache] | None = None):
        """Core call number i (counting from the first loop) on the state; with `caches` (this
        call's LayerCache of each core layer), (the state, the updated caches)."""
        if self.mode == "loop":
            (s,) = state
            x = self.inject(s, e)
        else:
            y, z = state
            is_latent = i % self.steps_per_loop < self.n_latent_steps
            x = jnp.where(is_latent, self.inject(y + z, e), y + z)
        out = run_layers(core, x, positions, mask, caches)
        if caches is not None:
            out, caches = out
        state = (out,) if self.mode == "loop" else (jnp.where(is_latent, y, out), jnp.where(is_latent, out, z))
        return state if caches is None else (state, caches)

    def loop_counts(self) -> tuple[jax.Array | int, jax.Array | None]:
        """(loops without gradient, loops with gradient out of n_grad_loops or None for all)."""
        if self.deterministic or not self.random_loops:
            return self.n_loops - self.n_grad_loops, None
        sigma = 0.5
        rate = jnp.exp(jnp.log(self.n_loops) - sigma**2 / 2 + sigma * jax.random.normal(self.rngs()))
        r = jax.random.poisson(self.rngs(), rate) + 1
        with_grad = jnp.minimum(r, self.n_grad_loops)
        return r - with_grad, with_grad

    def __call__(self, core, e: jax.Array, positions: jax.Array, mask: AttentionMask,
                 cache: DecodeCache | None = None, write: int | None = None):
        """The core's output after every loop, and the sum of the aux losses its layers recorded;
        with a decode `cache` (eval mode; its layers are the core's, stacked per call, see the
        class docstring), (output, the cache's updated core layers)."""
        if cache is not None:
            return _cached_core(nnx.List([*core, self]), e, positions, mask, cache, write)
        no_grad, with_grad = self.loop_counts()
        state, aux = self.initial_state(e), jnp.zeros((), jnp.float32)
        per_loop = self.steps_per_loop
        modules = nnx.List([*core, self])  # what each core call reads and updates
        if not isinstance(no_grad, int) or no_grad > 0:
            # Loops without gradient: parameters, inputs and state all stop-gradient (so a traced
            # trip count, a while loop, is fine under jax.grad).
            looped, aux = _fori_core(modules, 0, no_grad * per_loop, jax.lax.stop_gradient(state),
                                     jax.lax.stop_gradient(e), aux, positions, mask, grad=False, remat=False,
                                     training=not self.deterministic)
            # A drawn count may be 0: then the initial state keeps its gradient path.
            state = looped if isinstance(no_grad, int) else jax.tree.map(
                lambda a, b: jnp.where(no_grad > 0, a, b), looped, state)
        first = no_grad * per_loop
        active_from = None if with_grad is None else (self.n_grad_loops - with_grad) * per_loop
        state, aux = _fori_core(modules, first, self.n_grad_loops * per_loop, state, e, aux, positions, mask,
                                grad=True, remat=self.remat, active_from=active_from, training=not self.deterministic)
        return state[0], aux


def _fori_core(modules: nnx.List, first, n_steps, state, e, aux, positions, mask, *, grad: bool, remat: bool,
               active_from=None, training: bool = True):
    """n_steps core calls (`modules` = core layers + the RecursiveBlock), step numbers counted
    from `first`; as a functional loop over the modules' split state so that RNG counters and
    MoE expert loads (made before the loop, so every step leaves the same state) carry from step
    to step, and aux losses, popped at each step, add up. With `active_from`, the first
    `active_from` steps of this loop are skipped (a drawn loop count below n_grad_loops). In eval
    mode no step draws or records anything, so the modules are left untouched (an eval forward
    mutates nothing, also inside a caller's loop, as decoding)."""
    init_expert_loads(modules)
    graphdef, params, rest = nnx.split(modules, nnx.Param, ...)
    if not grad:
        params = jax.lax.stop_gradient(params)

    def step(j, params, rest, state):
        m = nnx.merge(graphdef, params, rest)
        recursion = m[-1]
        state = recursion.step(list(m)[:-1], state, e, first + j, positions, mask)
        step_aux = pop_aux_losses(m)
        return state, nnx.state(m, nnx.Not(nnx.Param)), step_aux

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)

    def body(j, carry):
        state, rest, aux = carry
        if active_from is None:
            new_state, new_rest, step_aux = step(j, params, rest, state)
        else:
            new_state, new_rest, step_aux = jax.lax.cond(
                j >= active_from, lambda: step(j, params, rest, state),
                lambda: (state, rest, jnp.zeros((), jnp.float32)))
        return new_state, new_rest, aux + step_aux

    state, rest, aux = jax.lax.fori_loop(0, n_steps, body, (state, rest, aux))
    if training:
        nnx.update(modules, rest)
    return state, aux


def _cached_core(modules: nnx.List, e, positions, mask: AttentionMask, cache: DecodeCache, write: int | None):
    """The eval-mode loop of core calls with a cache per call: call i reads and writes slice i of
    every core layer's stacked buffers. Returns (output, the updated stacked buffers)."""
    graphdef, state = nnx.split(modules)
    n_calls = modules[-1].n_calls

    def body(i, carry):
        loop_state, layers = carry
        m = nnx.merge(graphdef, state)
        caches = [LayerCache(jax.tree.map(lambda b: b[i], buffers), cache.step, cache.prefill, write)
                  for buffers in layers]
        loop_state, caches = m[-1].step(list(m)[:-1], loop_state, e, i, positions, mask, caches)
        layers = tuple(jax.tree.map(lambda b, c: b.at[i].set(c), buffers, c.buffers)
                       for buffers, c in zip(layers, caches))
        return loop_state, layers

    loop_state, layers = jax.lax.fori_loop(0, n_calls, body, (modules[-1].initial_state(e), cache.layers))
    return loop_state[0], layers
