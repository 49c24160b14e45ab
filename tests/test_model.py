"""Unit tests of the JAX model's options: masks, ReZero, LayerDrop, dropout, remat, dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import config_from_dict
from jaxllm.model import Transformer, lm_loss
from jaxllm.model.attention import AttentionMask, attend, causal_mask, visible


def small(**model):
    base = dict(vocab_size=61, d_model=32, n_layer=2, max_seq_len=64, attention=dict(n_head=4))
    base.update(model)
    return config_from_dict({"model": base}).model


def tokens(b=2, t=24, v=61, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, v)


@pytest.mark.parametrize("t, s, window", [(9, 9, None), (9, 9, 1), (9, 9, 4), (5, 12, 3), (12, 12, 20)])
def test_causal_mask_matches_brute_force(t, s, window):
    expected = np.zeros((t, s), bool)
    for qi in range(t):
        i = qi + s - t  # absolute position of the query
        for j in range(s):
            expected[qi, j] = j <= i and (window is None or i - j <= window - 1)
    np.testing.assert_array_equal(np.asarray(causal_mask(t, s, window)), expected)


@pytest.mark.parametrize("window", [None, 1, 5])
def test_fused_attention_equals_einsum_path(window):
    """The fused kernel (jax.nn.dot_product_attention, 'xla') and the einsum path (the CPU's choice,
    and what runs under attention dropout)."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 16, 4, 8))
    k, v = jax.random.normal(kk, (2, 16, 2, 8)), jax.random.normal(kv, (2, 16, 2, 8))
    fused = attend(q, k, v, AttentionMask(None, window), kernel="xla")
    dropout = nnx.Dropout(1e-9, deterministic=False, rngs=nnx.Rngs(0))  # active but keeps everything
    einsum = attend(q, k, v, AttentionMask(None, window), dropout=dropout)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(einsum), rtol=1e-5, atol=1e-5)
    # the rule on positions 0..T-1 (what every forward that is not plain causal builds) is the same pattern
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    groups = jnp.zeros_like(pos)
    ruled = attend(q, k, v, AttentionMask(visible(pos, groups, pos, groups, window), window), kernel="xla")
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ruled), rtol=1e-5, atol=1e-5)
    ruled_einsum = attend(q, k, v, AttentionMask(visible(pos, groups, pos, groups, window), window), kernel="einsum")
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ruled_einsum), rtol=1e-5, atol=1e-5)


def test_sliding_window_sees_exactly_w_keys():
    """With one layer, the last logit changes when the token W-1 back changes, not the one W back."""
    w, t = 5, 16
    cfg = small(n_layer=1, position=dict(kind="rope"), attention=dict(n_head=4, window=w))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens(1, t)
    base = model(x)[0, -1]
    for back, changes in ((w - 1, True), (w, False), (w + 3, False)):
        moved = x.at[0, t - 1 - back].set((x[0, t - 1 - back] + 1) % cfg.vocab_size)
        assert bool(jnp.any(jnp.abs(model(moved)[0, -1] - base) > 1e-6)) == changes, back


def test_rezero_starts_as_identity_and_has_no_block_norms():
    cfg = small(rezero=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert all(block.attn_norm is None and block.mlp_norm is None for block in model.layers)
    x = tokens()
    h = model.embed_tokens(x) + model.embed_positions(jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape))
    expected = model.embed_tokens.attend(model.final_norm(h))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), rtol=1e-6, atol=1e-6)
    grads = nnx.grad(lm_loss)(model, x, x)
    assert all(float(jnp.abs(g[...])) > 0 for g in jax.tree.leaves(
        nnx.state(grads, lambda path, _: path[-1] == "rezero_alpha"), is_leaf=lambda v: isinstance(v, nnx.Variable)))


def _run_layers(model, x, keep):
    """Logits with only the layers in `keep` run, by hand."""
    h = model.embed_tokens(x) + model.embed_positions(jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape))
    for i, block in enumerate(model.layers):
        if keep[i]:
            h = block(h, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape), AttentionMask(None, None))
    return model.embed_tokens.attend(model.final_norm(h))


def test_layerdrop_skips_whole_layers_in_training_only():
    cfg = small(layerdrop=0.5)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens()
    subsets = {keep: np.asarray(_run_layers(model, x, keep)) for keep in [(a, b) for a in (0, 1) for b in (0, 1)]}
    np.testing.assert_allclose(np.asarray(model(x)), subsets[(1, 1)], rtol=1e-5, atol=1e-5)  # eval: all layers
    model.train()
    seen = set()
    for _ in range(24):
        out = np.asarray(model(x))
        match = [keep for keep, ref in subsets.items() if np.allclose(out, ref, rtol=1e-5, atol=1e-5)]
        assert match, "a LayerDrop forward must equal running some subset of whole layers"
        seen.add(match[0])
    assert len(seen) >= 3, seen  # P(fewer than 3 of 4 subsets in 24 draws) is ~1e-4 * small


def test_dropout_only_in_training():
    cfg = small(dropout=0.3, attention=dict(n_head=4, dropout=0.3), mlp=dict(dropout=0.3))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens()
    eval_out = np.asarray(model(x))
    np.testing.assert_array_equal(eval_out, np.asarray(model(x)))
    model.train()
    a, b = np.asarray(model(x)), np.asarray(model(x))
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(eval_out, np.asarray(model(x)))


def test_remat_gives_the_same_gradients():
    x = tokens()
    grads = []
    for remat in (False, True):
        model = Transformer(small(remat=remat, position=dict(kind="rope")), rngs=nnx.Rngs(0))
        grads.append(jax.tree.leaves(nnx.jit(nnx.grad(lm_loss))(model, x, x)))
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_tied_and_untied_heads():
    tied = Transformer(small(tie_embeddings=True), rngs=nnx.Rngs(0))
    untied = Transformer(small(tie_embeddings=False, lm_head_bias=True), rngs=nnx.Rngs(0))
    assert tied.lm_head is None and tied.lm_head_bias is None
    assert untied.lm_head.weight.shape == (32, 61) and untied.lm_head_bias.shape == (61,)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    x = tokens()
    f32 = Transformer(small(position=dict(kind="rope"), mlp=dict(kind="swiglu")), rngs=nnx.Rngs(0))
    bf16 = Transformer(small(position=dict(kind="rope"), mlp=dict(kind="swiglu"), dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    out = bf16(x)
    assert out.dtype == jnp.float32
    ref = f32(x)
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 5e-2


def test_every_parameter_has_logical_axes_of_its_rank():
    model = Transformer(small(position=dict(kind="learned"), rezero=True, lm_head_bias=True, tie_embeddings=False,
                              attention=dict(n_head=4, qkv_bias=True, out_bias=True), mlp=dict(bias=True)),
                        rngs=nnx.Rngs(0))
    allowed = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "positions", "norm"}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["axes"]
        assert len(axes) == var[...].ndim and set(axes) <= allowed, (path, axes)


def _weights(model) -> dict[str, np.ndarray]:
    from flax import nnx as _nnx

    return {".".join(map(str, path)): np.asarray(v[...]) for path, v in _nnx.iter_graph(model)
            if isinstance(v, _nnx.Param)}


@pytest.mark.parametrize("scheme", ["normal", "xavier_uniform", "scaled"])
def test_init_schemes_draw_the_documented_statistics(scheme):
    """model.init: the standard deviation (and for xavier the bound) of every drawn weight kind,
    against the formula written out here; embeddings and routers stay N(0, init_std^2)."""
    from flax import nnx as _nnx

    from jaxllm.config import config_from_dict

    std, d, f, v, n_layer, heads, head_dim, experts, ef = 0.02, 256, 768, 1024, 4, 4, 64, 4, 128
    cfg = config_from_dict({"model": dict(
        vocab_size=v, d_model=d, n_layer=n_layer, max_seq_len=32, tie_embeddings=False, init=scheme,
        init_std=std, position=dict(kind="rope"), attention=dict(n_head=heads, n_kv_head=2),
        mlp=dict(kind="swiglu", d_ff=f),
        moe=dict(n_routed_experts=experts, num_experts_per_tok=2, moe_intermediate_size=ef, first_k_dense=2))}).model
    w = _weights(Transformer(cfg, rngs=_nnx.Rngs(0)))

    def expected(kind: str, fan_in: int, fan_out: int, residual: bool) -> tuple[float, float | None]:
        """(std, bound) of a projection under the scheme."""
        if scheme == "xavier_uniform":
            a = math.sqrt(6 / (fan_in + fan_out))
            return a / math.sqrt(3), a
        return (std / math.sqrt(2 * n_layer) if scheme == "scaled" and residual else std), None

    kinds = {  # a suffix of the weight's path -> (fan_in, fan_out, residual)
        "attn.q_proj.weight": (d, heads * head_dim, False), "attn.k_proj.weight": (d, 2 * head_dim, False),
        "attn.o_proj.weight": (heads * head_dim, d, True), "mlp.gate_proj.weight": (d, f, False),
        "mlp.down_proj.weight": (f, d, True), "experts.up_proj": (d, ef, False), "experts.down_proj": (ef, d, True),
        "lm_head.weight": (d, v, False)}
    for suffix, (fan_in, fan_out, residual) in kinds.items():
        values = np.concatenate([x.ravel() for k, x in w.items() if k.endswith(suffix)])
        assert values.size, suffix
        s, bound = expected(suffix, fan_in, fan_out, residual)
        assert abs(values.std() / s - 1) < 0.05, (suffix, values.std(), s)
        assert abs(values.mean()) < 0.05 * s
        if bound is not None:
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.99 * bound, suffix
    for suffix in ("embed_tokens.weight", "router.weight"):
        values = np.concatenate([x.ravel() for k, x in w.items() if k.endswith(suffix)])
        assert abs(values.std() / std - 1) < 0.05, suffix
