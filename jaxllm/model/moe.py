"""Mixture-of-Experts feed-forward (papers.md §4): routed SwiGLU experts, shared experts, three
routers and their auxiliary losses.

Letters: B batch, T positions, D width, F expert ffn width, E routed experts, plus
X tokens (B*T flattened), A a token's k routed choices (num_experts_per_tok),
R routed rows (the X*A assignments sorted by expert), Q expert groups (n_group), P experts per group.

Routers (all in float32; `logits = x W_router`, [X, E]):
- softmax (Mixtral, Qwen2-MoE, DeepSeek-V2): s = softmax(logits); pick top-k of s; weights = s of
  the picked experts, renormalised to sum 1 iff norm_topk_prob, times routed_scaling_factor.
- sigmoid (DeepSeek-V3): s = sigmoid(logits); pick top-k of s + expert_bias (the bias steers the
  selection only); weights = the unbiased s of the picked experts, renormalised iff
  norm_topk_prob, times routed_scaling_factor. `update_router_bias` moves the bias.
- noisy (Shazeer 2017): h = logits + eps * softplus(x W_noise), eps ~ N(0, 1) in training only
  (eval: h = logits); weights = softmax over the top-k h (= Softmax(KeepTopK(h, k))), times
  routed_scaling_factor. W_router and W_noise start at 0. The forward's optional `router_noise`
  [B, T, E] replaces the random eps (parity tests feed two implementations the same draw).
Group-limited selection (n_group > 1): experts form n_group consecutive groups; a group scores the
max of its selection scores (softmax, noisy) or the sum of its top 2 (sigmoid, V3); only the best
topk_group groups may be picked.

`MoE.route` only chooses the experts (a `Routing`); `router_losses(cfg, routing)` computes the
auxiliary losses beside it, each times its coefficient. A training forward records them with
`self.sow(AuxLoss, name, value)`; an eval forward records nothing (it mutates nothing):
- balance_loss = E / (k X) * sum_i c_i P_i, with c_i the number of tokens that pick expert i and
  P_i = mean over tokens of p_i, the router's probability for i (softmax: s; sigmoid: s / sum_j s_j,
  as V3; noisy: softmax(h)). This is DeepSeek's alpha * sum f_i P_i with f_i = E c_i / (k X), i.e.
  Switch's N * sum f_i P_i generalised to top-k; computed over the whole batch. Uniform routing
  (c_i = kX/E, p_i = 1/E) gives exactly 1.
- z_loss = mean over tokens of logsumexp(router logits)^2 (ST-MoE; noisy router: of h).
- importance_loss = CV(sum_x G(x))^2 and load_loss = CV(Load)^2 (noisy router only), with
  CV(v)^2 = var(v) / (mean(v)^2 + 1e-10) (population variance, as Shazeer's code). In training
  Load_i = sum_x Phi((logits_i - thr_i) / softplus(x W_noise)_i), where thr_i is the k-th largest
  h if expert i is not in the top-k of h and the (k+1)-th largest if it is (App. A); without noise
  Load_i = c_i. Group limits are ignored by this estimator.

Dispatch: 'grouped' sorts the token-expert assignments by expert and runs each expert's SwiGLU on
its own rows only, with `jax.lax.ragged_dot` (dropless by default). 'dense' runs every expert on
every token and masks the weights: a reference for tests. With capacity_factor, each expert takes
at most C = ceil(X * k / E * capacity_factor) assignments, the first ones in token order (the
batch flattened row-major: sequence, then position); the rest are dropped: the token loses that
expert's contribution (it keeps its other experts, the shared experts and the residual).

Expert load (V3 bias): in training, a layer whose bias is balanced (sigmoid router,
bias_update_rate > 0) also sows `ExpertLoad`, the tokens that picked each expert (before any
capacity drop), summed over its calls until popped. The train step pops them after the optimiser
step and moves the bias: `update_router_bias(model, pop_expert_load(model))`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig, MoEConfig
from jaxllm.model.mlp import MLP
from jaxllm.model.params import AuxLoss, Buffer, Einsum, dtypes, param


class ExpertLoad(nnx.Intermediate):
    """Tokens that picked each expert [E] (before capacity drops), summed over a layer's training
    forwards since the last `pop_expert_load`: what `update_router_bias` balances."""


class Routing(NamedTuple):
    """The experts X tokens picked, and what the auxiliary losses read."""
    idx: jax.Array  # [X, A] the picked experts
    weights: jax.Array  # [X, A] float32 their weights (times routed_scaling_factor; before capacity drops)
    probs: jax.Array  # [X, E] the router's probability of each expert (the balance loss's P)
    logits: jax.Array  # [X, E] the logits the router ranks (noisy: h, with the noise)
    clean_logits: jax.Array  # [X, E] x W_router
    noise_std: jax.Array | None  # [X, E] softplus(x W_noise) where noise was added (noisy, training), else None


class RoutedExperts(nnx.Module):
    """E stacked SwiGLU experts: gate_proj, up_proj [E, D, F], down_proj [E, F, D]."""

    def __init__(self, e: int, d: int, f: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype=param_dtype)
        self.up_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype=param_dtype)
        self.down_proj = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=std, dtype=param_dtype)
        self.dtype = dtype

    def _w(self, p: nnx.Param) -> jax.Array:
        return p[...].astype(self.dtype)

    def grouped(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """rows [R, D] sorted by expert, group_sizes [E] -> [R, D]; rows past sum(group_sizes) give 0."""
        rows = rows.astype(self.dtype)
        gate = jax.lax.ragged_dot(rows, self._w(self.gate_proj), group_sizes)  # [R, F]
        up = jax.lax.ragged_dot(rows, self._w(self.up_proj), group_sizes)
        return jax.lax.ragged_dot(jax.nn.silu(gate) * up, self._w(self.down_proj), group_sizes)

    def dense(self, x: jax.Array, combine: jax.Array) -> jax.Array:
        """Every expert on every token: x [X, D], combine weights [X, E] -> [X, D]."""
        x = x.astype(self.dtype)
        gate = jnp.einsum("XD,EDF->XEF", x, self._w(self.gate_proj))
        up = jnp.einsum("XD,EDF->XEF", x, self._w(self.up_proj))
        y = jnp.einsum("XEF,EFD->XED", jax.nn.silu(gate) * up, self._w(self.down_proj))
        return jnp.einsum("XED,XE->XD", y, combine.astype(self.dtype))


class MoE(nnx.Module):
    """x [B, T, D] -> [B, T, D]: routed experts plus shared experts (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        d, e = cfg.d_model, m.n_routed_experts
        self.moe = m
        self.dtype, param_dtype = dtypes(cfg)
        # The router runs in float32. Shazeer: W_g and W_noise start at 0 (balanced load at init).
        router_std = 0.0 if m.router == "noisy" else cfg.init_std
        router_kw = dict(bias=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.router = Einsum((d,), (e,), ("embed",), ("experts",), std=router_std, **router_kw)
        self.noise_proj = (Einsum((d,), (e,), ("embed",), ("experts",), std=0.0, **router_kw)
                           if m.router == "noisy" else None)
        self.expert_bias = Buffer(jnp.zeros((e,), jnp.float32), axes=("experts",)) if m.router == "sigmoid" else None
        self.experts = RoutedExperts(e, d, m.moe_intermediate_size, std=cfg.init_std, dtype=self.dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        # Shared experts: n_shared_experts SwiGLU experts merged into one MLP of n times the width.
        shared_cfg = dataclasses.replace(cfg, mlp=dataclasses.replace(
            cfg.mlp, kind="swiglu", d_ff=m.n_shared_experts * m.shared_intermediate_size, bias=False, dropout=0.0))
        self.shared_mlp = MLP(shared_cfg, rngs=rngs) if m.n_shared_experts and not m.shared_expert_gate else None
        self.gated_shared_mlp = MLP(shared_cfg, rngs=rngs) if m.n_shared_experts and m.shared_expert_gate else None
        self.shared_mlp_gate = (Einsum((d,), (), ("embed",), (), bias=False, std=cfg.init_std, dtype=self.dtype,
                                       param_dtype=param_dtype, rngs=rngs) if self.gated_shared_mlp else None)
        # Training mode (model.train(), like nnx.Dropout): router noise on (drawn from the dropout
        # stream), aux losses and expert loads recorded. Eval mode records nothing.
        self.deterministic = True
        self.rngs = rngs["dropout"].fork() if m.router == "noisy" else None

    @property
    def balances_by_bias(self) -> bool:
        """DeepSeek-V3: the selection bias moves by `update_router_bias` (sigmoid router, gamma > 0)."""
        return self.expert_bias is not None and self.moe.bias_update_rate > 0

    @property
    def records_load(self) -> bool:
        """Whether a forward now sows this layer's ExpertLoad: in training, where the bias uses it."""
        return not self.deterministic and self.balances_by_bias

    def record_load(self, counts: jax.Array) -> None:
        """Adds counts [E] to this layer's ExpertLoad (made on first use)."""
        self.sow(ExpertLoad, "expert_load", counts, init_fn=lambda: 0.0, reduce_fn=jnp.add)

    # -- routing ---------------------------------------------------------------------------------

    def _limit_groups(self, sel: jax.Array) -> jax.Array:
        """Selection scores [X, E] with the experts outside each token's best topk_group groups at -inf."""
        m = self.moe
        if m.n_group == 1:
            return sel
        grouped = sel.reshape(sel.shape[0], m.n_group, -1)  # [X, Q, P]
        if m.router == "sigmoid":
            group_scores = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(-1)  # [X, Q]
        else:
            group_scores = grouped.max(-1)
        _, best = jax.lax.top_k(group_scores, m.topk_group)  # [X, topk_group]
        keep = jax.nn.one_hot(best, m.n_group, dtype=jnp.bool_).any(-2)  # [X, Q]
        return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(sel.shape)

    def route(self, x: jax.Array, noise: jax.Array | None = None) -> Routing:
        """x [X, D] -> the experts each token picks and their weights. `noise` [X, E]: the noisy
        router's eps in training (None: drawn from the dropout stream); eval mode adds none."""
        m = self.moe
        k = m.num_experts_per_tok
        logits = self.router("XD,DE->XE", x)  # float32
        ranked, noise_std = logits, None
        if m.router == "softmax":
            scores = jax.nn.softmax(logits, axis=-1)
            sel, probs = scores, scores
        elif m.router == "sigmoid":
            scores = jax.nn.sigmoid(logits)
            sel = scores + self.expert_bias[...]
            probs = scores / scores.sum(-1, keepdims=True)
        else:
            if not self.deterministic:
                noise_std = jax.nn.softplus(self.noise_proj("XD,DE->XE", x))
                if noise is None:
                    noise = jax.random.normal(self.rngs(), logits.shape, jnp.float32)
                ranked = logits + noise.astype(jnp.float32) * noise_std
            scores = sel = ranked
            probs = jax.nn.softmax(ranked, axis=-1)
        _, idx = jax.lax.top_k(self._limit_groups(sel), k)  # [X, A]
        weights = jnp.take_along_axis(scores, idx, axis=-1)
        if m.router == "noisy":
            weights = jax.nn.softmax(weights, axis=-1)
        elif m.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
        weights = weights * m.routed_scaling_factor
        return Routing(idx, weights, probs, ranked, logits, noise_std)

    # -- dispatch --------------------------------------------------------------------------------

    def capacity(self, n_tokens: int) -> int:
        m = self.moe
        return math.ceil(n_tokens * m.num_experts_per_tok / m.n_routed_experts * m.capacity_factor)

    def __call__(self, x: jax.Array, router_noise: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; router_noise [B, T, E]: the noisy router's eps in training."""
        m = self.moe
        b, t, d = x.shape
        k, e = m.num_experts_per_tok, m.n_routed_experts
        xt = x.reshape(b * t, d)
        routing = self.route(xt, None if router_noise is None else router_noise.reshape(b * t, e))
        if not self.deterministic:  # training: what lm_loss and the V3 bias step consume
            for name, value in router_losses(m, routing).items():
                self.sow(AuxLoss, name, value)
            if self.records_load:
                self.record_load(jnp.bincount(routing.idx.reshape(-1), length=e).astype(jnp.float32))
        idx, weights = routing.idx, routing.weights
        keep = None if m.capacity_factor is None else within_capacity(idx, e, self.capacity(b * t))
        if keep is not None:
            weights = jnp.where(keep, weights, 0.0)
        if m.dispatch == "dense":
            combine = jnp.einsum("XAE,XA->XE", jax.nn.one_hot(idx, e, dtype=jnp.float32), weights)
            out = self.experts.dense(xt, combine)
        else:
            flat = idx.reshape(-1)  # [R], assignment r = token r // k, choice r % k
            key = flat if keep is None else jnp.where(keep.reshape(-1), flat, e)  # dropped rows sort last
            order = jnp.argsort(key, stable=True)
            group_sizes = jnp.bincount(key, length=e + 1)[:e].astype(jnp.int32)
            y = self.experts.grouped(xt[order // k], group_sizes)  # [R, D], sorted by expert
            y = y[jnp.argsort(order)].reshape(b * t, k, d)  # back to (token, choice) order
            out = jnp.einsum("XAD,XA->XD", y, weights.astype(y.dtype))
        out = out.reshape(b, t, d)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(x)
        if self.gated_shared_mlp is not None:
            gate = jax.nn.sigmoid(self.shared_mlp_gate("BTD,D->BT", x))
            out = out + gate[..., None] * self.gated_shared_mlp(x)
        return out.astype(self.dtype)


def router_losses(m: MoEConfig, r: Routing) -> dict[str, jax.Array]:
    """The auxiliary losses of one routing (see the module docstring), each times its coefficient;
    only those whose coefficient is nonzero."""
    n_tokens, e = r.probs.shape
    k = m.num_experts_per_tok
    picked = jax.nn.one_hot(r.idx, e, dtype=jnp.float32)  # [X, A, E]
    counts = picked.sum((0, 1))  # [E] tokens that picked each expert
    losses = {}
    if m.aux_loss_coef:
        balance = e / (k * n_tokens) * jnp.sum(counts * r.probs.mean(0))
        losses["balance_loss"] = m.aux_loss_coef * balance
    if m.z_loss_coef:
        losses["z_loss"] = m.z_loss_coef * jnp.mean(jax.nn.logsumexp(r.logits, axis=-1) ** 2)
    if m.router == "noisy" and m.importance_loss_coef:
        importance = jnp.einsum("XAE,XA->E", picked, r.weights)
        losses["importance_loss"] = m.importance_loss_coef * cv_squared(importance)
    if m.router == "noisy" and m.load_loss_coef:
        load = counts if r.noise_std is None or k == e else smooth_load(r.clean_logits, r.logits, r.noise_std, k)
        losses["load_loss"] = m.load_loss_coef * cv_squared(load)
    return losses


def within_capacity(idx: jax.Array, n_experts: int, capacity: int) -> jax.Array:
    """[X, A] booleans: an assignment is kept iff fewer than `capacity` earlier assignments (in
    (token, choice) order) went to the same expert."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by expert, token order within an expert
    sizes = jnp.bincount(flat, length=n_experts)
    starts = jnp.cumsum(sizes) - sizes
    rank_sorted = jnp.arange(flat.shape[0]) - starts[flat[order]]
    rank = jnp.zeros_like(flat).at[order].set(rank_sorted)
    return (rank < capacity).reshape(idx.shape)


def cv_squared(v: jax.Array) -> jax.Array:
    """Squared coefficient of variation, var / mean^2 (population variance; Shazeer's eps 1e-10)."""
    return jnp.var(v) / (jnp.mean(v) ** 2 + 1e-10)


def smooth_load(clean: jax.Array, noisy: jax.Array, noise_std: jax.Array, k: int) -> jax.Array:
    """Shazeer App. A: sum over tokens of P(expert i stays in the top-k under a fresh noise draw) [E]."""
    top = jax.lax.top_k(noisy, k + 1)[0]  # [X, k+1]
    threshold_if_in, threshold_if_out = top[:, k:], top[:, k - 1:k]
    is_in = noisy > threshold_if_in
    prob = jnp.where(is_in, jax.scipy.stats.norm.cdf((clean - threshold_if_in) / noise_std),
                     jax.scipy.stats.norm.cdf((clean - threshold_if_out) / noise_std))
    return prob.sum(0)


def init_expert_loads(module: nnx.Module) -> None:
    """A zero ExpertLoad on every MoE layer of `module` that will record one, made before a
    transform whose branches or steps must leave the state's structure as they found it
    (LayerDrop's nnx.cond, the recursion's fori_loop): the layers' forwards then add to it."""
    for _, m in nnx.iter_modules(module):
        if isinstance(m, MoE) and m.records_load:
            m.record_load(jnp.zeros((m.moe.n_routed_experts,), jnp.float32))


def pop_expert_load(model: nnx.Module) -> nnx.State:
    """The expert loads (`ExpertLoad`) that MoE layers of `model` recorded in training forwards
    since the last pop, removed from it: the argument of `update_router_bias`."""
    return nnx.pop(model, ExpertLoad)


def update_router_bias(model: nnx.Module, expert_load: nnx.State) -> None:
    """DeepSeek-V3 aux-loss-free balancing, called by the training step after the optimiser step
    with the step's loads, `pop_expert_load(model)`: for every sigmoid-router MoE layer with
    bias_update_rate gamma > 0, expert_bias_i -= gamma if expert i's load exceeds the layer's mean
    load, += gamma if below (unchanged if equal, as for a layer LayerDrop skipped: load 0).
    Works eagerly or inside `nnx.jit`."""
    loads = dict(nnx.to_flat_state(expert_load))
    for path, module in nnx.iter_graph(model):
        load = loads.get((*path, "expert_load"))
        if isinstance(module, MoE) and module.balances_by_bias and load is not None:
            load = load[...]
            module.expert_bias[...] += module.moe.bias_update_rate * jnp.sign(load.mean() - load)
