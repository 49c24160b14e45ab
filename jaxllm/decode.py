"""Decoding: KV caches, one jitted prefill + `lax.while_loop` per (batch, length bucket), the
sampling controls (greedy, temperature, top-k, top-p, min-p, repetition penalty, EOS and stop
sequences) and TiDAR self-speculative decoding. docs/sampling.md is the user's guide.

Letters: B batch, T new positions, S cache slots, V vocab, M stop sequences, L their length.

The model's one forward does every step: `model(tokens, positions, groups=..., cache=..., write=...)`
fills the cache (`model.init_cache`: per layer keys and values [B, K, S, H], or MLA's compressed
c_kv [B, S, C] and k_rope [B, S, K, R]; each slot's position; each row's committed length) and
builds the attention mask from positions itself. Time step t goes to slot t mod S, so with a
sliding window of W the cache is a rolling buffer of S = W slots (+ B slack slots for TiDAR);
without one S covers the prompt bucket plus the new tokens.

Batches of prompts of different lengths are left-padded to a common bucket P (a power of two),
position -1 marking padding; each row's positions start at 0 at its first real token. The loop
state is a `LoopState`; `prefill` and `step` (`ar_step`: one token per row, cached or a full
recompute; `tidar_step`: verify B drafts and draft the next B in one forward) are functions of it.
Without streaming, prefill and every step run inside one `jax.jit` (the cache never leaves the
device); with `on_token` the loop returns to the host after each forward.

`generate(..., cached=False)` recomputes the full window each step with `model(tokens)`: the
reference the cached path is tested against. A TiDAR model (model.diffusion) decodes
autoregressively like any causal model, with its [MASK] id never sampled, or self-speculatively
with `speculative=TiDAR(block, beta)`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.errors import DecodeError
from jaxllm.model.attention import DecodeCache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits, in Hugging Face's order: repetition penalty,
    then temperature, top-k, top-p, min-p, then a draw. temperature 0 is greedy (argmax after
    the repetition penalty)."""
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th kept); 0: off
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose mass is >= p; 1: off
    min_p: float = 0.0  # keep tokens with probability >= min_p * the top probability; 0: off
    repetition_penalty: float = 1.0  # seen tokens: positive logits / r, negative logits * r; 1: off

    def validate(self) -> "Sampling":
        checks = [("temperature", self.temperature, self.temperature >= 0, "a number >= 0 (0: greedy)"),
                  ("top_k", self.top_k, self.top_k >= 0, "an integer >= 0 (0: off)"),
                  ("top_p", self.top_p, 0 < self.top_p <= 1, "a number in (0, 1] (1: off)"),
                  ("min_p", self.min_p, 0 <= self.min_p <= 1, "a number in [0, 1] (0: off)"),
                  ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0,
                   "a number > 0 (1: off)")]
        for name, value, ok, allowed in checks:
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise DecodeError(f"{name} is {value!r}; allowed: {allowed}")
        return self

    def arrays(self) -> dict[str, jax.Array]:
        """The settings as traced scalars: changing them does not recompile the loop."""
        return dict(temperature=jnp.float32(self.temperature), top_k=jnp.int32(self.top_k),
                    top_p=jnp.float32(self.top_p), min_p=jnp.float32(self.min_p),
                    repetition_penalty=jnp.float32(self.repetition_penalty))


GREEDY = Sampling(temperature=0.0)
NEG_INF = -jnp.inf


# ---------------------------------------------------------------------------------------------
# Sampling controls: logits [B, V] float32 -> logits with the removed tokens at -inf. Each setting
# is one scalar for every row (`generate`) or one value per row [B] (the serving engine's slots).
# Top-k and top-p find each row's threshold by bisection over the logits' order rather than by
# sorting the row: XLA:CPU sorts a [32, 32000] batch in ~160 ms, one row at a time, where the 32
# bisection passes take ~4 ms (docs/perf.md, "Decoding on the CPU: argmax and sampling without a sort").


def _per_row(setting: jax.Array, logits: jax.Array) -> jax.Array:
    """A setting (a scalar, or [B]) shaped to scale logits [B, ..., V] row by row: [B, 1, ...]."""
    return jnp.broadcast_to(setting, logits.shape[:1]).reshape(logits.shape[:1] + (1,) * (logits.ndim - 1))


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (-0 just below +0): the float's bits with the sign bit
    set for a positive number and every bit flipped for a negative one."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_order_key(key: jax.Array) -> jax.Array:
    """The float32 of an `_order_key`."""
    return jax.lax.bitcast_convert_type(jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key), jnp.float32)


def _threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key k with sum(weights where keys >= k) >= target ([..., 1]), one bit at a
    time from the top: 32 masked sums over the row. With weights 1 and target k it is the k-th
    largest key; with probabilities and target p, the least likely token a top-p set needs."""
    def bit(i, found):
        candidate = found | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        enough = jnp.sum(jnp.where(keys >= candidate, weights, 0), axis=-1, keepdims=True) >= target
        return jnp.where(enough, candidate, found)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros((*keys.shape[:-1], 1), jnp.uint32))


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """Hugging Face's RepetitionPenaltyLogitsProcessor: for tokens seen in the prompt or the output
    (seen [B, V]), a negative logit is multiplied by the penalty and a positive one divided."""
    penalty = _per_row(penalty, logits)
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def apply_top_k(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep the logits >= the k-th largest of their row (k clipped to V); k = 0 keeps all."""
    k = _per_row(k, logits)
    count = jnp.clip(k, 1, logits.shape[-1]).astype(jnp.float32)  # counted exactly up to 2**24 tokens
    kth = _from_order_key(_threshold(_order_key(logits), jnp.ones(logits.shape, jnp.float32), count))
    return jnp.where((k > 0) & (logits < kth), NEG_INF, logits)


def apply_top_p(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability mass is >= p (the most likely
    token always stays): a token stays iff the mass of the tokens ranked before it is < p, equal
    logits ranked by index (a stable sort's order). Every token above the threshold level stays;
    of the tokens at it, those whose mass before (the level above plus their tied predecessors)
    is < p."""
    p = _per_row(p, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_key(logits)
    level = _threshold(keys, probs, p)
    above, at = keys > level, keys == level
    before = jnp.sum(jnp.where(above, probs, 0), axis=-1, keepdims=True)
    tied = jax.lax.cond(jnp.any(jnp.sum(at, axis=-1) > 1), lambda: jnp.cumsum(at, axis=-1) - 1,
                        lambda: jnp.zeros(at.shape, jnp.int32))  # each token's tied predecessors
    kept = above | (at & (before + tied * probs < p))
    return jnp.where(kept | (p >= 1.0), logits, NEG_INF)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens whose probability is >= min_p times the most likely token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs >= _per_row(min_p, logits) * probs.max(axis=-1, keepdims=True), logits, NEG_INF)


def filter_logits(logits: jax.Array, s: dict[str, jax.Array]) -> jax.Array:
    """Temperature, top-k, top-p and min-p, in that order; a filter no row uses is skipped by a
    `lax.cond` (no ranking when top-k and top-p are off)."""
    logits = logits / _per_row(jnp.maximum(s["temperature"], 1e-6), logits)
    identity = lambda x, _: x  # noqa: E731
    logits = jax.lax.cond(jnp.any(s["top_k"] > 0), apply_top_k, identity, logits, s["top_k"])
    logits = jax.lax.cond(jnp.any(s["top_p"] < 1.0), apply_top_p, identity, logits, s["top_p"])
    return jax.lax.cond(jnp.any(s["min_p"] > 0.0), apply_min_p, identity, logits, s["min_p"])


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis as int32: the first index of the largest value, or of the
    first NaN in a row that has one. Computed as a max and then the least index that reaches it:
    XLA:CPU runs jnp.argmax's joint (value, index) reduction on one thread, 4.5x slower at
    [32, 32000] and 6x at [1, 32000], ~20% of a batch-32 decode step on the llama-374m cut
    (docs/perf.md). NaNs are handled apart because XLA:CPU's max may drop them."""
    nan = jnp.isnan(logits)
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == top)
    return jnp.min(jnp.where(hit, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def draw(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A token drawn from softmax(logits) over the last axis by the Gumbel-max trick, what
    jax.random.categorical(key, logits) computes (the argmax of logits plus Gumbel noise of their
    shape), with `argmax`: 3.4x faster at [32, 32000] on XLA:CPU. `key`: one key for all of logits
    [B, ...], or one per row [B] (row b then draws what a batch of one draws with its key)."""
    if jnp.ndim(key) == 0:
        noise = jax.random.gumbel(key, logits.shape, logits.dtype)
    else:
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (1, *logits.shape[1:]), logits.dtype)[0])(key)
    return argmax(logits + noise)


def next_token(logits: jax.Array, seen: jax.Array, s: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """logits [B, V] -> tokens [B]: greedy where the temperature is 0, else a draw from the filtered
    logits. The settings `s` are scalars or one per row [B]; `key` one key or one per row (`draw`).

    The repetition penalty is elementwise and exact when off (x / 1 = x * 1 = x), so it always runs;
    when no row samples, the step costs one `lax.cond` (a scalar predicate on GPU) and an argmax."""
    logits = apply_repetition_penalty(logits, seen, s["repetition_penalty"])
    greedy = argmax(logits)
    sampled = jnp.broadcast_to(s["temperature"] > 0.0, greedy.shape)

    def sample():
        off = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # greedy rows: no filter decides anything
        settings = {name: jnp.where(sampled, s[name], value) for name, value in off.items()}
        return jnp.where(sampled, draw(key, filter_logits(logits, settings)), greedy)

    return jax.lax.cond(jnp.any(sampled), sample, lambda: greedy).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The cache


def never_sampled(cfg, logits: jax.Array) -> jax.Array:
    """TiDAR's [MASK] id is an input of training, never an output: its logit goes to -inf."""
    if not cfg.diffusion.enabled:
        return logits
    from jaxllm.model.diffusion import mask_token_id

    return logits.at[..., mask_token_id(cfg)].set(NEG_INF)


@dataclasses.dataclass(frozen=True)
class TiDAR:
    """TiDAR self-speculative decoding (papers.md §1.3, docs/sampling.md): each forward verifies
    the last block's drafts and drafts the next block for every possible acceptance. `block`: the
    draft length B (any B >= 1; a B(1+B)-token forward per step); `beta`: how much the verifier
    trusts the AR logits over the diffusion ones (1: exactly the AR model's tokens)."""
    block: int = 8
    beta: float = 1.0

    def validate(self, cfg) -> "TiDAR":
        if not cfg.diffusion.enabled:
            raise DecodeError("speculative TiDAR decoding needs a model trained with model.diffusion.enabled; "
                              "this model has no diffusion head")
        if not 1 <= self.block <= 64:
            raise DecodeError(f"block is {self.block!r}; allowed: an integer in 1..64")
        if not 0.0 <= self.beta <= 1.0:
            raise DecodeError(f"beta is {self.beta!r}; allowed: a number in [0, 1]")
        return self


@dataclasses.dataclass
class DecodeStats:
    """What speculative decoding did, per row: `accepted[b]` the number of drafts accepted at each
    forward after the prefill (each forward emits that many + 1 tokens)."""
    block: int
    accepted: list[list[int]]

    @property
    def forwards(self) -> int:
        return sum(len(a) for a in self.accepted)

    @property
    def tokens_per_forward(self) -> float:
        return sum(n + 1 for a in self.accepted for n in a) / max(self.forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over offered drafts (B - 1 per forward)."""
        return sum(sum(a) for a in self.accepted) / max(self.forwards * (self.block - 1), 1)

    def histogram(self) -> list[int]:
        """How many forwards accepted 0, 1, ..., B - 1 drafts."""
        counts = [0] * self.block
        for a in self.accepted:
            for n in a:
                counts[n] += 1
        return counts


# ---------------------------------------------------------------------------------------------
# The loop: a prefill, then steps, each a function of the loop state


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the compiled loop is specialised on (static)."""
    capacity: int  # new tokens the output buffer holds (a power of two)
    cached: bool
    padded: bool  # prompts of different lengths (left padding)
    block: int | None  # TiDAR's draft length, None: plain decoding
    cache_size: int | None = None  # time steps the cache holds; None: the prompt bucket + capacity (a server
    # fixes it, so that every slot's cache has one shape)

    def cache_steps(self, prompt_width: int) -> int:
        return prompt_width + self.capacity if self.cache_size is None else self.cache_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Request:
    """One call's inputs, as arrays: prompts [B, P] left-padded, their lengths [B], the traced
    sampling settings, EOS (-1: none), stop sequences [M, L] (right-aligned, -1 padded), the key,
    TiDAR's beta (traced too: changing it does not recompile)."""
    prompts: jax.Array
    lengths: jax.Array
    max_new: jax.Array
    sampling: dict
    eos_id: jax.Array
    stops: jax.Array
    key: jax.Array
    beta: jax.Array

    def positions(self, width: int) -> jax.Array:
        """[B, width] positions of the left-padded time steps 0..width-1 (-1: padding)."""
        positions = jnp.arange(width)[None] - (self.prompts.shape[1] - self.lengths)[:, None]
        return jnp.where(positions >= 0, positions, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """What the decode loop carries from step to step."""
    t: jax.Array  # forwards run after the prefill
    logits: jax.Array  # [B, V] the next token's logits (plain decoding)
    cache: DecodeCache | None  # the KV cache (cached decoding)
    context: jax.Array | None  # [B, P + capacity] prompt and output so far (full recompute)
    out: jax.Array  # [B, L-1 + capacity]: L-1 columns of -2, then the new tokens
    count: jax.Array  # [B] tokens emitted
    seen: jax.Array  # [B, V] tokens in the prompt or the output (repetition penalty)
    done: jax.Array  # [B]
    draft: jax.Array | None  # [B, block] TiDAR: the pending token and the drafts after it
    accepted: jax.Array | None  # [B, capacity] TiDAR: drafts accepted at each forward (-1: none)


def _stop_hit(out: jax.Array, end: jax.Array, stops: jax.Array) -> jax.Array:
    """[B]: does row b's output end, at its new token number end[b], with one of the stop
    sequences? out [B, L-1+N] (new token t at column L-1+t); stops [M, L] right-aligned, -1 padded."""
    def row(r, e):
        tail = jax.lax.dynamic_slice_in_dim(r, e, stops.shape[1])  # [L]
        return jnp.any(jnp.all((stops == -1) | (tail[None] == stops), axis=-1))
    return jax.vmap(row)(out, end)


def emit(state: LoopState, req: Request, tokens: jax.Array, n: jax.Array) -> LoopState:
    """The state after each unfinished row b emits tokens[b, :n[b]] (tokens [B, K]), cut at the
    first token that ends the row: EOS, a stop sequence, or max_new tokens in all."""
    b, k = tokens.shape
    n_stop = req.stops.shape[1]
    rows = jnp.arange(b)[:, None]
    index = state.count[:, None] + jnp.arange(k)  # [B, K] output index of each token
    out = state.out.at[rows, n_stop - 1 + index].set(tokens, mode="drop")
    ends = (tokens == req.eos_id) | jax.vmap(lambda i: _stop_hit(out, i, req.stops), 1, 1)(index)
    ends |= index + 1 >= req.max_new
    offered = jnp.arange(k)[None] < n[:, None]
    first_end = jnp.min(jnp.where(ends & offered, jnp.arange(k)[None], k), axis=1)
    emitted = jnp.where(state.done, 0, jnp.minimum(n, first_end + 1))
    kept = jnp.arange(k)[None] < emitted[:, None]
    seen = state.seen.at[rows, jnp.where(kept, tokens, state.seen.shape[1])].set(True, mode="drop")
    return dataclasses.replace(state, out=out, count=state.count + emitted, seen=seen,
                               done=state.done | (first_end < n))


def _empty_state(model, req: Request, plan: Plan, logits, cache, context) -> LoopState:
    cfg = model.cfg
    b, p = req.prompts.shape
    in_prompt = jnp.where(jnp.arange(p)[None] >= (p - req.lengths)[:, None], req.prompts, cfg.vocab_size)
    seen = jnp.zeros((b, cfg.vocab_size), bool).at[jnp.arange(b)[:, None], in_prompt].set(True, mode="drop")
    out = jnp.full((b, req.stops.shape[1] - 1 + plan.capacity), -2, jnp.int32)
    accepted = None if plan.block is None else jnp.full((b, plan.capacity), -1, jnp.int32)
    return LoopState(jnp.int32(0), logits, cache, context, out, jnp.zeros((b,), jnp.int32), seen,
                     jnp.zeros((b,), bool), None, accepted)


def prefill(model, req: Request, plan: Plan) -> LoopState:
    """The prompt in one forward: the first token's logits (and the filled cache)."""
    if plan.block is not None:
        return tidar_prefill(model, req, plan)
    b, p = req.prompts.shape
    if not plan.cached:
        context = jnp.concatenate([req.prompts, jnp.zeros((b, plan.capacity), jnp.int32)], axis=1)
        state = _empty_state(model, req, plan, None, None, context)
        return dataclasses.replace(state, logits=recompute_logits(model, req, plan, context, jnp.int32(0)))
    cache = model.init_cache(b, plan.cache_steps(p))
    logits, cache = model(req.prompts, req.positions(p), cache=cache, last_only=True)
    return _empty_state(model, req, plan, logits[:, 0], cache, None)


def recompute_logits(model, req: Request, plan: Plan, context: jax.Array, t: jax.Array) -> jax.Array:
    """The next token's logits [B, V] from a full forward of the context (no cache)."""
    p = req.prompts.shape[1]
    positions = req.positions(context.shape[1]) if plan.padded else None
    logits = model(context, positions)
    return jax.lax.dynamic_index_in_dim(logits, p - 1 + t, axis=1, keepdims=False)


def ar_step(model, req: Request, plan: Plan, state: LoopState) -> LoopState:
    """One token per row from the logits, then the next logits: one cached forward of the new
    token, or a full recompute of the context."""
    cfg = model.cfg
    key = jax.random.fold_in(req.key, state.t)
    token = next_token(never_sampled(cfg, state.logits), state.seen, req.sampling, key)
    state = emit(state, req, token[:, None], jnp.ones_like(token))
    if plan.cached:
        positions = (req.lengths + state.t)[:, None]
        logits, cache = model(token[:, None], positions, cache=state.cache, last_only=True)
        return dataclasses.replace(state, t=state.t + 1, logits=logits[:, 0], cache=cache)
    p = req.prompts.shape[1]
    context = jax.lax.dynamic_update_slice_in_dim(state.context, token[:, None], p + state.t, axis=1)
    return dataclasses.replace(state, t=state.t + 1, context=context,
                               logits=recompute_logits(model, req, plan, context, state.t + 1))


# ---------------------------------------------------------------------------------------------
# TiDAR: one forward verifies the drafts and drafts the next block (docs/sampling.md)


def tidar_layout(block: int) -> tuple[np.ndarray, np.ndarray]:
    """The step's token layout [d_0..d_{B-1} | M^(0) | ... | M^(B-1)]: each token's position
    offset from d_0's and its group (0: the drafts; j + 1: the mask block M^(j), which drafts for
    the hypothesis that d_1..d_j are accepted)."""
    j, k = np.divmod(np.arange(block * block), block)
    offsets = np.concatenate([np.arange(block), j + 1 + k]).astype(np.int32)
    groups = np.concatenate([np.zeros(block), j + 1]).astype(np.int32)
    return offsets, groups


def _mask_id(cfg) -> int:
    from jaxllm.model.diffusion import mask_token_id

    return mask_token_id(cfg)


PREFILL_KEY = 2**31 - 1


def tidar_prefill(model, req: Request, plan: Plan) -> LoopState:
    """The prompt plus one block of B mask tokens at the positions after it (they see the whole
    prompt and each other); only the prompt is written to the cache. The first token d_0 is
    picked from the mix of the last prompt token's logits and the first mask's, the drafts
    d_1.. are the argmax of the others."""
    cfg, block = model.cfg, plan.block
    b, p = req.prompts.shape
    tokens = jnp.concatenate([req.prompts, jnp.full((b, block), _mask_id(cfg), jnp.int32)], axis=1)
    positions = jnp.concatenate([req.positions(p), req.lengths[:, None] + jnp.arange(block)], axis=1)
    groups = jnp.concatenate([jnp.zeros(p, jnp.int32), jnp.ones(block, jnp.int32)])[None]
    cache = model.init_cache(b, plan.cache_steps(p), slack=block, per_row=True)
    logits, cache = model(tokens, positions, groups=groups, cache=cache, write=p)
    drafts = logits[:, p:]  # [B, block, V]
    state = _empty_state(model, req, plan, None, cache, None)
    mixed = req.beta * logits[:, p - 1] + (1 - req.beta) * drafts[:, 0]
    # the steps draw with fold_in(key, t), t < capacity: d_0's key is one no step uses, whatever the
    # capacity (so a server's slot, whose capacity is its context, draws as `generate` does)
    d0 = next_token(never_sampled(cfg, mixed), state.seen, req.sampling, jax.random.fold_in(req.key, PREFILL_KEY))
    draft = jnp.concatenate([d0[:, None], argmax(never_sampled(cfg, drafts[:, 1:]))], axis=1)
    state = emit(state, req, d0[:, None], jnp.ones_like(d0))
    return dataclasses.replace(state, draft=draft.astype(jnp.int32))


def verify(targets: jax.Array, draft: jax.Array, seen: jax.Array, s: dict, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How many drafts to accept and the token after them: targets [B, K, V] are the verifier's
    logits at d_0..d_{K-1} (target j predicts d_{j+1}), draft [B, K]. Returns n [B] (0..K-1) and
    the correction (or, when all K-1 are accepted, bonus) token y [B].

    Greedy (temperature 0): accept while d_{j+1} is the argmax of target j. Sampling: the drafts
    are argmax tokens, a one-hot draft distribution, so exact speculative sampling is: accept
    d_{j+1} with probability p_j(d_{j+1}); at the first rejection draw from p_j with d_{j+1}
    removed; after K-1 acceptances draw from p_{K-1}. This draws exactly from the target model
    (our choice: the paper gives no stochastic rule). p_j has the sampling controls applied,
    with the repetition penalty seeing d_0..d_j as well."""
    b, k, v = targets.shape
    seen_j = seen[:, None] | (jnp.cumsum(jax.nn.one_hot(draft, v, dtype=jnp.int32), axis=1) > 0)  # [B, K, V]
    logits = apply_repetition_penalty(targets, seen_j, s["repetition_penalty"]).reshape(b * k, v)
    nxt = jnp.concatenate([draft[:, 1:], jnp.zeros((b, 1), draft.dtype)], axis=1)  # d_{j+1}; none for j = K-1
    last = jnp.arange(k)[None] == k - 1

    def first_rejection(accept):  # [B, K-1] -> n [B]
        return jnp.sum(jnp.cumprod(accept, axis=1), axis=1) if k > 1 else jnp.zeros((b,), jnp.int32)

    def greedy():
        y = argmax(logits).reshape(b, k)
        n = first_rejection((y[:, :-1] == draft[:, 1:]).astype(jnp.int32))
        return n, jnp.take_along_axis(y, n[:, None], axis=1)[:, 0]

    def sampled():
        k_accept, k_draw = jax.random.split(key)
        filtered = filter_logits(logits, s).reshape(b, k, v)
        probs = jax.nn.softmax(filtered, axis=-1)
        p_draft = jnp.take_along_axis(probs, nxt[..., None], axis=-1)[..., 0]  # [B, K]
        accept = jax.random.uniform(k_accept, (b, k)) < p_draft
        n = first_rejection(accept[:, :-1].astype(jnp.int32))
        residual = jnp.where((jax.nn.one_hot(nxt, v, dtype=bool) & ~last[..., None]), NEG_INF, filtered)
        y = draw(k_draw, residual)  # [B, K]
        return n, jnp.take_along_axis(y, n[:, None], axis=1)[:, 0]

    n, y = jax.lax.cond(s["temperature"] > 0.0, sampled, greedy)
    return n.astype(jnp.int32), y.astype(jnp.int32)


def tidar_step(model, req: Request, plan: Plan, state: LoopState) -> LoopState:
    """One forward of [d_0..d_{B-1} | M^(0) .. M^(B-1)] (q_len = B(1+B)): the drafts' keys and
    values are written to the cache, the mask tokens' never. Verification commits d_0..d_n (the
    cache's committed length grows by n + 1: the rejected drafts' slots are rolled back), emits
    d_1..d_n and y_n, and the next block is [y_n | argmax of M^(n)'s logits 1..B-1]."""
    cfg, block = model.cfg, plan.block
    b = state.draft.shape[0]
    offsets, groups = tidar_layout(block)
    start = req.lengths + state.count - 1  # d_0's position: the last emitted token
    tokens = jnp.concatenate([state.draft, jnp.full((b, block * block), _mask_id(cfg), jnp.int32)], axis=1)
    step_before = state.cache.step
    logits, cache = model(tokens, start[:, None] + offsets, groups=jnp.asarray(groups)[None], cache=state.cache,
                          write=block)
    ar, drafts = logits[:, :block], logits[:, block:].reshape(b, block, block, -1)  # drafts[:, j, k]: M^(j)_k
    targets = never_sampled(cfg, req.beta * ar + (1 - req.beta) * drafts[:, :, 0])
    n, y = verify(targets, state.draft, state.seen, req.sampling, jax.random.fold_in(req.key, state.t))
    k = jnp.arange(block)[None]
    emitted = jnp.where(k < n[:, None], jnp.roll(state.draft, -1, axis=1), y[:, None])  # d_1..d_n, y_n
    accepted = state.accepted.at[:, state.t].set(jnp.where(state.done, -1, n))
    active = ~state.done
    state = emit(state, req, emitted, n + 1)
    hypothesis = jnp.take_along_axis(drafts, n[:, None, None, None], axis=1)[:, 0]  # [B, block, V] M^(n)
    draft = jnp.concatenate([y[:, None], argmax(never_sampled(cfg, hypothesis[:, 1:]))], axis=1)
    cache = cache.rollback(jnp.where(active, step_before + n + 1, step_before))
    return dataclasses.replace(state, t=state.t + 1, cache=cache, accepted=accepted,
                               draft=jnp.where(active[:, None], draft.astype(jnp.int32), state.draft))


def step(model, req: Request, plan: Plan, state: LoopState) -> LoopState:
    return ar_step(model, req, plan, state) if plan.block is None else tidar_step(model, req, plan, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _run(graphdef, state, req: Request, *, plan: Plan) -> LoopState:
    """Prefill and every step in one compiled `while_loop`: the cache never leaves the device."""
    model = nnx.merge(graphdef, state)
    loop = prefill(model, req, plan)
    return jax.lax.while_loop(lambda s: (s.t < plan.capacity) & ~jnp.all(s.done),
                              lambda s: step(model, req, plan, s), loop)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _prefill(graphdef, state, req: Request, *, plan: Plan) -> LoopState:
    return prefill(nnx.merge(graphdef, state), req, plan)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("loop",))
def _step(graphdef, state, req: Request, loop: LoopState, *, plan: Plan) -> LoopState:
    return step(nnx.merge(graphdef, state), req, plan, loop)


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`): prompts and lengths are padded to these so
    that a few compiled loops serve every request."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


# The most new tokens one request may ask for: lengths and counts go to the decode loop as int32
# (a longer request is a typo: at 1 ms a token, 2**31 tokens take 25 days).
MAX_NEW_TOKENS = 2**31 - 1


def check_max_new_tokens(n: int, name: str = "max_new_tokens") -> None:
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise DecodeError(f"{name} is {n}; allowed: an integer in 1..{MAX_NEW_TOKENS} (2**31 - 1: decode "
                          f"lengths are int32)")


def validate_request(cfg, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None) -> None:
    """One-line DecodeErrors for what no model can decode: no prompt, an empty one, one that fills
    the context, token ids outside the vocabulary, a length outside 1..MAX_NEW_TOKENS."""
    if not prompts:
        raise DecodeError("no prompts given; give at least one")
    for i, ids in enumerate(prompts):
        if not len(ids):
            raise DecodeError(f"prompt {i} is empty; a prompt needs at least one token")
        if len(ids) >= cfg.max_seq_len:
            raise DecodeError(f"prompt {i} is {len(ids)} tokens; the context holds {cfg.max_seq_len}, "
                              f"so a prompt may have at most {cfg.max_seq_len - 1}")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise DecodeError(f"prompt {i} has token id {bad[0]}; allowed: 0..{cfg.vocab_size - 1}")
    check_max_new_tokens(max_new_tokens)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise DecodeError(f"eos_id is {eos_id}; allowed: 0..{cfg.vocab_size - 1} or none")


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = GREEDY,
             eos_id: int | None = None, stop_sequences: Sequence[Sequence[int]] = (), seed: int = 0,
             cached: bool = True, on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
             speculative: TiDAR | None = None, return_stats: bool = False):
    """The new tokens of each prompt (token ids), up to and including an EOS or a stop sequence;
    with `return_stats`, (tokens, DecodeStats).

    At most `max_new_tokens`, and never past the context (`model.cfg.max_seq_len` positions in
    all). `on_token(tokens [B], active [B])` is called after every emitted token when given
    (streaming: the loop then returns to the host after every forward). Draws are seeded by
    `seed`: the same call gives the same tokens. `speculative=TiDAR(block, beta)` decodes with
    TiDAR's drafts (a model trained with model.diffusion; needs the cache).
    """
    cfg = model.cfg
    sampling.validate()
    if speculative is not None:
        speculative.validate(cfg)
        if not cached:
            raise DecodeError("speculative decoding needs the KV cache; drop --no-cache")
    prompts = [list(map(int, ids)) for ids in prompts]
    validate_request(cfg, prompts, max_new_tokens, eos_id)
    lengths = np.array([len(ids) for ids in prompts], np.int32)
    max_new = min(max_new_tokens, cfg.max_seq_len - int(lengths.max()))
    p = bucket(int(lengths.max())) if cached else int(lengths.max())
    batch = np.zeros((len(prompts), p), np.int32)
    for row, ids in zip(batch, prompts):
        row[p - len(ids):] = ids
    stops = [list(map(int, s)) for s in stop_sequences if len(s)]
    width = max([len(s) for s in stops], default=1)
    stop_array = np.full((len(stops), width), -1, np.int32)
    for row, s in zip(stop_array, stops):
        row[width - len(s):] = s
    req = Request(jnp.asarray(batch), jnp.asarray(lengths), jnp.int32(max_new), sampling.arrays(),
                  jnp.int32(-1 if eos_id is None else eos_id), jnp.asarray(stop_array), jax.random.key(seed),
                  jnp.float32(1.0 if speculative is None else speculative.beta))
    plan = Plan(capacity=bucket(max_new), cached=cached, padded=bool((lengths != p).any()),
                block=None if speculative is None else speculative.block)
    graphdef, state = nnx.split(model.for_inference())
    if on_token is None:
        loop = _run(graphdef, state, req, plan=plan)
    else:
        loop = _prefill(graphdef, state, req, plan=plan)
        shown = _stream(on_token, loop, np.zeros(len(prompts), np.int64), width - 1)
        while not bool(np.all(np.asarray(loop.done))) and int(loop.t) < plan.capacity:
            loop = _step(graphdef, state, req, loop, plan=plan)
            shown = _stream(on_token, loop, shown, width - 1)
    out, counts = np.asarray(loop.out)[:, width - 1:], np.asarray(loop.count)
    tokens = [out[i, :counts[i]].tolist() for i in range(len(prompts))]
    if not return_stats:
        return tokens
    accepted = np.asarray(loop.accepted) if loop.accepted is not None else np.full((len(prompts), 0), -1)
    stats = DecodeStats(1 if speculative is None else speculative.block,
                        [[int(n) for n in row if n >= 0] for row in accepted])
    return tokens, stats


def _stream(on_token, loop: LoopState, shown: np.ndarray, offset: int) -> np.ndarray:
    """Hand the tokens each row emitted since `shown` to on_token, one output column at a time;
    returns the new counts."""
    out, counts = np.asarray(loop.out)[:, offset:], np.asarray(loop.count)
    for i in range(int(shown.min()), int(counts.max())):
        active = (shown <= i) & (i < counts)
        if active.any():
            on_token(np.where(active, out[:, i], 0), active)
    return counts


def generate_long(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int = 0,
                  cached: bool = True, return_stats: bool = False, **kwargs):
    """`generate`, continuing past the context: when the context is full, the last half of each
    unfinished row (prompt and output so far) becomes its prompt for the next chunk, as
    llama.cpp's context shift does (chunk c draws with seed + c). Rows that meet EOS or a stop
    sequence end as in `generate`. With `return_stats`, (tokens, the chunks' DecodeStats joined)."""
    cfg = model.cfg
    keep = max(1, cfg.max_seq_len // 2)
    contexts = [list(map(int, p)) for p in prompts]
    outs: list[list[int]] = [[] for _ in contexts]
    active = list(range(len(contexts)))
    chunk = 0
    speculative = kwargs.get("speculative")
    stats = DecodeStats(1 if speculative is None else speculative.block, [[] for _ in contexts])
    while active:
        remaining = max_new_tokens - len(outs[active[0]])  # unfinished rows all have the same count
        if remaining <= 0:
            break
        limit = min(remaining, cfg.max_seq_len - max(len(contexts[r]) for r in active))
        new, chunk_stats = generate(model, [contexts[r] for r in active], max_new_tokens=remaining,
                                    seed=seed + chunk, cached=cached, return_stats=True, **kwargs)
        still = []
        for r, tokens, accepted in zip(active, new, chunk_stats.accepted):
            stats.accepted[r] += accepted
            outs[r] += tokens
            ended = len(tokens) < limit or (tokens and (tokens[-1] == kwargs.get("eos_id") or any(
                len(s) and outs[r][-len(s):] == list(s) for s in kwargs.get("stop_sequences", ()))))
            if not ended:
                still.append(r)
                contexts[r] = (contexts[r] + tokens)[-keep:]
        active, chunk = still, chunk + 1
    return (outs, stats) if return_stats else outs
