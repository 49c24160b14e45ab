"""Decoding: KV caches, one jitted prefill + `lax.while_loop` per (batch, length bucket), and
the sampling controls (greedy, temperature, top-k, top-p, min-p, repetition penalty, EOS and stop
sequences). docs/sampling.md is the user's guide.

Letters: B batch, T new positions, S cache slots, V vocab, M stop sequences, L their length.

Caches (one per layer, made by the layer's `init_cache`; `model.init_cache` gathers them in a
`DecodeCache`, and the model's one forward, `model(tokens, positions, mask, cache=...)`, fills it):
- MHA / GQA / MQA: keys and values [B, S, K, H];
- MLA: the compressed cache, normalised c_kv [B, S, C] and rotated k_rope [B, S, K, R]
  (K = 1 for DeepSeek): C + R numbers per token and layer; steps attend with absorbed weights.
Every slot's token position is kept once for all layers, `slot_positions` [B, S] (-1: empty or
padding), and the attention mask of every step is built from it (`position_mask`): a query at
position i sees the slots holding positions i - W + 1 .. i. Time step t goes to slot t mod S, so
with a sliding window of W the cache is a rolling buffer of S = W slots; without one S covers the
prompt bucket plus the new tokens.

Batches of prompts of different lengths are left-padded to a common bucket P (a power of two):
every row writes the same slot each step, and each row's positions start at 0 at its first real
token. The prompt is prefilled in one forward; then one token per step, all inside one
`jax.jit` (the cache never leaves the device). Streaming, when asked for, is a
`jax.debug.callback` per step; without it the loop has no host round trip.

`generate(..., cached=False)` recomputes the full window each step with `model(tokens)`: the
reference the cached path is tested against, and the path for models the cache does not cover yet
(model.recursion). A TiDAR model (model.diffusion) decodes autoregressively like any causal model,
with its [MASK] id never sampled; TiDAR's self-speculative decoding is not built yet.
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
from jaxllm.model.attention import position_mask, write_cache


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
# Sampling controls: logits [B, V] float32 -> logits with the removed tokens at -inf


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """Hugging Face's RepetitionPenaltyLogitsProcessor: for tokens seen in the prompt or the output
    (seen [B, V]), a negative logit is multiplied by the penalty and a positive one divided."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def apply_top_k(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep the logits >= the k-th largest (k clipped to V); k = 0 keeps all."""
    v = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take(descending, jnp.clip(k, 1, v) - 1, axis=-1)[:, None]
    return jnp.where((k > 0) & (logits < kth), NEG_INF, logits)


def apply_top_p(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability mass is >= p (the most likely
    token always stays): a token stays iff the mass of the tokens ranked before it is < p."""
    order = jnp.argsort(-logits, axis=-1)  # stable: equal logits keep index order
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < p
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    return jnp.where(keep | (p >= 1.0), logits, NEG_INF)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens whose probability is >= min_p times the most likely token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs >= min_p * probs.max(axis=-1, keepdims=True), logits, NEG_INF)


def filter_logits(logits: jax.Array, s: dict[str, jax.Array]) -> jax.Array:
    """Temperature, top-k, top-p and min-p, in that order; each filter that is off is skipped by a
    `lax.cond` (no sort when top-k and top-p are off)."""
    logits = logits / jnp.maximum(s["temperature"], 1e-6)
    identity = lambda x, _: x  # noqa: E731
    logits = jax.lax.cond(s["top_k"] > 0, apply_top_k, identity, logits, s["top_k"])
    logits = jax.lax.cond(s["top_p"] < 1.0, apply_top_p, identity, logits, s["top_p"])
    return jax.lax.cond(s["min_p"] > 0.0, apply_min_p, identity, logits, s["min_p"])


def next_token(logits: jax.Array, seen: jax.Array, s: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """logits [B, V] -> tokens [B]: greedy when temperature is 0, else a draw from the filtered logits.

    The repetition penalty is elementwise and exact when off (x / 1 = x * 1 = x), so it always runs;
    the greedy path costs one `lax.cond` (a scalar predicate per step on GPU), no sort."""
    logits = apply_repetition_penalty(logits, seen, s["repetition_penalty"])
    greedy = jnp.argmax(logits, axis=-1)
    return jax.lax.cond(s["temperature"] > 0.0,
                        lambda: jax.random.categorical(key, filter_logits(logits, s), axis=-1),
                        lambda: greedy).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The cache


def check_cacheable(cfg) -> None:
    """The KV cache covers stacks of layers run once each; a looped core must decode with
    cached=False (full recompute) for now. (A TiDAR model decodes as the causal model it also is.)"""
    if cfg.recursion.mode != "none":
        raise DecodeError(f"the KV cache does not support model.recursion.mode={cfg.recursion.mode!r} yet; "
                          f"decode without the cache (--no-cache)")


def never_sampled(cfg, logits: jax.Array) -> jax.Array:
    """TiDAR's [MASK] id is an input of training, never an output: its logit goes to -inf."""
    if not cfg.diffusion.enabled:
        return logits
    from jaxllm.model.diffusion import mask_token_id

    return logits.at[:, mask_token_id(cfg)].set(NEG_INF)


def cache_size(cfg, total: int) -> int:
    """Slots per layer: every step of the bucket, or the last `window` of them (a rolling buffer)."""
    window = cfg.attention.window
    return total if window is None else min(window, total)


def forward_step(model, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache):
    """The model's forward with the cache, logits of the last position only: float32 [B, V] and
    the updated cache."""
    logits, cache = model(tokens, positions, mask, cache=cache, last_only=True)
    return logits[:, 0], cache


# ---------------------------------------------------------------------------------------------
# The loop

_stream_handler: list[Callable | None] = [None]


def _stream(tokens, active) -> None:
    handler = _stream_handler[0]
    if handler is not None:
        handler(np.asarray(tokens), np.asarray(active))


def _eval_model(graphdef, state):
    """A fresh eval-mode module of the state (an eval forward mutates nothing, so the decode loop
    reuses it at every step)."""
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    model.eval()
    return model


def _compute_state(graphdef, state):
    """The state with every matmul weight already in its layer's compute dtype. Layers cast their
    float32 weights at each use (`weight.astype(dtype)`); done once here, before the loop, each step
    reads bfloat16 weights instead of reading float32 and converting: half the memory traffic of
    a decode step, with the same numbers (the same cast, done earlier). Norms and routers, which
    compute in float32, keep their float32 weights."""
    from jaxllm.model.embeddings import Embed
    from jaxllm.model.moe import RoutedExperts
    from jaxllm.model.params import Einsum
    from jaxllm.model.transformer import LMHead

    model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables: the caller's stay as they are
    for _, module in nnx.iter_modules(model):
        if not isinstance(module, (Einsum, Embed, LMHead, RoutedExperts)):  # the layers that cast at use
            continue
        dtype = module.dtype
        for name in ("weight", "bias", "gate_proj", "up_proj", "down_proj"):
            var = getattr(module, name, None)
            if isinstance(var, nnx.Param) and jnp.issubdtype(var.dtype, jnp.floating) and var.dtype != dtype:
                var.set_value(var[...].astype(dtype))
    return nnx.state(model)


def _stop_hit(out: jax.Array, t: jax.Array, stops: jax.Array) -> jax.Array:
    """[B]: does the output end with one of the stop sequences? out [B, L-1+N] holds L-1 columns
    of -2 then the new tokens (token t at column L-1+t); stops [M, L] are right-aligned, -1 padded."""
    tail = jax.lax.dynamic_slice_in_dim(out, t, stops.shape[1], axis=1)  # [B, L]
    match = (stops[None] == -1) | (tail[:, None] == stops[None])  # [B, M, L]
    return jnp.any(jnp.all(match, axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "cached", "padded", "stream", "max_seq_len"))
def _generate(graphdef, state, prompts, lengths, max_new, sampling, eos_id, stops, key, *,
              capacity: int, cached: bool, padded: bool, stream: bool, max_seq_len: int):
    """prompts [B, P] left-padded, lengths [B] -> (tokens [B, capacity], counts [B])."""
    state = _compute_state(graphdef, state)
    model = _eval_model(graphdef, state)
    cfg = model.cfg
    b, p = prompts.shape
    n_stop = stops.shape[1]
    pad = p - lengths
    if cached:
        time = jnp.arange(p)
        slot_pos = jnp.full((b, cache_size(cfg, p + capacity)), -1, jnp.int32)
        positions = time[None] - pad[:, None]
        valid = jnp.where(positions >= 0, positions, -1)
        mask = position_mask(valid, valid, cfg.attention.window) | jnp.eye(p, dtype=bool)  # padding sees itself
        cache = model.init_cache(b, slot_pos.shape[1])
        logits, cache = forward_step(model, prompts, jnp.maximum(positions, 0), mask, cache)
        mode_state = (cache, write_cache(slot_pos, valid, jnp.int32(0)))
    else:
        full = jnp.concatenate([prompts, jnp.zeros((b, capacity), jnp.int32)], axis=1)
        positions = jnp.arange(p + capacity)[None] - pad[:, None]
        valid = jnp.where(positions >= 0, positions, -1)
        full_mask = (position_mask(valid, valid, cfg.attention.window) | jnp.eye(p + capacity, dtype=bool)
                     if padded else None)
        full_positions = jnp.clip(positions, 0, max_seq_len - 1)

        def full_logits(tokens, t):
            logits = model(tokens, full_positions, full_mask)
            return jax.lax.dynamic_index_in_dim(logits, p - 1 + t, axis=1, keepdims=False)

        logits = full_logits(full, 0)
        mode_state = full

    in_prompt = jnp.where(jnp.arange(p)[None] >= pad[:, None], prompts, cfg.vocab_size)  # padding: dropped
    seen = jnp.zeros((b, cfg.vocab_size), bool).at[jnp.arange(b)[:, None], in_prompt].set(True, mode="drop")
    out = jnp.full((b, n_stop - 1 + capacity), -2, jnp.int32)
    carry = (jnp.int32(0), logits, mode_state, out, seen, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))

    def cond(carry):
        t, *_, done, _ = carry
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, logits, mode_state, out, seen, done, counts = carry
        token = next_token(never_sampled(cfg, logits), seen, sampling, jax.random.fold_in(key, t))
        token = jnp.where(done, 0, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], n_stop - 1 + t, axis=1)
        counts = counts + (~done).astype(jnp.int32)
        seen = seen.at[jnp.arange(b), token].set(True)
        if stream:
            jax.debug.callback(_stream, token, ~done, ordered=True)
        done = done | (token == eos_id) | _stop_hit(out, t, stops)
        if cached:
            cache, slot_pos = mode_state
            q_pos = (lengths + t)[:, None]
            slot_pos = write_cache(slot_pos, q_pos, cache.step)  # cache.step = p + t
            mask = position_mask(q_pos, slot_pos, cfg.attention.window)
            logits, cache = forward_step(model, token[:, None], q_pos, mask, cache)
            mode_state = (cache, slot_pos)
        else:
            mode_state = jax.lax.dynamic_update_slice_in_dim(mode_state, token[:, None], p + t, axis=1)
            logits = full_logits(mode_state, t + 1)
        return t + 1, logits, mode_state, out, seen, done, counts

    t, _, _, out, _, _, counts = jax.lax.while_loop(cond, body, carry)
    return out[:, n_stop - 1:], counts


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`): prompts and lengths are padded to these so
    that a few compiled loops serve every request."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def validate_request(cfg, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None) -> None:
    """One-line DecodeErrors for what no model can decode: no prompt, an empty one, one that fills
    the context, token ids outside the vocabulary, a length below 1."""
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
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens is {max_new_tokens}; allowed: an integer >= 1")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise DecodeError(f"eos_id is {eos_id}; allowed: 0..{cfg.vocab_size - 1} or none")


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = GREEDY,
             eos_id: int | None = None, stop_sequences: Sequence[Sequence[int]] = (), seed: int = 0,
             cached: bool = True, on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
             ) -> list[list[int]]:
    """The new tokens of each prompt (token ids), up to and including an EOS or a stop sequence.

    At most `max_new_tokens`, and never past the context (`model.cfg.max_seq_len` positions in
    all). `on_token(tokens [B], active [B])` is called after every step when given (streaming).
    Draws are seeded by `seed`: the same call gives the same tokens.
    """
    cfg = model.cfg
    sampling.validate()
    prompts = [list(map(int, ids)) for ids in prompts]
    validate_request(cfg, prompts, max_new_tokens, eos_id)
    if cached:
        check_cacheable(cfg)
    lengths = np.array([len(ids) for ids in prompts], np.int32)
    max_new = min(max_new_tokens, cfg.max_seq_len - int(lengths.max()))
    p = bucket(int(lengths.max())) if cached else int(lengths.max())
    capacity = bucket(max_new)
    batch = np.zeros((len(prompts), p), np.int32)
    for row, ids in zip(batch, prompts):
        row[p - len(ids):] = ids
    stops = [list(map(int, s)) for s in stop_sequences if len(s)]
    width = max([len(s) for s in stops], default=1)
    stop_array = np.full((len(stops), width), -1, np.int32)
    for row, s in zip(stop_array, stops):
        row[width - len(s):] = s
    graphdef, state = nnx.split(model)
    _stream_handler[0] = on_token
    try:
        out, counts = _generate(graphdef, state, jnp.asarray(batch), jnp.asarray(lengths), jnp.int32(max_new),
                                sampling.arrays(), jnp.int32(-1 if eos_id is None else eos_id),
                                jnp.asarray(stop_array), jax.random.key(seed), capacity=capacity, cached=cached,
                                padded=bool((lengths != p).any()), stream=on_token is not None,
                                max_seq_len=cfg.max_seq_len)
        out, counts = np.asarray(out), np.asarray(counts)
    finally:
        _stream_handler[0] = None
    return [out[i, :counts[i]].tolist() for i in range(len(prompts))]


def needs_full_recompute(cfg) -> bool:
    """Whether the KV cache does not cover this model yet (see `check_cacheable`)."""
    try:
        check_cacheable(cfg)
    except DecodeError:
        return True
    return False


def generate_long(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int = 0,
                  cached: bool | None = None, **kwargs) -> list[list[int]]:
    """`generate`, continuing past the context: when the context is full, the last half of each
    unfinished row (prompt and output so far) becomes its prompt for the next chunk, as
    llama.cpp's context shift does (chunk c draws with seed + c). Rows that meet EOS or a stop
    sequence end as in `generate`. cached=None: the cache wherever the model allows it."""
    cfg = model.cfg
    cached = not needs_full_recompute(cfg) if cached is None else cached
    keep = max(1, cfg.max_seq_len // 2)
    contexts = [list(map(int, p)) for p in prompts]
    outs: list[list[int]] = [[] for _ in contexts]
    active = list(range(len(contexts)))
    chunk = 0
    while active:
        remaining = max_new_tokens - len(outs[active[0]])  # unfinished rows all have the same count
        if remaining <= 0:
            break
        limit = min(remaining, cfg.max_seq_len - max(len(contexts[r]) for r in active))
        new = generate(model, [contexts[r] for r in active], max_new_tokens=remaining, seed=seed + chunk,
                       cached=cached, **kwargs)
        still = []
        for r, tokens in zip(active, new):
            outs[r] += tokens
            ended = len(tokens) < limit or (tokens and (tokens[-1] == kwargs.get("eos_id") or any(
                len(s) and outs[r][-len(s):] == list(s) for s in kwargs.get("stop_sequences", ()))))
            if not ended:
                still.append(r)
                contexts[r] = (contexts[r] + tokens)[-keep:]
        active, chunk = still, chunk + 1
    return outs
