"""The serving engine: continuous batching over one jitted decode step (docs/serving.md).

A fixed number of sequence slots share one per-row KV cache (`Transformer.init_cache(N, S,
per_row=True)`, S = the model's context). A request's sequence joins a free slot as a prefill (one
row, its prompt left-padded to a power-of-two bucket, so a few compiled prefills serve every
length) whose cache row is copied into the slot (`Transformer.insert_cache`); then every step
draws one token for each slot and runs one cached forward of all of them, whatever mix of
requests they hold: one compiled step, never recompiled. A sequence leaves its slot when it ends
(EOS, a stop string, max_tokens, the context) or its client goes away, and the next waiting one
takes it.

Each slot carries its own sampling settings and key (token t is drawn with fold_in(key(seed), t),
as `jaxllm.decode.generate` draws row 0), so a request decodes to the same tokens alone or among
others, and as `generate` with the same seed. Stop strings are matched on the decoded text, on the
host, after each step (a stop string may span tokens).

The engine runs on its own thread (`start`); `submit` is thread-safe and returns a `Job` whose
events (`Event`) go to the caller's callback.

Letters: N slots, S cache slots per row, P prompt bucket, V vocab, K top logprobs kept.
"""
from __future__ import annotations

import dataclasses
import functools
import queue
import secrets
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.decode import (LoopState, Plan, Request, Sampling, TiDAR, bucket, never_sampled, next_token, tidar_prefill,
                           tidar_step)
from jaxllm.model.attention import DecodeCache

TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's chat limit)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """The device state of every slot: the shared cache and, per slot, the next token's logits
    [N, V], the position of the token to feed next [N], the tokens seen (repetition penalty) [N, V],
    the key and the number of tokens drawn [N], and the sampling settings (a dict of [N] arrays)."""
    cache: DecodeCache
    logits: jax.Array
    position: jax.Array
    seen: jax.Array
    key: jax.Array
    t: jax.Array
    sampling: dict


def _logprobs(logits: jax.Array, tokens: jax.Array, k: int):
    """The model's (unfiltered) log-probabilities of `tokens` and its top k: logits [..., V]."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(lp, k)
    return chosen, top_ids, top_lp


@functools.partial(jax.jit, static_argnames=("graphdef", "size"))
def _prefill(graphdef, state, prompt: jax.Array, length: jax.Array, *, size: int):
    """One left-padded prompt [1, P] into a fresh one-row cache of `size` slots: (the next token's
    logits [1, V], the cache)."""
    model = nnx.merge(graphdef, state)
    p = prompt.shape[1]
    positions = jnp.arange(p)[None] - (p - length)
    cache = model.init_cache(1, size, per_row=True)
    logits, cache = model(prompt, jnp.where(positions >= 0, positions, -1), cache=cache, last_only=True)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("slots",))
def _insert(graphdef, state, slots: Slots, row: DecodeCache, logits, slot, position, seen, key, sampling) -> Slots:
    model = nnx.merge(graphdef, state)

    def put(x, value):
        return x.at[slot].set(value)

    return Slots(model.insert_cache(slots.cache, row, slot), put(slots.logits, logits[0]), put(slots.position, position),
                 put(slots.seen, seen), put(slots.key, key), put(slots.t, 0),
                 {name: put(slots.sampling[name], value) for name, value in sampling.items()})


def _one_step(model, slots: Slots, k: int):
    """One token for every slot, then one cached forward of them all: (slots, (tokens [N], their
    log-probabilities [N], the top k [N, K] ids and log-probabilities))."""
    logits = never_sampled(model.cfg, slots.logits)
    keys = jax.vmap(jax.random.fold_in)(slots.key, slots.t)
    tokens = next_token(logits, slots.seen, slots.sampling, keys)  # each slot's settings and key
    chosen, top_ids, top_lp = _logprobs(slots.logits, tokens, k)
    out, cache = model(tokens[:, None], slots.position[:, None], cache=slots.cache, last_only=True)
    seen = slots.seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    slots = Slots(cache, out[:, 0], slots.position + 1, seen, slots.key, slots.t + 1, slots.sampling)
    return slots, (tokens, chosen, top_ids, top_lp)


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "n"), donate_argnames=("slots",))
def _step(graphdef, state, slots: Slots, *, k: int, n: int = 1):
    """`n` decode steps in one call (a `lax.scan`; the host sees their tokens together): (slots,
    tokens [n, N], log-probabilities [n, N], top k ids and log-probabilities [n, N, K])."""
    model = nnx.merge(graphdef, state)
    return jax.lax.scan(lambda s, _: _one_step(model, s, k), slots, length=n)


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _score(graphdef, state, tokens: jax.Array, *, k: int):
    """A prompt's own log-probabilities: tokens [1, P] (right-padded) -> the log-probability of
    token i + 1 given tokens 0..i [1, P-1], and the top k at each position [1, P, K]."""
    lp = jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens), axis=-1)
    chosen = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(lp, k)
    return chosen, top_ids, top_lp


# TiDAR self-speculation: every slot is a one-row `jaxllm.decode` loop (LoopState and Request of
# batch 1), stacked on a leading slot axis; a step is `tidar_step` vmapped over the slots, so the
# slots' forwards run as one batch and each slot keeps its own sampling settings, key and length.


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _tidar_prefill(graphdef, state, req: Request, *, plan: Plan) -> LoopState:
    return tidar_prefill(nnx.merge(graphdef, state), req, plan)


@functools.partial(jax.jit, donate_argnames=("loops", "reqs"))
def _tidar_insert(loops: LoopState, reqs: Request, loop: LoopState, req: Request, slot):
    put = lambda stacked, one: stacked.at[slot].set(one)  # noqa: E731
    return jax.tree.map(put, loops, loop), jax.tree.map(put, reqs, req)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "n"), donate_argnames=("loops",))
def _tidar_steps(graphdef, state, loops: LoopState, reqs: Request, *, plan: Plan, n: int):
    """`n` TiDAR forwards of every slot: (loops, the tokens each slot emitted at each [n, N, block]
    (the first `count` of them), count [n, N])."""
    model = nnx.merge(graphdef, state)

    def forward(loops, _):
        before = loops.count[:, 0]
        loops = jax.vmap(lambda loop, req: tidar_step(model, req, plan, loop))(loops, reqs)
        emitted = jax.vmap(lambda out, c: jax.lax.dynamic_slice_in_dim(out[0], c, plan.block))(loops.out, before)
        return loops, (emitted, loops.count[:, 0] - before)

    return jax.lax.scan(forward, loops, length=n)


# ---------------------------------------------------------------------------------------------
# Requests and their events


@dataclasses.dataclass(frozen=True)
class Params:
    """What a request asks of each of its sequences."""
    max_tokens: int
    sampling: Sampling
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # alternatives per token to report (0: the chosen token only)
    echo: bool = False  # completions: the prompt's tokens (and logprobs) first
    ignore_eos: bool = False


@dataclasses.dataclass
class TokenInfo:
    """One token as reported with logprobs: its id, text, log-probability and the top alternatives."""
    id: int
    text: str
    logprob: float | None
    top: list[tuple[str, float]]


@dataclasses.dataclass
class Event:
    """What a job's callback receives: sequence `index` produced `text` (new, decoded) and
    `tokens` (with logprobs, when asked); `finish` is set on its last event ('stop' or 'length');
    `error` ends the whole job."""
    index: int
    text: str = ""
    tokens: list[TokenInfo] = dataclasses.field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    prompt: bool = False  # the echoed prompt, not generated tokens


@dataclasses.dataclass
class Job:
    """One request: its prompt, parameters and the callback that receives its events. `cancel()`
    frees its slots at the next step (a client that went away)."""
    prompt: list[int]
    params: Params
    callback: Callable[[Event], None]
    cancelled: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    echoed: list[TokenInfo] | None = None  # the prompt's tokens, scored once for all n sequences

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class Sequence:
    """One of a job's n sequences (a choice), in a slot or waiting for one."""
    job: Job
    index: int
    seed: int
    ids: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of the decoded output already sent
    pending: list[TokenInfo] = dataclasses.field(default_factory=list)  # tokens not yet sent


class EngineFull(Exception):
    """The waiting queue is full: the server answers 429."""


class Engine:
    """Continuous batching of a jaxllm model over `slots` sequence slots (see the module docstring).
    `max_waiting` sequences may wait for a slot; `submit` refuses more (EngineFull)."""

    def __init__(self, model, tokenizer, *, slots: int = 4, eos_id: int | None = None, max_waiting: int = 256,
                 steps_per_call: int = 1, speculative: TiDAR | None = None):
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.n_slots = slots
        self.max_waiting = max_waiting
        self.steps_per_call = steps_per_call
        self.size = self.cfg.max_seq_len
        self.k = min(TOP_LOGPROBS, self.cfg.vocab_size)
        self.graphdef, self.state = nnx.split(model.for_inference())
        model = nnx.merge(self.graphdef, self.state)
        v = self.cfg.vocab_size
        sampling = {name: jnp.broadcast_to(value, (slots,)) for name, value in Sampling().arrays().items()}
        cache = model.init_cache(slots, self.size, per_row=True)
        self.speculative = None if speculative is None else speculative.validate(self.cfg)
        self.forwards = self.emitted = 0  # slot-forwards run and tokens they emitted (tokens per forward)
        if self.speculative is None:
            self.slots = Slots(dataclasses.replace(cache, prefill=False), jnp.zeros((slots, v), jnp.float32),
                               jnp.zeros((slots,), jnp.int32), jnp.zeros((slots, v), bool),
                               jax.random.split(jax.random.key(0), slots), jnp.zeros((slots,), jnp.int32), sampling)
        else:  # a one-row loop per slot, stacked: a dummy prefill gives every field its shape
            block = self.speculative.block
            self.plan = Plan(capacity=self.size + block, cached=True, padded=True, block=block, cache_size=self.size)
            loop, req = self._tidar_prefill([0], Params(1, Sampling()), 0)
            self.loops, self.reqs = (jax.tree.map(lambda x: jnp.stack([x] * slots), tree) for tree in (loop, req))
        self.active: list[Sequence | None] = [None] * slots
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and stats)
        self.error: BaseException | None = None

    # -- the caller's side (any thread) --------------------------------------------------------

    def submit(self, prompt: list[int], params: Params, callback: Callable[[Event], None]) -> Job:
        """Queue a request (its n sequences); raises EngineFull when the queue is full."""
        job = Job(list(prompt), params, callback, prompt_tokens=len(prompt))
        with self._lock:
            if self.waiting.qsize() + params.n > self.max_waiting:
                raise EngineFull(f"the server is busy: {self.waiting.qsize()} sequences are waiting for "
                                 f"{self.n_slots} slots; retry later")
            base = secrets.randbelow(2**31) if params.seed is None else params.seed
            for i in range(params.n):
                self.waiting.put(Sequence(job, i, base + i))
        return job

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self.active)

    def warm_up(self) -> None:
        """Compile the step and the smallest prompt bucket's prefill before the first request."""
        slot = self.active.index(None) if None in self.active else None
        if slot is None:
            return
        if self.speculative is not None:
            self.loops, _ = _tidar_steps(self.graphdef, self.state, self.loops, self.reqs, plan=self.plan,
                                         n=self.steps_per_call)
            jax.block_until_ready(self.loops.count)
            return
        logits, row = _prefill(self.graphdef, self.state, jnp.zeros((1, min(bucket(1), self.size)), jnp.int32),
                               jnp.ones((1,), jnp.int32), size=self.size)
        self.slots = self._insert(slot, row, logits, 1, [0], Sampling(), 0)
        self.slots, _ = _step(self.graphdef, self.state, self.slots, k=self.k, n=self.steps_per_call)
        jax.block_until_ready(self.slots.logits)

    # -- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._admit()
                if self.busy_slots == 0:
                    try:  # idle: wait for work
                        seq = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._start(seq)
                    continue
                self._decode_step()
        except BaseException as e:  # a bug or a device failure: fail every job, stop serving
            self.error = e
            message = f"the engine failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for seq in [s for s in self.active if s is not None] + self._drain():
                seq.job.callback(Event(seq.index, error=message))
            raise

    def _drain(self) -> list[Sequence]:
        out = []
        while True:
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                return out

    def _admit(self) -> None:
        for slot in range(self.n_slots):
            if self.active[slot] is not None and self.active[slot].job.cancelled:
                self.active[slot] = None
            if self.active[slot] is None:
                try:
                    seq = self.waiting.get_nowait()
                except queue.Empty:
                    return
                self._start(seq)

    def _start(self, seq: Sequence) -> None:
        """Prefill a sequence and put it in a free slot (or finish it at once: max_tokens 0, or a
        cancelled job)."""
        job, params = seq.job, seq.job.params
        if job.cancelled:
            return
        if params.echo:
            self._echo(job, seq.index)
        if params.max_tokens == 0:
            job.callback(Event(seq.index, finish="length"))
            return
        slot = self.active.index(None)
        prompt = job.prompt
        if self.speculative is not None:
            loop, req = self._tidar_prefill(prompt, params, seq.seed)
            self.loops, self.reqs = _tidar_insert(self.loops, self.reqs, loop, req, jnp.int32(slot))
            self.active[slot] = seq
            first = int(np.asarray(loop.out)[0, 0])  # d_0, drawn by the prefill
            if self._advance(seq, TokenInfo(first, "", None, [])):
                self.active[slot] = None
            return
        p = min(bucket(len(prompt)), self.size)
        padded = np.zeros((1, p), np.int32)
        padded[0, p - len(prompt):] = prompt
        logits, row = _prefill(self.graphdef, self.state, jnp.asarray(padded), jnp.asarray([len(prompt)], jnp.int32),
                               size=self.size)
        self.slots = self._insert(slot, row, logits, len(prompt), prompt, params.sampling, seq.seed)
        self.active[slot] = seq

    def _tidar_prefill(self, prompt: list[int], params: Params, seed: int) -> tuple[LoopState, Request]:
        """A one-row TiDAR loop after its prefill, and its request (the prompt itself dropped: the
        stacked requests need one shape, and the steps do not read it)."""
        p = min(bucket(len(prompt)), self.size)
        padded = np.zeros((1, p), np.int32)
        padded[0, p - len(prompt):] = prompt
        eos = -1 if self.eos_id is None or params.ignore_eos else self.eos_id
        req = Request(jnp.asarray(padded), jnp.asarray([len(prompt)], jnp.int32), jnp.int32(params.max_tokens),
                      params.sampling.arrays(), jnp.int32(eos), jnp.full((0, 1), -1, jnp.int32), jax.random.key(seed),
                      jnp.float32(self.speculative.beta))
        loop = _tidar_prefill(self.graphdef, self.state, req, plan=self.plan)
        return loop, dataclasses.replace(req, prompts=jnp.zeros((1, 1), jnp.int32))

    def _insert(self, slot, row, logits, position, prompt, sampling: Sampling, seed: int) -> Slots:
        seen = np.zeros(self.cfg.vocab_size, bool)
        seen[prompt] = True
        return _insert(self.graphdef, self.state, self.slots, row, logits, jnp.int32(slot), jnp.int32(position),
                       jnp.asarray(seen), jax.random.key(seed), sampling.arrays())

    def _echo(self, job: Job, index: int) -> None:
        """The prompt's tokens as a sequence's first event, with their logprobs when asked (the
        first token has none)."""
        if job.echoed is None:
            job.echoed = self._score_prompt(job.prompt, job.params.logprobs)
        job.callback(Event(index, text=self.tokenizer.decode(job.prompt), tokens=[
            dataclasses.replace(info) for info in job.echoed], prompt=True))

    def _score_prompt(self, prompt: list[int], want: int | None) -> list[TokenInfo]:
        infos = [TokenInfo(t, self._token_text(t), None, []) for t in prompt]
        if want is not None:
            p = min(bucket(len(prompt)), self.size)
            padded = np.zeros((1, p), np.int32)
            padded[0, :len(prompt)] = prompt
            chosen, top_ids, top_lp = (np.asarray(a)[0] for a in _score(self.graphdef, self.state,
                                                                         jnp.asarray(padded), k=self.k))
            for i in range(1, len(prompt)):
                infos[i].logprob = float(chosen[i - 1])
                infos[i].top = self._top(top_ids[i - 1], top_lp[i - 1], want)
        return infos

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _top(self, ids, lps, want: int) -> list[tuple[str, float]]:
        return [(self._token_text(int(i)), float(lp)) for i, lp in zip(ids[:want], lps[:want])]

    def _decode_step(self) -> None:
        """`steps_per_call` decode steps; then each slot's tokens, in order, until its sequence ends
        (the tokens a finished sequence drew after its end are dropped with its slot)."""
        if self.speculative is not None:
            return self._tidar_step()
        self.slots, out = _step(self.graphdef, self.state, self.slots, k=self.k, n=self.steps_per_call)
        self.steps += self.steps_per_call
        tokens, chosen, top_ids, top_lp = map(np.asarray, out)
        for slot, seq in enumerate(self.active):
            for j in range(self.steps_per_call):
                if seq is None:
                    break
                if seq.job.cancelled:
                    self.active[slot] = None
                    break
                want = seq.job.params.logprobs
                info = TokenInfo(int(tokens[j, slot]), "", float(chosen[j, slot]),
                                 [] if want is None else self._top(top_ids[j, slot], top_lp[j, slot], want))
                if self._advance(seq, info, flush=j == self.steps_per_call - 1):
                    self.active[slot] = None
                    break

    def _tidar_step(self) -> None:
        self.loops, (emitted, counts) = _tidar_steps(self.graphdef, self.state, self.loops, self.reqs, plan=self.plan,
                                                     n=self.steps_per_call)
        self.steps += self.steps_per_call
        emitted, counts = np.asarray(emitted), np.asarray(counts)
        for slot, seq in enumerate(self.active):
            if seq is not None and seq.job.cancelled:
                self.active[slot] = None
                continue
            if seq is None:
                continue
            live = counts[:, slot] > 0  # forwards after the row ended on the device emit nothing
            self.forwards += int(live.sum())
            tokens = [int(t) for j in range(self.steps_per_call) for t in emitted[j, slot, :counts[j, slot]]]
            self.emitted += len(tokens)
            for i, token in enumerate(tokens):
                if self._advance(seq, TokenInfo(token, "", None, []), flush=i == len(tokens) - 1):
                    self.active[slot] = None
                    break

    @property
    def tokens_per_forward(self) -> float | None:
        """TiDAR: tokens emitted per slot-forward so far (1 without speculation)."""
        return self.emitted / self.forwards if self.forwards else None

    def _advance(self, seq: Sequence, info: TokenInfo, flush: bool = True) -> bool:
        """Add one token to a sequence and (`flush`) send what is ready; True when it has finished."""
        job, params = seq.job, seq.job.params
        token = info.id
        if token == self.eos_id and not params.ignore_eos:
            self._send(seq, finish="stop")
            return True
        seq.ids.append(token)
        job.completion_tokens += 1
        info.text = self._token_text(token)
        seq.pending.append(info)
        text = self.tokenizer.decode(seq.ids)
        hits = [text.find(s, max(0, seq.sent - len(s) + 1)) for s in params.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            self._send(seq, text[:min(hits)], finish="stop")
            return True
        full = len(job.prompt) + len(seq.ids) >= self.size
        if len(seq.ids) >= params.max_tokens or full:
            self._send(seq, text, finish="length")
            return True
        if not flush or text.endswith("\ufffd"):  # later, or an incomplete UTF-8 sequence: wait
            return False
        self._send(seq, text[:len(text) - _partial_stop(text, params.stop)])
        return False

    def _send(self, seq: Sequence, text: str | None = None, finish: str | None = None) -> None:
        new = "" if text is None else text[seq.sent:]
        if not new and not finish:  # nothing to show yet: held-back tokens go with the next text
            return
        seq.sent += len(new)
        tokens, seq.pending = seq.pending, []
        seq.job.callback(Event(seq.index, new, tokens, finish))


def _partial_stop(text: str, stops) -> int:
    """The length of the longest end of `text` that begins a stop string: held back until the next
    token shows whether the stop string follows."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def wait_for(engine: Engine, prompt: list[int], params: Params, timeout: float = 600.0) -> list[dict]:
    """Run one request to the end from a plain thread: per sequence {'text', 'tokens', 'finish'}."""
    done = threading.Event()
    out = [dict(text="", tokens=[], finish=None) for _ in range(params.n)]
    errors: list[str] = []

    def callback(event: Event) -> None:
        if event.error:
            errors.append(event.error)
            done.set()
            return
        out[event.index]["text"] += event.text
        out[event.index]["tokens"] += event.tokens
        if event.finish:
            out[event.index]["finish"] = event.finish
            if all(o["finish"] for o in out):
                done.set()

    engine.submit(prompt, params, callback)
    start = time.monotonic()
    while not done.wait(0.1):
        if time.monotonic() - start > timeout:
            raise TimeoutError("the request did not finish")
    if errors:
        raise RuntimeError(errors[0])
    return out
