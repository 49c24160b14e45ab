"""TiDAR self-speculative decoding (jaxllm.decode, docs/sampling.md): exactness against plain
decoding, the cache holding committed causal tokens only, rollback, the sampling rule, the stats."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats as scipy_stats

from jaxllm.config import config_from_dict
from jaxllm.decode import GREEDY, Sampling, TiDAR, generate
from jaxllm.errors import DecodeError
from jaxllm.model import Transformer
from jaxllm.model.diffusion import mask_token_id
from jaxllm.model.losses import tidar_losses

V = 24
MLA = dict(kind="mla", n_head=4, mla=dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                         qk_rope_head_dim=8, v_head_dim=8))


def tidar_model(seed: int = 0, **fields) -> Transformer:
    base = dict(vocab_size=V, d_model=32, n_layer=2, max_seq_len=256, init_std=0.3, position=dict(kind="rope"),
                norm=dict(kind="rmsnorm"), attention=dict(n_head=4, n_kv_head=2), mlp=dict(kind="swiglu", d_ff=64),
                diffusion=dict(enabled=True, block_size=4))
    return Transformer(config_from_dict({"model": {**base, **fields}}).model, rngs=nnx.Rngs(seed))


def periodic(rng, rows: int, length: int) -> np.ndarray:
    """Rows of a repeating pattern of 6 tokens with an occasional random token: easy to draft."""
    pattern = rng.permutation(V - 1)[:6]
    out = np.tile(pattern, length // 6 + 2)[None].repeat(rows, 0)
    shift = rng.integers(0, 6, rows)
    out = np.stack([row[s:s + length] for row, s in zip(out, shift)])
    noise = rng.random(out.shape) < 0.03
    return np.where(noise, rng.integers(0, V - 1, out.shape), out).astype(np.int32)


def train(model: Transformer, steps: int = 150) -> Transformer:
    """A few hundred optax steps of the TiDAR loss on the periodic corpus: drafts get accepted."""
    model.train()
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    rng = np.random.default_rng(0)

    @nnx.jit
    def update(model, opt, batch):
        loss, grads = nnx.value_and_grad(lambda m: tidar_losses(m, batch[:, :-1], batch[:, 1:])[0])(model)
        opt.update(model, grads)
        return loss

    for _ in range(steps):
        update(model, opt, jnp.asarray(periodic(rng, 16, 65)))
    model.eval()
    return model


@pytest.fixture(scope="module")
def trained():
    return train(tidar_model(init_std=0.02))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    rows = periodic(rng, 4, 60)
    return [rows[0, :60].tolist(), rows[1, :37].tolist(), rows[2, :12].tolist(), rows[3, :50].tolist()]


@pytest.mark.parametrize("fields", [{}, dict(attention=MLA)], ids=["dense", "mla"])
def test_beta_one_greedy_tidar_is_plain_greedy_decoding_random_weights(fields, prompts):
    m = tidar_model(**fields)
    plain = generate(m, prompts, max_new_tokens=64)
    assert generate(m, prompts, max_new_tokens=64, speculative=TiDAR(8, 1.0)) == plain


@pytest.mark.parametrize("fields", [{}, dict(attention=dict(n_head=4, n_kv_head=2, window=16))], ids=["dense", "window"])
def test_beta_one_greedy_tidar_is_plain_greedy_decoding_trained(trained, fields, prompts):
    m = trained
    if fields:  # the same weights with a sliding window (a rolling cache with B slots of slack)
        cfg = config_from_dict({"model": {**dataclasses.asdict(m.cfg), **fields}}).model
        m = nnx.merge(nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0))), nnx.state(trained))
    for batch, blocks in ((prompts, (4, 8)), (prompts[:1], (8,))) if not fields else ((prompts, (8,)),):
        plain = generate(m, batch, max_new_tokens=64)
        for block in blocks:
            out, stats = generate(m, batch, max_new_tokens=64, speculative=TiDAR(block, 1.0), return_stats=True)
            assert out == plain, (len(batch), block)
            assert stats.tokens_per_forward > 1.5  # the drafts are used: verification is exercised
            # every row accepts its own counts; tokens = d_0 from the prefill + (n + 1) per forward, cut at the end
            for row, accepted in zip(out, stats.accepted):
                assert 0 <= 1 + sum(n + 1 for n in accepted) - len(row) < block
            assert sum(stats.histogram()) == stats.forwards


def test_eos_stop_sequences_and_the_context_end_cut_tidar_rows_like_plain_decoding(trained, prompts):
    plain = generate(trained, prompts, max_new_tokens=64)
    eos = plain[0][9]
    spec = TiDAR(8, 1.0)
    assert generate(trained, prompts, max_new_tokens=64, eos_id=eos, speculative=spec) == \
        generate(trained, prompts, max_new_tokens=64, eos_id=eos)
    stop = plain[1][20:23]
    assert generate(trained, prompts, max_new_tokens=64, stop_sequences=[stop], speculative=spec) == \
        generate(trained, prompts, max_new_tokens=64, stop_sequences=[stop])
    long = [list(prompts[0]) * 4][:1]  # 240 of 256 positions: 16 new tokens fit
    long = [long[0][:240]]
    assert generate(trained, long, max_new_tokens=64, speculative=spec) == generate(trained, long, max_new_tokens=64)
    assert len(generate(trained, long, max_new_tokens=64, speculative=spec)[0]) == 16


def test_beta_mixes_the_diffusion_logits_into_verification(trained, prompts):
    plain = generate(trained, prompts, max_new_tokens=64)
    mixed, stats = generate(trained, prompts, max_new_tokens=64, speculative=TiDAR(8, 0.0), return_stats=True)
    assert mixed != plain  # trusting the drafter alone changes tokens on this model ...
    assert stats.acceptance_rate > 0.5  # ... and accepts more of its own drafts


def _streamed_equals_unstreamed(m, prompts):
    seen = []
    out = generate(m, prompts, max_new_tokens=64, speculative=TiDAR(8), on_token=lambda t, a: seen.append((t, a)))
    cols = [[int(t[b]) for t, a in seen if a[b]] for b in range(len(prompts))]
    return out == generate(m, prompts, max_new_tokens=64, speculative=TiDAR(8)) and cols == out


def test_streaming_sees_every_tidar_token_once_in_order(trained, prompts):
    assert _streamed_equals_unstreamed(trained, prompts)


def _prefill(m, tokens, size):
    return m(jnp.asarray([tokens], jnp.int32), cache=m.init_cache(1, size, per_row=True))[1]


def test_mask_tokens_keys_and_values_never_reach_the_cache(trained):
    """A TiDAR step's cache is bit for bit the same whatever the mask token embeds to: the mask
    tokens' keys and values are never written, and the drafts never see them."""
    prompt = periodic(np.random.default_rng(3), 1, 30)[0].tolist()
    block = 4
    offsets = np.concatenate([np.arange(block), np.repeat(np.arange(block), block) + 1 + np.tile(np.arange(block), block)])
    groups = np.concatenate([np.zeros(block), np.repeat(np.arange(block), block) + 1]).astype(np.int32)
    tokens = jnp.asarray([prompt[-block:] + [mask_token_id(trained.cfg)] * block * block], jnp.int32)
    start = len(prompt) - block

    def step(m):
        cache = _prefill(m, prompt[:start], 48)
        return m(tokens, jnp.asarray(start + offsets)[None], groups=jnp.asarray(groups)[None], cache=cache, write=block)

    poisoned = nnx.clone(trained)
    row = mask_token_id(trained.cfg)
    poisoned.embed_tokens.weight[...] = poisoned.embed_tokens.weight[...].at[row].set(50.0)
    (logits, cache), (logits_p, cache_p) = step(trained), step(poisoned)
    for a, b in zip(jax.tree.leaves(cache.layers), jax.tree.leaves(cache_p.layers)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    keep = np.arange(V) != row  # the tied head's logit of [MASK] itself moves with its embedding
    np.testing.assert_array_equal(np.asarray(logits[:, :block, keep]), np.asarray(logits_p[:, :block, keep]))  # AR
    assert np.abs(np.asarray(logits[:, block:]) - np.asarray(logits_p[:, block:])).max() > 1e-3  # drafts differ
    # and the slots hold exactly the causal tokens: the cache of a plain prefill of the same tokens
    fresh = _prefill(trained, prompt, 48)
    for a, b in zip(jax.tree.leaves(cache.layers), jax.tree.leaves(fresh.layers)):
        np.testing.assert_allclose(np.asarray(a)[:, :len(prompt)], np.asarray(b)[:, :len(prompt)], atol=1e-5)
    assert np.asarray(cache.positions)[0, :len(prompt)].tolist() == list(range(len(prompt)))


def test_rollback_leaves_later_steps_identical_to_a_fresh_prefill_of_the_committed_prefix(trained):
    prompt = periodic(np.random.default_rng(4), 1, 40)[0].tolist()
    block = 6
    cache = _prefill(trained, prompt[:30], 64)
    wrong = [(t + 5) % (V - 1) for t in prompt[30:36]]  # a block whose last 4 drafts are rejected
    _, cache = trained(jnp.asarray([prompt[30:32] + wrong[2:]], jnp.int32), jnp.arange(30, 36)[None], cache=cache)
    rolled = cache.rollback(jnp.array([32]))  # d_0, d_1 committed; slots 32..35 are stale
    fresh = _prefill(trained, prompt[:32], 64)
    nxt = jnp.asarray([prompt[32:32 + block]], jnp.int32)
    a, ca = trained(nxt, jnp.arange(32, 32 + block)[None], cache=rolled)
    b, cb = trained(nxt, jnp.arange(32, 32 + block)[None], cache=fresh)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert int(ca.step[0]) == int(cb.step[0]) == 32 + block


def test_tidar_sampling_draws_exactly_from_the_ar_model():
    """Chi-square: the first 3 new tokens of TiDAR sampling (temperature 1, beta 1, block 4, so
    tokens 2 and 3 are accepted drafts or resampled residuals) against the AR model's exact joint
    probabilities, over 6000 rows of one prompt (each row draws independently)."""
    v = 5  # 4 sampleable tokens and [MASK]: 64 outcomes
    m = tidar_model(seed=2, vocab_size=v, init_std=0.5)
    prompt, n = [0, 1, 2, 3, 1, 2], 6000
    out, stats = generate(m, [prompt] * n, max_new_tokens=3, sampling=Sampling(temperature=1.0),
                          speculative=TiDAR(4, 1.0), seed=0, return_stats=True)
    assert stats.acceptance_rate > 0.05  # both branches of the rule are exercised (thousands of acceptances)
    combos = np.array(np.meshgrid(*[np.arange(v - 1)] * 3, indexing="ij")).reshape(3, -1).T  # [64, 3]
    ctx = jnp.asarray([prompt + list(c) for c in combos], jnp.int32)
    logp = jax.nn.log_softmax(m(ctx)[:, :, :v - 1], axis=-1)  # the AR model, [MASK] never sampled
    p = len(prompt)
    joint = np.exp(sum(np.asarray(jnp.take_along_axis(logp[:, p - 1 + i], ctx[:, p + i, None], axis=1))[:, 0]
                       for i in range(3)))
    index = {tuple(c): i for i, c in enumerate(combos.tolist())}
    observed = np.bincount([index[tuple(row)] for row in out], minlength=len(combos))
    joint = joint.astype(np.float64)
    expected = joint / joint.sum() * n
    assert scipy_stats.chisquare(observed, expected).pvalue > 1e-3
    # the test has power: at this size it tells the AR model from a near one (the first token's
    # probabilities flattened by 20%), as a rule that favoured the drafts would be
    flatter = joint ** 0.8
    assert scipy_stats.chisquare(observed, flatter / flatter.sum() * n).pvalue < 1e-6


def test_bad_speculative_settings_are_one_line_errors(trained):
    plain = Transformer(config_from_dict({"model": dict(vocab_size=V, d_model=32, n_layer=1, attention=dict(n_head=4))}).model,
                        rngs=nnx.Rngs(0))
    for model, kwargs, message in ((plain, dict(speculative=TiDAR()), "model.diffusion"),
                                   (trained, dict(speculative=TiDAR(0)), "block is 0; allowed"),
                                   (trained, dict(speculative=TiDAR(4, 1.5)), "beta is 1.5; allowed"),
                                   (trained, dict(speculative=TiDAR(), cached=False), "needs the KV cache")):
        with pytest.raises(DecodeError, match=message) as e:
            generate(model, [[1, 2]], max_new_tokens=4, sampling=GREEDY, **kwargs)
        assert "\n" not in str(e.value)
