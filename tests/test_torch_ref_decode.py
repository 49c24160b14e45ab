"""torch_ref decoding (docs/sampling.md), torch only: the cache against recomputation for
every attention and model kind, and TiDAR self-speculative decoding against plain decoding (greedy
outputs, what reaches the cache, rollback, and the sampling rule's distribution). Small models with
random weights; the configs come from jaxllm.config."""
import functools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import torch_ref.generate as gen
from jaxllm.config import config_from_dict, to_dict
from torch_ref.layers import visible
from torch_ref.model import Cache, Transformer, mask_token_id

NEW = 64
ROPE = dict(position=dict(kind="rope"))
MLA = dict(kind="mla", n_head=4, mla=dict(kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                          v_head_dim=16))


@pytest.fixture(autouse=True, scope="module")
def inference():
    """No autograd; one thread (these models are tiny: faster, and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


def build(seed, **model):
    """A torch_ref model (width 64, 2 layers, 4 heads, vocab 128, context 320 unless overridden), every
    weight redrawn as the parity harness does: std 0.1-0.3 per tensor, norm weights 1 + N(0, 0.2)."""
    base = dict(vocab_size=128, d_model=64, n_layer=2, max_seq_len=320, attention=dict(n_head=4))
    for key, value in model.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    m = Transformer(to_dict(config_from_dict({"model": base}).model)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.empty(()).uniform_(0.1, 0.3, generator=g) * torch.randn(p.shape, generator=g))
    return m


def random_prompts(seed, lengths, vocab=127):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------
# The cache: the same greedy tokens as recomputing the whole context

CACHED = {
    "dense-learned-layernorm": dict(position=dict(kind="learned")),
    "gqa-rope-window-24": dict(**ROPE, attention=dict(n_head=4, n_kv_head=2, window=24)),
    "mla-deepseek": dict(**ROPE, attention=MLA),
    "mla-seed004-window-32": dict(position=dict(kind="learned"), attention=dict(
        kind="mla", n_head=4, window=32, mla=dict(variant="seed004", kv_lora_rank=32, q_lora_rank=24,
                                                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                                   rope_layout="half"))),
    "moe-shared-expert": dict(**ROPE, mlp=dict(kind="swiglu"), moe=dict(
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32)),
    "loop-prelude-coda": dict(**ROPE, n_layer=3, recursion=dict(mode="loop", n_prelude=1, n_core=1, n_loops=3)),
    "trm-random-init": dict(**ROPE, recursion=dict(mode="trm", n_prelude=1, n_core=1, n_loops=2, n_latent_steps=2,
                                                   init="random")),
}
SEED = 0  # its greedy outputs are not a few repeated tokens (asserted)


@pytest.mark.parametrize("name", sorted(CACHED))
def test_cached_greedy_decoding_equals_recomputing_the_context(name):
    model = build(SEED, **CACHED[name])
    prompts = random_prompts(SEED, [240, 200])  # left-padded in one batch; longer than any window
    cached = gen.generate(model, prompts, NEW)
    assert [len(row) for row in cached] == [NEW, NEW]
    assert all(len(set(row)) >= 8 for row in cached), f"degenerate output, the comparison would prove little: {cached}"
    assert cached == gen.generate(model, prompts, NEW, cached=False)  # one prompt at a time, no cache


@pytest.mark.parametrize("name,applications", [("loop-prelude-coda", 3), ("trm-random-init", 6)])
def test_each_application_of_the_looped_core_has_its_own_cache(name, applications):
    model = build(0, **CACHED[name])
    cache = Cache(model, 1, 16)
    assert [len(layer) for layer in cache.layers] == [1, applications] + [1] * (len(model.layers) - 2)
    model(torch.arange(10)[None], cache=cache)
    keys = [buffers[0][0, :10] for buffers in cache.layers[1]]  # the core layer's keys, per application
    assert all(k.abs().sum() > 0 for k in keys)
    assert all(not torch.allclose(a, b) for i, a in enumerate(keys) for b in keys[i + 1:])


# ---------------------------------------------------------------------------------------------
# TiDAR, greedy: with beta = 1 the output is plain greedy decoding's

TIDAR = {
    "dense": dict(**ROPE),
    "gqa-window-24": dict(**ROPE, attention=dict(n_head=4, n_kv_head=2, window=24)),
    "mla": dict(**ROPE, attention=MLA),
}
LENGTHS = {1: [200], 4: [200, 150, 90, 57]}


@functools.cache
def tidar_model(name):
    return build(SEED, diffusion=dict(enabled=True, block_size=4), **TIDAR[name])


@functools.cache
def plain_greedy(name, batch):
    prompts = random_prompts(SEED, LENGTHS[batch])
    return prompts, gen.generate(tidar_model(name), prompts, NEW)


@pytest.mark.parametrize("block", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", sorted(TIDAR))
def test_tidar_greedy_with_beta_1_is_plain_greedy_decoding(name, batch, block):
    prompts, plain = plain_greedy(name, batch)
    out, stats = gen.generate(tidar_model(name), prompts, NEW, speculative="tidar", block=block, return_stats=True)
    assert out == plain
    for row, steps in zip(out, stats):
        assert all(0 <= n <= block - 1 for n in steps)
        assert len(row) == min(NEW, 1 + sum(n + 1 for n in steps))  # d_0, then n + 1 tokens a step
        assert len(row) - 1 > sum(n + 1 for n in steps[:-1])  # no step after the row was finished
    assert any(n > 0 for steps in stats for n in steps), "no draft was ever accepted: the comparison proves little"


def test_tidar_rows_accept_different_counts_in_the_same_step():
    prompts, plain = plain_greedy("gqa-window-24", 4)
    out, stats = gen.generate(tidar_model("gqa-window-24"), prompts, NEW, speculative="tidar", block=4,
                              return_stats=True)
    assert out == plain
    assert any(len({steps[k] for steps in stats}) > 1 for k in range(min(map(len, stats))))
    assert len({len(steps) for steps in stats}) > 1  # so the rows needed different numbers of steps


def test_tidar_ends_rows_and_streams_like_plain_decoding():
    """EOS, a stop sequence and the repetition penalty (seen: the row's tokens plus d_0..d_j): the same
    tokens as plain greedy decoding; on_token gets each of them, one per row and call."""
    model = tidar_model("gqa-window-24")
    prompts = random_prompts(1, [120, 80])
    plain = gen.generate(model, prompts, NEW, repetition_penalty=1.3)
    eos, stop = plain[0][20], plain[1][30:32]
    assert eos not in plain[0][:20] and stop not in [plain[1][i:i + 2] for i in range(30)]
    settings = dict(repetition_penalty=1.3, eos_id=eos, stop_sequences=[stop])
    expected = gen.generate(model, prompts, NEW, **settings)
    assert [len(row) for row in expected] == [21, 32]
    streamed = []
    out = gen.generate(model, prompts, NEW, speculative="tidar", block=4, **settings,
                       on_token=lambda tokens, active: streamed.append((tokens.tolist(), list(active))))
    assert out == expected
    assert [[tokens[b] for tokens, active in streamed if active[b]] for b in range(2)] == out
    assert all(any(active) for _, active in streamed)  # a call per token of the step's longest row


@pytest.mark.parametrize("window", [None, 2])
def test_a_step_is_the_papers_layout_and_mask(window):
    """papers.md §1.3 (Fig. 2, B = 3 after 3 committed tokens): positions 3 4 5 | 4 5 6 | 5 6 7 | 6 7 8;
    d_i sees the cache and d_0..d_i; block M^(j) sees the cache, d_0..d_j and all of itself; the
    window limits the causal keys only."""
    B, L = 3, 3
    tokens, positions, groups = gen.tidar_step_inputs(torch.tensor([[7, 8, 9]]), torch.tensor([L]), 0)
    assert positions[0].tolist() == [3, 4, 5, 4, 5, 6, 5, 6, 7, 6, 7, 8]
    assert tokens[0].tolist() == [7, 8, 9] + [0] * 9 and groups[0].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    slots = torch.tensor([[0, 1, 2, 3, 4, 5, -1]])  # the cache after this step's writes, one empty slot
    keys = torch.cat([slots, positions[:, B:]], dim=1), torch.cat([torch.zeros_like(slots), groups[:, B:]], dim=1)
    expected = torch.zeros(12, 7 + 9, dtype=torch.bool)
    in_window = (lambda q, k: True) if window is None else (lambda q, k: q - k < window)
    for q in range(12):
        p, j = int(positions[0, q]), q // B - 1  # query q is d_q (j = -1) or a token of M^(j)
        for k in range(L + (q if j < 0 else j) + 1):  # the prefix, then d_0..d_i or d_0..d_j
            expected[q, k] = in_window(p, k)
        if j >= 0:
            expected[q, 7 + j * B:7 + (j + 1) * B] = True
    assert torch.equal(visible(positions, groups, *keys, window)[0], expected)


def test_tidar_needs_a_tidar_model():
    with pytest.raises(ValueError, match="diffusion"):
        gen.generate(build(0), [[1, 2, 3]], 4, speculative="tidar")


# ---------------------------------------------------------------------------------------------
# TiDAR's cache: the causal tokens only, and rollback by the step alone


def greedy_processing(cfg):
    return lambda logits, seen: gen.process_logits(gen.never_sampled(cfg, logits.float()), seen, 0.0, 0, 1.0, 0.0, 1.0)


def prefill_and_step(model, prompts, block):
    """A TiDAR prefill and one greedy step: (cache, tokens, positions, the step's block, n, the next block)."""
    cfg = model.cfg
    tokens, positions = gen.left_pad(prompts, "cpu")
    B, P = tokens.shape
    lengths = positions[:, -1] + 1
    cache = Cache(model, B, gen.cache_size(cfg, P, NEW, slack=block))
    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool)
    process = greedy_processing(cfg)
    drafts = gen.tidar_prefill(model, cache, tokens, positions, lengths, block, 1.0, process, 0.0, seen, None)
    n, next_drafts = gen.tidar_step(model, cache, drafts, P - lengths, torch.ones(B, dtype=torch.bool), 1.0,
                                    process, 0.0, seen, None)
    return cache, tokens, positions, drafts, n, next_drafts


@pytest.mark.parametrize("name", ["dense", "mla"])
def test_mask_tokens_never_reach_the_cache(name):
    """After a prefill and a step, every buffer equals that of a plain causal prefill of the prompts
    followed by the step's B causal tokens: the mask tokens' keys and values are in no slot."""
    model, block = tidar_model(name), 4
    cache, tokens, positions, drafts, n, _ = prefill_and_step(model, random_prompts(3, [100, 70]), block)
    P = tokens.shape[1]
    lengths = positions[:, -1] + 1
    reference = Cache(model, 2, cache.positions.shape[1])
    model(torch.cat([tokens, drafts], dim=1), torch.cat([positions, lengths[:, None] + torch.arange(block)], dim=1),
          cache=reference)
    assert torch.equal(cache.positions, reference.positions)
    for layer, reference_layer in zip(cache.layers, reference.layers):
        for buffer, reference_buffer in zip(layer[0], reference_layer[0]):
            assert buffer[:, P + block:].abs().sum() == 0
            torch.testing.assert_close(buffer, reference_buffer, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.step, P + n + 1)  # committed d_0..d_n: the rejected drafts rolled back


@pytest.mark.parametrize("name", ["dense", "gqa-window-24", "mla"])
def test_after_a_rollback_the_next_step_sees_only_the_committed_prefix(name):
    """A step that accepted n < B - 1 drafts, then the next step on that cache: the same logits (AR
    and diffusion) as that step on a fresh cache prefilled with the committed prefix alone, and as
    the rule without a cache on the prefix and the step's tokens. (The window is shorter than the
    prompt: the rollback happens in a rolling buffer.)"""
    model, block = tidar_model(name), 4
    prompt = random_prompts(4, [100])[0]
    cache, _, _, drafts, n, next_drafts = prefill_and_step(model, [prompt], block)
    n = int(n[0])
    assert n < block - 1
    committed = prompt + drafts[0, :n + 1].tolist()
    tokens, positions, groups = gen.tidar_step_inputs(next_drafts, torch.tensor([len(committed)]),
                                                      mask_token_id(model.cfg))
    logits = model(tokens, positions, groups, cache=cache, write=block)

    fresh = Cache(model, 1, cache.positions.shape[1])
    model(torch.tensor([committed]), cache=fresh)
    torch.testing.assert_close(logits, model(tokens, positions, groups, cache=fresh, write=block), rtol=1e-5, atol=1e-5)
    whole = model(torch.cat([torch.tensor([committed]), tokens], dim=1),
                  torch.cat([torch.arange(len(committed))[None], positions], dim=1),
                  torch.cat([torch.zeros(1, len(committed), dtype=torch.long), groups], dim=1))
    torch.testing.assert_close(logits, whole[:, len(committed):], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# TiDAR, sampling: the exact speculative rule draws from the AR model

V, ROWS, PENALTY = 8, 8000, 4.0  # 7 tokens and [MASK] (7): 7^3 sequences of 3 tokens, [MASK] in none


def accept_always(processed, drafts, temperature, generator):  # a wrong rule: every draft accepted
    p = processed[:, -1].softmax(-1)
    return torch.full((len(drafts),), drafts.shape[1] - 1), torch.multinomial(p, 1, generator=generator)[:, 0]


def accept_without_removing_the_draft(processed, drafts, temperature, generator):  # a wrong rule: y_j ~ p_j itself
    p = processed.softmax(-1)
    p_draft = p[:, :-1].gather(-1, drafts[:, 1:, None])[..., 0]
    n = (torch.rand(p_draft.shape, generator=generator) < p_draft).long().cumprod(1).sum(1)
    return n, torch.multinomial(p[torch.arange(len(drafts)), n], 1, generator=generator)[:, 0]


def exact_probabilities(model, prompt):
    """[V, V, V]: the AR probability of each sequence of 3 new tokens (temperature 1, the repetition
    penalty over the prompt and the new tokens before), by recomputing every context."""
    cfg = model.cfg
    contexts = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
    logits = model(contexts)[:, len(prompt) - 1:]  # [V^2, 3, V]: for the 1st, 2nd and 3rd new token
    probs = []
    for k in range(3):
        seen = torch.zeros(len(contexts), V, dtype=torch.bool)
        for row, ids in enumerate(contexts[:, :len(prompt) + k].tolist()):
            seen[row, ids] = True
        processed = gen.process_logits(gen.never_sampled(cfg, logits[:, k].clone()), seen, 1.0, 0, 1.0, 0.0, PENALTY)
        probs.append(processed.softmax(-1).view(V, V, V).double())
    p1, p2, p3 = probs[0][0, 0], probs[1][:, 0], probs[2]  # p(a), p(b | a), p(c | a, b)
    return p1[:, None, None] * p2[:, :, None] * p3


def sampling_p_value(model, prompt, exact, block):
    out = gen.generate(model, [prompt] * ROWS, 3, temperature=1.0, repetition_penalty=PENALTY,
                       speculative="tidar", block=block, seed=0)
    assert all(len(row) == 3 for row in out)
    counts = np.zeros((V,) * 3)
    np.add.at(counts, tuple(np.array(out).T), 1)
    expected = ROWS * (exact / exact.sum()).numpy()
    rare = expected < 5  # pooled into one cell (the sequences with [MASK] among them)
    observed = np.append(counts[~rare], counts[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    return chisquare(observed, expected).pvalue


@pytest.mark.parametrize("block", [2, 4])  # 2: the first 3 tokens include y_{B-1} after all drafts accepted
def test_tidar_sampling_draws_the_first_tokens_from_the_ar_distribution(block, monkeypatch):
    """Chi-square of the first 3 tokens of 8000 rows (the prefill's d_0, then steps that accept
    and reject) against the exact AR probabilities; the same test rejects two wrong rules. The
    strong repetition penalty and the one-token prompt make the per-j seen sets matter."""
    model = build(2, vocab_size=V, d_model=32, n_layer=1, max_seq_len=32, tie_embeddings=False,
                  diffusion=dict(enabled=True, block_size=4), **ROPE)  # untied: drafts are seldom [MASK]
    prompt = [5]
    exact = exact_probabilities(model, prompt)
    assert exact.sum().item() == pytest.approx(1.0) and exact.max() < 0.1  # a spread distribution
    assert sampling_p_value(model, prompt, exact, block) > 1e-3
    for wrong in (accept_always, accept_without_removing_the_draft):
        monkeypatch.setattr(gen, "accept", wrong)
        assert sampling_p_value(model, prompt, exact, block) < 1e-6, wrong.__name__
