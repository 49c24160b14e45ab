"""Decoding: the sampling controls against Hugging Face's own logits processors and independent
constructions, the caches (rolling buffer, MLA's compressed shapes), EOS / stop sequences,
streaming, seeding and bad input. Greedy parity with torch_ref is in parity_tests/test_decode.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from jaxllm.config import config_from_dict
from jaxllm.decode import (Sampling, apply_min_p, argmax, apply_repetition_penalty, apply_top_k, apply_top_p, filter_logits, generate, next_token)
from jaxllm.errors import DecodeError
from jaxllm.model import Transformer
from jaxllm.model.attention import AttentionMask, LayerCache, causal_mask, visible, write_cache
from torch_ref.generate import process_logits

V = 64


def model_for(**fields) -> Transformer:
    base = dict(vocab_size=V, d_model=32, n_layer=2, max_seq_len=96, attention=dict(n_head=4), init_std=0.3)
    return Transformer(config_from_dict({"model": {**base, **fields}}).model, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return model_for(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2, window=16))


def random_logits(seed: int, rows: int = 4) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * 3).astype(np.float32)


def seen_ids(seed: int, rows: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (rows, 12))


def as_seen(ids: np.ndarray) -> jax.Array:
    seen = np.zeros((ids.shape[0], V), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    return jnp.asarray(seen)


def hf(processor, logits: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if ids is None else torch.from_numpy(ids)
    return processor(ids, torch.from_numpy(logits.copy())).numpy()


def assert_same_filter(got, expected):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-6)


def test_repetition_penalty_is_hugging_faces():
    logits, ids = random_logits(0), seen_ids(1)
    expected = hf(RepetitionPenaltyLogitsProcessor(1.7), logits, ids)
    got = apply_repetition_penalty(jnp.asarray(logits), as_seen(ids), 1.7)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    assert np.any(logits[np.asarray(as_seen(ids))] < 0) and np.any(logits[np.asarray(as_seen(ids))] > 0)
    # by hand: seen positive logits shrink, seen negative ones grow in magnitude, unseen are kept
    seen = np.asarray(as_seen(ids))
    np.testing.assert_allclose(np.asarray(got)[seen & (logits > 0)], logits[seen & (logits > 0)] / 1.7, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[seen & (logits < 0)], logits[seen & (logits < 0)] * 1.7, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[~seen], logits[~seen])


@pytest.mark.parametrize("k", [1, 5, 63, 64, 100])
def test_top_k_is_hugging_faces(k):
    logits = random_logits(k)
    got = apply_top_k(jnp.asarray(logits), jnp.int32(k))
    assert_same_filter(got, hf(TopKLogitsWarper(k), logits))
    assert (np.isfinite(np.asarray(got)).sum(-1) == min(k, V)).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(p):
    logits = random_logits(int(p * 1000))
    got = np.isfinite(np.asarray(apply_top_p(jnp.asarray(logits), jnp.float32(p))))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row in range(logits.shape[0]):  # independent construction: add tokens by probability until mass >= p
        order = np.argsort(-probs[row])
        n = int(np.searchsorted(np.cumsum(probs[row, order]), p) + 1)
        expected = np.zeros(V, bool)
        expected[order[:n]] = True
        np.testing.assert_array_equal(got[row], expected)
    assert_same_filter(apply_top_p(jnp.asarray(logits), jnp.float32(p)), hf(TopPLogitsWarper(p), logits))


BIG_V = 1000


def nucleus(logits: np.ndarray, p: float) -> np.ndarray:
    """Independent top-p: in a stable descending order, a token stays iff the mass before it is < p."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = np.zeros(logits.shape, bool)
    for row in range(len(logits)):
        order = np.argsort(-logits[row], kind="stable")
        mass = np.cumsum(probs[row, order])
        keep[row, order] = (mass - probs[row, order]) < p
    return keep


@pytest.mark.parametrize("k", [[1, 50, 256, 7], [257, 999, 1000, 3], [0, 12, 300, 1000]])
def test_top_k_takes_one_k_per_row_as_hugging_faces_warper(k):
    """Each row keeps its own k largest (k = 0: all) on a 1000-token vocabulary, with negative and
    positive logits, -0.0 beside +0.0 and a removed (-inf) token: Hugging Face's warper row by row."""
    logits = (np.random.default_rng(sum(k)).standard_normal((4, BIG_V)) * 3).astype(np.float32)
    top = np.nextafter(np.float32(50), np.float32(np.inf))  # odd bits, and 50.0 one step below it
    logits[:, :5] = [-0.0, 0.0, -np.inf, top, 50.0]
    got = np.asarray(apply_top_k(jnp.asarray(logits), jnp.asarray(k, jnp.int32)))
    for row, k_row in enumerate(k):
        expected = logits[row:row + 1] if k_row == 0 else hf(TopKLogitsWarper(k_row), logits[row:row + 1])
        assert_same_filter(got[row:row + 1], expected)


@pytest.mark.parametrize("scale,p", [(4.0, 0.9), (0.1, 0.9), (0.1, 0.2), (1.0, [0.5, 1.0, 0.99, 0.05])])
def test_top_p_on_a_large_vocabulary_peaked_or_flat_with_one_p_per_row(scale, p):
    """Peaked rows keep a few tokens, flat ones hundreds; p may differ per row (1: all)."""
    logits = (np.random.default_rng(int(10 * scale)).standard_normal((4, BIG_V)) * scale).astype(np.float32)
    p_rows = np.broadcast_to(np.asarray(p, np.float32), (4,))
    got = np.isfinite(np.asarray(apply_top_p(jnp.asarray(logits), jnp.asarray(p, jnp.float32))))
    for row in range(4):
        expected = np.ones(BIG_V, bool) if p_rows[row] >= 1 else nucleus(logits[row:row + 1], p_rows[row])[0]
        np.testing.assert_array_equal(got[row], expected)
    if scale == 4.0:
        assert got.sum(-1).max() < 50  # peaked: a few tokens
    if (scale, p) == (0.1, 0.9):
        assert got.sum(-1).min() > 800  # flat: most of the vocabulary


def test_top_p_with_tied_logits_keeps_the_lower_indices_first():
    """Integer logits tie everywhere, so the last level kept is cut inside: the tokens kept follow a
    stable ranking (ties by index), as the independent construction says. Two logits one float
    step apart are two levels."""
    logits = np.random.default_rng(3).integers(-2, 3, (3, BIG_V)).astype(np.float32)
    logits[0, :300] = 9.0  # row 0: 300 tied maxima hold nearly all the mass
    for p in (0.05, 0.3, 0.95):
        got = np.isfinite(np.asarray(apply_top_p(jnp.asarray(logits), jnp.float32(p))))
        np.testing.assert_array_equal(got, nucleus(logits, p))
        assert 1 < got[0].sum() < 300  # a level cut inside its ties
    neighbours = np.zeros((1, BIG_V), np.float32)
    neighbours[0, :2] = [np.nextafter(np.float32(20), np.float32(np.inf)), 20.0]  # one float step apart
    got = np.isfinite(np.asarray(apply_top_p(jnp.asarray(neighbours), jnp.float32(0.4))))
    np.testing.assert_array_equal(got, nucleus(neighbours, 0.4))
    assert got[0].sum() == 1


def test_per_row_settings_and_keys_draw_what_each_row_draws_alone():
    """The serving engine's call: settings and keys one per row; row b gets exactly the token that
    next_token gives for row b alone, as a batch of one with scalar settings and its own key."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray((rng.standard_normal((5, BIG_V)) * 2).astype(np.float32))
    seen = jnp.asarray(rng.random((5, BIG_V)) < 0.01)
    rows = [Sampling(temperature=0.0), Sampling(temperature=0.8, top_k=300), Sampling(temperature=1.2, top_p=0.5),
            Sampling(temperature=1.0, min_p=0.1, repetition_penalty=1.5), Sampling(temperature=0.0, top_k=3)]
    settings = {name: jnp.stack([r.arrays()[name] for r in rows]) for name in rows[0].arrays()}
    keys = jax.random.split(jax.random.key(7), 5)
    together = np.asarray(jax.jit(next_token)(logits, seen, settings, keys))
    alone = [int(next_token(logits[b:b + 1], seen[b:b + 1], rows[b].arrays(), keys[b])[0]) for b in range(5)]
    assert together.tolist() == alone
    assert together[0] == int(jnp.argmax(logits[0])) and together[4] == int(jnp.argmax(
        apply_repetition_penalty(logits[4:], seen[4:], 1.0)[0]))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_is_hugging_faces(min_p):
    logits = random_logits(int(min_p * 100))
    assert_same_filter(apply_min_p(jnp.asarray(logits), jnp.float32(min_p)), hf(MinPLogitsWarper(min_p), logits))


def test_the_whole_chain_is_hugging_faces_in_jax_and_torch_ref():
    logits, ids = random_logits(7), seen_ids(8)
    s = Sampling(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    expected = hf(RepetitionPenaltyLogitsProcessor(1.3), logits, ids)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        expected = hf(warper, expected)
    got = filter_logits(apply_repetition_penalty(jnp.asarray(logits), as_seen(ids), 1.3), s.arrays())
    assert_same_filter(got, expected)
    seen = torch.from_numpy(np.array(as_seen(ids)))
    assert_same_filter(process_logits(torch.from_numpy(logits), seen, 0.7, 20, 0.8, 0.05, 1.3).numpy(), expected)


def test_filters_that_are_off_change_nothing():
    logits = jnp.asarray(random_logits(3))
    np.testing.assert_array_equal(np.asarray(filter_logits(logits, Sampling().arrays())), np.asarray(logits))


def test_greedy_is_argmax_after_the_penalty_and_top_k_1_is_greedy():
    logits, ids = jnp.asarray(random_logits(4)), seen_ids(5)
    penalised = np.asarray(apply_repetition_penalty(logits, as_seen(ids), 2.0))
    greedy = next_token(logits, as_seen(ids), Sampling(temperature=0.0, repetition_penalty=2.0).arrays(), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(greedy), penalised.argmax(-1))
    top1 = next_token(logits, as_seen(ids), Sampling(temperature=5.0, top_k=1, repetition_penalty=2.0).arrays(),
                      jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(top1), penalised.argmax(-1))


@pytest.mark.parametrize("shape", [(1, 32000), (32, 1000), (3, 5, V)])
def test_argmax_is_jnp_argmax_ties_nans_and_infinities_included(shape):
    """decode.argmax (a max then the least index reaching it, fast on XLA:CPU) picks exactly what
    jnp.argmax picks: the first of tied maxima, the first NaN, an infinity, index 0 of an all -inf row."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, shape).astype(np.float32)  # few distinct values: ties in every row
    flat = x.reshape(-1, shape[-1])
    flat[0, rng.integers(0, shape[-1], 2)] = np.nan
    if len(flat) > 2:
        flat[1, rng.integers(0, shape[-1], 3)] = np.inf
        flat[2] = -np.inf
    got, expected = np.asarray(jax.jit(argmax)(x)), np.asarray(jnp.argmax(x, axis=-1))
    assert got.dtype == np.int32 and got.shape == shape[:-1]
    np.testing.assert_array_equal(got, expected)
    real = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(argmax(real), jnp.argmax(real, axis=-1))


def test_draws_follow_the_filtered_distribution():
    logits = jnp.asarray(random_logits(9, rows=1))
    s = Sampling(temperature=1.5, top_k=4).arrays()
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: next_token(logits, jnp.zeros((1, V), bool), s, k))(keys))[:, 0]
    scaled = np.asarray(logits)[0] / 1.5
    top = np.argsort(-scaled)[:4]
    assert set(draws) <= set(top)
    expected = np.exp(scaled[top] - scaled[top].max())
    expected /= expected.sum()
    freq = np.array([(draws == t).mean() for t in top])
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_bad_sampling_settings_are_one_line_errors():
    for bad in (Sampling(temperature=-1), Sampling(top_k=-2), Sampling(top_p=0.0), Sampling(top_p=1.5),
                Sampling(min_p=2.0), Sampling(repetition_penalty=0.0), Sampling(temperature=float("nan"))):
        with pytest.raises(DecodeError) as e:
            bad.validate()
        assert "\n" not in str(e.value) and "allowed" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Caches


def test_rolling_buffer_holds_the_last_slots_at_time_mod_size():
    buf = jnp.full((1, 4), -1)
    buf = write_cache(buf, jnp.arange(6)[None], jnp.int32(0))  # a prefill longer than the buffer
    for t in range(6, 11):
        buf = write_cache(buf, jnp.array([[t]]), jnp.int32(t))
    expected = [-1] * 4
    for t in range(11):  # independent construction: slot t % 4 holds the latest t
        expected[t % 4] = t
    assert np.asarray(buf)[0].tolist() == expected


def test_rows_write_at_their_own_time_steps():
    buf = write_cache(jnp.full((2, 5), -1), jnp.array([[10, 11, 12], [20, 21, 22]]), jnp.array([1, 4]))
    assert np.asarray(buf).tolist() == [[-1, 10, 11, 12, -1], [21, 22, -1, -1, 20]]


@pytest.mark.parametrize("t, step", [(1, 3), (3, 2), (7, 0), (2, [1, 4]), (1, [0, 3]), (6, [2, 1])])
def test_a_heads_major_buffer_is_written_like_the_slots_first_one(t, step):
    """write_cache on axis 2 (the [B, K, S, H] key/value layout) is the axis-1 write, transposed:
    one token and several, a scalar step and per-row steps, more tokens than slots (S = 5)."""
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)  # [B, S, K, H]
    new = jnp.asarray(rng.standard_normal((2, t, 3, 4)), jnp.float32)
    step = jnp.asarray(step, jnp.int32)
    slots_first = write_cache(buf, new, step)
    heads_major = write_cache(buf.swapaxes(1, 2), new.swapaxes(1, 2), step, axis=2)
    np.testing.assert_array_equal(np.asarray(heads_major.swapaxes(1, 2)), np.asarray(slots_first))


def rule_by_hand(q_pos, q_group, k_pos, k_group, window):
    """docs/sampling.md's mask rule, one pair at a time."""
    w = window or 10**9
    out = np.zeros((len(q_pos), len(k_pos)), bool)
    for i, (qp, qg) in enumerate(zip(q_pos, q_group)):
        qg = -1 if qp < 0 else qg
        first = min(p for p, g in zip(q_pos, q_group) if (-1 if p < 0 else g) == qg)
        horizon = qp if qg == 0 else first - 1
        for j, (kp, kg) in enumerate(zip(k_pos, k_group)):
            kg = -1 if kp < 0 and kg != -2 else kg
            out[i, j] = (kg == 0 and kp >= 0 and kp <= horizon and qp - kp < w) or (qg != 0 and kg == qg)
    return out


def test_the_mask_rule_is_the_causal_window_and_tidar_blocks_and_skips_empty_slots():
    pos = jnp.arange(40)[None]
    zeros = jnp.zeros_like(pos)
    for window in (None, 1, 7):
        np.testing.assert_array_equal(np.asarray(visible(pos, zeros, pos, zeros, window))[0],
                                      np.asarray(causal_mask(40, 40, window)))
    slots, slot_groups = jnp.array([[8, 9, 6, 7, -1]]), jnp.array([[0, 0, 0, 0, -2]])  # a rolling buffer of 4, query at 9
    assert np.asarray(visible(jnp.array([[9]]), jnp.array([[0]]), slots, slot_groups, 4))[0, 0].tolist() == [True] * 4 + [False]
    assert np.asarray(visible(jnp.array([[9]]), jnp.array([[0]]), slots, slot_groups, 3))[0, 0].tolist() == [True, True, False, True, False]
    # papers.md 1.3's step for B = 3 after a prefix of 3 (positions 3 4 5 | 4 5 6 | 5 6 7 | 6 7 8), over a
    # cache of the 3 prefix slots and the 3 drafts just written, then the 9 unwritten mask tokens
    q_pos = [3, 4, 5, 4, 5, 6, 5, 6, 7, 6, 7, 8]
    q_group = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    k_pos, k_group = [0, 1, 2, 3, 4, 5, -1] + q_pos[3:], [0] * 6 + [-2] + q_group[3:]
    for window in (None, 3):
        got = np.asarray(visible(jnp.array([q_pos]), jnp.array([q_group]), jnp.array([k_pos]), jnp.array([k_group]), window))[0]
        np.testing.assert_array_equal(got, rule_by_hand(q_pos, q_group, k_pos, k_group, window))
    got = np.asarray(visible(jnp.array([q_pos]), jnp.array([q_group]), jnp.array([k_pos]), jnp.array([k_group]), None))[0]
    assert got[3].tolist() == [True] * 4 + [False] * 3 + [True] * 3 + [False] * 6  # M^(0) sees 0..3 (d_0) and its block
    assert got[11].tolist() == [True] * 6 + [False] * 7 + [True] * 3  # M^(2) sees d_0..d_2, not the other blocks
    assert not got[:3, 7:].any()  # the drafts never see a mask token
    # left padding sees only padding (no empty row) and nobody sees padding
    pad_pos, groups = jnp.array([[-1, -1, 0, 1]]), jnp.zeros((1, 4), jnp.int32)
    got = np.asarray(visible(pad_pos, jnp.where(pad_pos < 0, -1, groups), pad_pos, jnp.where(pad_pos < 0, -1, groups), None))[0]
    assert got.tolist() == [[True, True, False, False], [True, True, False, False],
                            [False, False, True, False], [False, False, True, True]]


@pytest.mark.parametrize("variant,heads", [("deepseek", 1), ("seed004", 4)])
def test_mla_cache_holds_the_latent_and_the_rope_key_per_token(variant, heads):
    c, r = 24, 8
    m = model_for(position=dict(kind="rope"), attention=dict(kind="mla", n_head=4, mla=dict(
        variant=variant, kv_lora_rank=c, q_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=r, v_head_dim=16)))
    cache = m.init_cache(3, 50).layers
    assert len(cache) == 2
    for c_kv, k_rope in cache:
        assert c_kv.shape == (3, 50, c) and k_rope.shape == (3, 50, heads, r)
        assert c_kv[0, 0].size + k_rope[0, 0].size == c + heads * r  # per token and layer: C + R (DeepSeek)
    # and the cache a generation fills has those shapes: run the jitted prefill's layer directly
    prefill = nnx.jit(lambda attn, x, pos, buffers: attn(x, pos, AttentionMask(jnp.ones((3, 5, 5), bool), None),
                                                          LayerCache(buffers, jnp.int32(0), True)))
    _, layer_cache = prefill(m.layers[0].attn, jnp.ones((3, 5, 32)), jnp.broadcast_to(jnp.arange(5), (3, 5)), cache[0])
    c_kv, k_rope = layer_cache.buffers
    assert c_kv.shape == (3, 50, c) and k_rope.shape == (3, 50, heads, r)
    assert np.abs(np.asarray(c_kv[:, :5])).sum() > 0 and np.abs(np.asarray(c_kv[:, 5:])).sum() == 0


@pytest.mark.parametrize("attention", [dict(n_head=4, n_kv_head=2), dict(kind="mla", n_head=4, mla=dict(
    kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))])
def test_the_one_forward_with_a_cache_gives_the_logits_of_the_forward_without(attention):
    m = model_for(position=dict(kind="rope"), attention=attention)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 12)), jnp.int32)
    full = np.asarray(m(tokens))
    prefill, cache = m(tokens[:, :8], cache=m.init_cache(2, 16), last_only=True)
    assert prefill.shape == (2, 1, V) and int(cache.step) == 8 and not cache.prefill
    np.testing.assert_allclose(np.asarray(prefill[:, 0]), full[:, 7], atol=1e-5)
    for t in range(8, 12):  # one token per step, over the slots (MLA: absorbed weights)
        logits, cache = m(tokens[:, t:t + 1], jnp.full((2, 1), t), cache=cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=1e-4)
    assert int(cache.step) == 12
    assert np.asarray(cache.positions).tolist() == [list(range(12)) + [-1] * 4] * 2


def test_attention_cache_is_keys_and_values_of_the_kv_heads(model):
    for k, v in model.init_cache(2, 16).layers:  # window 16: a rolling buffer of 16 slots
        assert k.shape == v.shape == (2, 2, 16, 8)  # heads-major [B, K, S, H]


# ---------------------------------------------------------------------------------------------
# The loop


def test_batched_prompts_of_different_lengths_equal_each_prompt_alone(model):
    prompts = [[5, 9, 2], list(range(1, 15)), [7] * 11]  # one bucket of 16: two compilations in all
    batch = generate(model, prompts, max_new_tokens=24)
    alone = [generate(model, [p], max_new_tokens=24)[0] for p in prompts]
    assert batch == alone
    assert len({tuple(row) for row in batch}) == 3


def test_eos_and_stop_sequences_end_a_row_and_keep_the_stopping_tokens(model):
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8]]
    full = generate(model, prompts, max_new_tokens=32)
    eos = full[0][6]
    cut = generate(model, prompts, max_new_tokens=32, eos_id=eos)
    for row, out in zip(full, cut):
        end = row.index(eos) + 1 if eos in row else len(row)
        assert out == row[:end]
    stop = full[1][10:12]
    cut = generate(model, prompts, max_new_tokens=32, stop_sequences=[stop, [V - 1, V - 1, V - 1]])
    for row, out in zip(full, cut):
        ends = [i + 2 for i in range(len(row) - 1) if row[i:i + 2] == stop]
        assert out == row[:ends[0] if ends else len(row)]


def test_sampling_is_seeded_and_streaming_sees_every_token(model):
    s = Sampling(temperature=1.0, top_p=0.95)
    a = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=30, sampling=s, seed=11)
    assert a == generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=30, sampling=s, seed=11)
    assert a != generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=30, sampling=s, seed=12)
    seen = []
    streamed = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=30, sampling=s, seed=11,
                        on_token=lambda tokens, active: seen.append(tokens.tolist()))
    assert streamed == a
    assert [step[0] for step in seen] == a[0]


def test_generation_stops_at_the_end_of_the_context(model):
    out = generate(model, [[i % V for i in range(90)]], max_new_tokens=50)  # context 96
    assert len(out[0]) == 6
    assert out == generate(model, [[i % V for i in range(90)]], max_new_tokens=50, cached=False)


@pytest.mark.parametrize("prompts,message", [
    ([], "no prompts"), ([[]], "prompt 0 is empty"), ([[1], list(range(96))], "prompt 1 is 96 tokens; the context holds 96"),
    ([[1, V]], f"token id {V}; allowed: 0..{V - 1}"),
])
def test_bad_prompts_are_one_line_errors(model, prompts, message):
    with pytest.raises(DecodeError, match=message) as e:
        generate(model, prompts, max_new_tokens=4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["loop", "trm"])
def test_recursive_models_decode_with_a_cache_per_core_call(mode):
    m = model_for(n_layer=4, position=dict(kind="rope"), recursion=dict(mode=mode, n_prelude=1, n_core=2, n_loops=2))
    cache = m.init_cache(2, 40)
    calls = 2 * (m.recursion.steps_per_loop)
    assert [k.shape[0] for k, _ in cache.layers] == [2, calls, calls, 2]  # the core: one cache per call
    prompts = [[5, 9, 2, 7, 1], list(range(1, 12))]
    assert generate(m, prompts, max_new_tokens=20) == generate(m, prompts, max_new_tokens=20, cached=False)


def test_for_inference_puts_matmul_weights_in_the_compute_dtype_and_keeps_norms_in_float32():
    m = model_for(dtype="bfloat16", position=dict(kind="rope"), norm=dict(kind="rmsnorm"), tie_embeddings=False,
                  moe=dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                           shared_intermediate_size=16))
    dtypes = {".".join(map(str, path)): var.dtype for path, var in nnx.to_flat_state(nnx.state(m.for_inference()))}
    assert dtypes["layers.0.attn.q_proj.weight"] == dtypes["lm_head.weight"] == dtypes["embed_tokens.weight"] == jnp.bfloat16
    assert dtypes["layers.0.mlp.experts.gate_proj"] == dtypes["layers.0.mlp.shared_mlp.up_proj.weight"] == jnp.bfloat16
    assert dtypes["layers.0.attn_norm.weight"] == dtypes["final_norm.weight"] == jnp.float32
    assert dtypes["layers.0.mlp.router.weight"] == jnp.float32  # the router computes in float32
    assert m.layers[0].attn.q_proj.weight[...].dtype == jnp.float32  # the model itself is untouched
    np.testing.assert_array_equal(np.asarray(m.for_inference()(jnp.array([[1, 2, 3]]))), np.asarray(m(jnp.array([[1, 2, 3]]))))


def test_generate_is_re_entrant_a_stream_may_decode_inside_a_stream(model):
    inner = []

    def on_token(tokens, active):
        if not inner:  # a second generation from inside the first one's stream
            inner.append(generate(model, [[4, 5]], max_new_tokens=5, on_token=lambda t, a: None))

    outer = generate(model, [[1, 2, 3]], max_new_tokens=12, on_token=on_token)
    assert outer == generate(model, [[1, 2, 3]], max_new_tokens=12)
    assert inner == [generate(model, [[4, 5]], max_new_tokens=5)]


def test_generate_long_shifts_the_context_and_continues(model):
    from jaxllm.decode import generate_long

    prompt = [(7 * i) % V for i in range(80)]  # context 96: 16 tokens fit, then the last 48 carry on
    s = Sampling(temperature=1.0)
    out = generate_long(model, [prompt], max_new_tokens=40, sampling=s, seed=5)[0]
    first = generate(model, [prompt], max_new_tokens=40, sampling=s, seed=5)[0]
    assert len(first) == 16 and out[:16] == first
    second = generate(model, [(prompt + first)[-48:]], max_new_tokens=24, sampling=s, seed=6)[0]
    assert out == first + second
    eos = out[20]
    stopped = generate_long(model, [prompt], max_new_tokens=40, sampling=s, seed=5, eos_id=eos)[0]
    assert stopped == out[:out.index(eos) + 1]
