"""Greedy decoding: jaxllm with the KV cache, jaxllm recomputing the full context, and torch_ref
(with and without its cache) give the same 64 tokens on the same weights (DESIGN.md parity
contract), for a batch of two prompts of different lengths (left-padded in one batch by the cached
paths) long enough for position bugs to show; TiDAR self-speculative decoding takes the same
accept decisions in both implementations, step by step, and with beta = 1 gives those tokens too."""
import numpy as np
import pytest
import torch

from jaxllm.convert import to_state_dict
from jaxllm.decode import TiDAR, generate
from parity_tests.harness import make_pair, tiny_config
from torch_ref.generate import generate as torch_generate

NEW = 64
MLA = dict(kind="mla", n_head=4, mla=dict(kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
                                          qk_rope_head_dim=8, v_head_dim=16))
CASES = {
    "dense-learned-layernorm-gelu": dict(position=dict(kind="learned"), attention=dict(n_head=4)),
    "gqa-rope-swiglu": dict(position=dict(kind="rope"), norm=dict(kind="rmsnorm"), mlp=dict(kind="swiglu"),
                            attention=dict(n_head=4, n_kv_head=2), tie_embeddings=False),
    "mqa-sliding-window-24": dict(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=1, window=24)),
    "mla-deepseek": dict(position=dict(kind="rope"), attention=MLA),
    "mla-seed004-window-32": dict(position=dict(kind="learned"), attention=dict(
        kind="mla", n_head=4, window=32, mla=dict(variant="seed004", kv_lora_rank=32, q_lora_rank=24,
                                                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                                   rope_layout="half"))),
    "moe-shared-experts": dict(position=dict(kind="rope"), mlp=dict(kind="swiglu"), moe=dict(
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32)),
    "recursive-loop-concat": dict(position=dict(kind="rope"), n_layer=4, recursion=dict(
        mode="loop", n_prelude=1, n_core=2, n_loops=3, inject="concat")),
    "recursive-trm": dict(position=dict(kind="rope"), n_layer=3, recursion=dict(
        mode="trm", n_prelude=1, n_core=1, n_loops=2, n_latent_steps=2)),
    "tidar-gqa": dict(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2),
                      diffusion=dict(enabled=True, block_size=8)),
}
SEEDS = {"mla-deepseek": 25}  # the others: 10 + their index; seeds whose greedy output is not one repeated token


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_decoding_is_identical_cached_uncached_and_torch(name):
    pair = make_pair(tiny_config(**CASES[name]), seed=SEEDS.get(name, sorted(CASES).index(name) + 10),
                     seq=200)
    prompts = [pair.tokens[0, :200].tolist(), pair.tokens[1, :137].tolist()]  # both longer than any window
    cached = generate(pair.jax_model, prompts, max_new_tokens=NEW)
    uncached = generate(pair.jax_model, prompts, max_new_tokens=NEW, cached=False)
    torch_cached = torch_generate(pair.torch_model, prompts, NEW)
    torch_uncached = torch_generate(pair.torch_model, prompts, NEW, cached=False)  # one prompt at a time
    assert [len(row) for row in cached] == [NEW, NEW]
    for row in cached:
        assert len(set(row)) >= 8, f"degenerate output, the comparison would prove little: {row}"
    assert cached == uncached
    assert cached == torch_uncached
    assert torch_cached == torch_uncached


def test_a_tidar_model_decodes_with_the_cache_and_never_samples_its_mask_token():
    """A TiDAR-trained model is also a causal model: cached, uncached and torch_ref agree, and the
    [MASK] id (here made the most likely token everywhere by its LM-head bias) is never emitted."""
    import jax.numpy as jnp
    import torch

    cfg = tiny_config(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2), lm_head_bias=True,
                      diffusion=dict(enabled=True, block_size=8))
    pair = make_pair(cfg, seed=12, seq=200)
    mask_id = cfg.model.vocab_size - 1
    bias = pair.jax_model.lm_head_bias
    bias[...] = bias[...].at[mask_id].set(1e3)
    with torch.no_grad():
        pair.torch_model.lm_head_bias[mask_id] = 1e3
    prompts = [pair.tokens[0, :150].tolist(), pair.tokens[1, :90].tolist()]
    cached = generate(pair.jax_model, prompts, max_new_tokens=NEW)
    assert [len(row) for row in cached] == [NEW, NEW]
    assert all(mask_id not in row and len(set(row)) >= 8 for row in cached)
    assert cached == generate(pair.jax_model, prompts, max_new_tokens=NEW, cached=False)
    assert cached == torch_generate(pair.torch_model, prompts, NEW)
    assert cached == torch_generate(pair.torch_model, prompts, NEW, cached=False)


@pytest.mark.parametrize("cached", [True, False])
def test_torch_ref_streams_every_token_with_and_without_its_cache(cached):
    """on_token(tokens [B], active [B]) is called once per step on both torch_ref paths; the tokens
    of the active rows are the returned ones, here with one row ending early at EOS."""
    pair = make_pair(tiny_config(position=dict(kind="rope")), seed=14, seq=64)
    prompts = [pair.tokens[0, :40].tolist(), pair.tokens[1, :23].tolist()]
    full = torch_generate(pair.torch_model, prompts, 24)
    eos = full[0][2]
    assert eos not in full[0][:2] + full[1]  # row 0 stops at its 3rd token, row 1 runs on
    steps = []
    out = torch_generate(pair.torch_model, prompts, 24, eos_id=eos, cached=cached,
                         on_token=lambda tokens, active: steps.append((tokens.tolist(), list(active))))
    assert out == [full[0][:3], full[1]]
    assert len(steps) == max(map(len, out))
    streamed = [[tokens[b] for tokens, active in steps if active[b]] for b in range(2)]
    assert streamed == out


TIDAR = {
    "dense": dict(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2)),
    "window-24": dict(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2, window=24)),
    "mla-deepseek": dict(position=dict(kind="rope"), attention=MLA),
    "mla-seed004": dict(position=dict(kind="learned"), attention=dict(
        kind="mla", n_head=4, mla=dict(variant="seed004", kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
                                       qk_rope_head_dim=8, v_head_dim=12, rope_layout="half"))),
}


def tidar_pair(name: str):
    """A TiDAR pair whose weights make drafts worth verifying: the jaxllm model is trained briefly on
    a repeating corpus (tests/test_tidar_decode.py's recipe), then copied into torch_ref."""
    from tests.test_tidar_decode import periodic, train

    cfg = tiny_config(vocab_size=32, diffusion=dict(enabled=True, block_size=4), **TIDAR[name])
    pair = make_pair(cfg, seed=3, seq=64)
    model = train(nnx_fresh(cfg), steps=120)
    pair.jax_model = model
    pair.torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in to_state_dict(model).items()})
    rows = periodic(np.random.default_rng(5), 2, 220)
    rows[:, :40] = np.random.default_rng(6).integers(0, 31, (2, 40))  # a noisy start: the drafts must recover
    return pair, [rows[0].tolist(), rows[1, :201].tolist()]


def nnx_fresh(cfg):
    from flax import nnx

    from jaxllm.model import Transformer

    return Transformer(cfg.model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(TIDAR))
def test_tidar_takes_the_same_decisions_in_jaxllm_and_torch_ref(name):
    pair, prompts = tidar_pair(name)
    plain = generate(pair.jax_model, prompts, max_new_tokens=NEW)
    assert plain == torch_generate(pair.torch_model, prompts, NEW)
    for block, beta in ((4, 1.0), (8, 1.0), (8, 0.5)):
        tokens, stats = generate(pair.jax_model, prompts, max_new_tokens=NEW, speculative=TiDAR(block, beta),
                                 return_stats=True)
        torch_tokens, torch_accepted = torch_generate(pair.torch_model, prompts, NEW, speculative="tidar", block=block,
                                                      beta=beta, return_stats=True)
        assert stats.accepted == torch_accepted, (block, beta)  # the same n at every step of every row
        assert tokens == torch_tokens, (block, beta)
        if beta == 1.0:
            assert tokens == plain, block
            assert sum(map(sum, stats.accepted)) >= 5, stats.histogram()  # drafts were accepted, not only rejected
