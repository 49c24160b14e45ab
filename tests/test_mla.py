"""Unit tests of Multi-head Latent Attention: the seed-004 shapes, rope layouts, YaRN numbers,
causality of the latent path, and exact weight conversion."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxllm.config import MLAConfig, config_from_dict, to_dict
from jaxllm.errors import ConfigError
from jaxllm.convert.state_dict import to_torch_layout, torch_shape
from jaxllm.model import Transformer
from jaxllm.model.mla import MultiHeadLatentAttention, mscale_squared, rope_amplitude, rope_inv_freq, softmax_scale
from jaxllm.model.attention import AttentionMask
from torch_ref.mla import MultiHeadLatentAttention as TorchMLA
from torch_ref.model import Transformer as TorchTransformer
from torch_ref.model import namespace
from tests.test_convert import assert_jax_torch_jax_round_trip_is_exact, params

# seeds/004: (in_features, out_features) of every Linear inside MultiHeadLatentAttention.
SEED004_PRINTOUT = {"kv_proj_d": (768, 192), "q_proj_d": (768, 192), "k_proj_u": (192, 384), "v_proj_u": (192, 768),
                    "q_proj_u": (192, 384), "rope_k": (768, 384), "rope_q": (192, 384), "o_proj": (768, 768)}
SEED004_MLA = dict(variant="seed004", q_lora_rank=192, kv_lora_rank=192, qk_nope_head_dim=32, qk_rope_head_dim=32,
                   v_head_dim=64, rope_layout="half")
DEEPSEEK = dict(variant="deepseek", q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12)


def mla_model_config(mla, d_model=32, n_head=4, **model):
    base = dict(vocab_size=61, d_model=d_model, n_layer=2, max_seq_len=64, position=dict(kind="rope"),
                norm=dict(kind="rmsnorm"), attention=dict(kind="mla", n_head=n_head, mla=mla))
    base.update(model)
    return config_from_dict({"model": base}).model


def randomized(cfg, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var[...] = jnp.asarray(0.2 * rng.standard_normal(var.shape), jnp.float32)
    return model


def test_seed004_shapes_match_the_printout():
    cfg = mla_model_config(SEED004_MLA, d_model=768, n_head=12)
    attn = nnx.eval_shape(lambda: MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0)))
    shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(attn, nnx.Param))}
    assert shapes == {f"{name}.weight": shapes[f"{name}.weight"] for name in SEED004_PRINTOUT}, "no other params"
    for name, (n_in, n_out) in SEED004_PRINTOUT.items():
        assert torch_shape(f"{name}.weight", shapes[f"{name}.weight"]) == (n_out, n_in), name
    torch_attn = TorchMLA(namespace(to_dict(cfg)))
    assert {name: (m.in_features, m.out_features, m.bias) for name, m in torch_attn.named_children()} == {
        name: (n_in, n_out, None) for name, (n_in, n_out) in SEED004_PRINTOUT.items()}
    assert sum(p.numel() for p in torch_attn.parameters()) == 1_548_288  # per layer, no biases, no norms


@pytest.mark.parametrize("mla", [DEEPSEEK, {**DEEPSEEK, "q_lora_rank": None}, SEED004_MLA])
def test_every_mla_parameter_has_logical_axes_of_its_rank(mla):
    attn = nnx.eval_shape(lambda: MultiHeadLatentAttention(mla_model_config(mla), rngs=nnx.Rngs(0)))
    allowed = {"embed", "heads", "head_dim", "latent", "norm"}
    for path, var in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
        axes = var.get_metadata()["axes"]
        assert len(axes) == len(var.shape) and set(axes) <= allowed, (path, axes)
        reads_or_writes_a_latent = path[0] in {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "q_proj_d",
                                               "q_proj_u", "rope_q", "kv_proj_d", "k_proj_u", "v_proj_u"}
        assert ("latent" in axes) == reads_or_writes_a_latent, (path, axes)


def _permute_rope_columns(params: dict, cfg) -> dict:
    """Weights for the half layout that compute what `params` compute with interleaved pairs:
    rope output column j takes the interleaved column perm[j] = (0, 2, 4, ..., 1, 3, 5, ...)[j]."""
    m = cfg.attention.mla
    r, c, nope = m.qk_rope_head_dim, m.kv_lora_rank, m.qk_nope_head_dim
    perm = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])
    out = dict(params)
    for key, w in params.items():
        if key.endswith("q_b_proj.weight"):  # [Cq, N, nope + R]
            out[key] = np.concatenate([w[..., :nope], w[..., nope:][..., perm]], axis=-1)
        elif key.endswith("kv_a_proj_with_mqa.weight"):  # [D, C + R]
            out[key] = np.concatenate([w[:, :c], w[:, c:][:, perm]], axis=-1)
    return out


def test_interleaved_and_half_layouts_differ_by_a_fixed_column_permutation():
    interleaved = mla_model_config(DEEPSEEK)
    half = mla_model_config({**DEEPSEEK, "rope_layout": "half"})
    source = randomized(interleaved)
    weights = params(source)
    permuted = _permute_rope_columns(weights, interleaved)
    ids = jax.random.randint(jax.random.key(1), (2, 40), 0, 61)
    half_model = Transformer(half, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda model, ids: model(ids))

    def jax_logits(cfg, weights):
        model = source if cfg is interleaved else half_model
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            var[...] = jnp.asarray(weights[".".join(map(str, path))])
        return np.asarray(forward(model, ids))

    def torch_logits(cfg, weights):  # torch_ref rotates interleaved pairs as complex numbers
        model = TorchTransformer(to_dict(cfg))
        model.load_state_dict({k: torch.from_numpy(to_torch_layout(k, v)) for k, v in weights.items()})
        with torch.no_grad():
            return model(torch.from_numpy(np.array(ids))).numpy()

    for logits in (jax_logits, torch_logits):
        reference = logits(interleaved, weights)
        scale = np.abs(reference).max()
        np.testing.assert_allclose(logits(half, permuted), reference, rtol=0, atol=1e-5 * scale)
        assert np.abs(logits(half, weights) - reference).max() > 1e-2 * scale  # the layouts do differ


def test_mscale_squared_for_v2_lite_and_v3():
    v2_lite = MLAConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, yarn_factor=40.0, yarn_mscale=0.707,
                        yarn_mscale_all_dim=0.707)
    assert mscale_squared(v2_lite) == pytest.approx((0.1 * 0.707 * math.log(40.0) + 1.0) ** 2, rel=1e-12)
    assert mscale_squared(v2_lite) == pytest.approx(1.590, abs=1e-3)  # papers.md §3.3
    assert softmax_scale(v2_lite) == pytest.approx(1.590 / math.sqrt(192), rel=1e-3)
    assert rope_amplitude(v2_lite) == 1.0  # mscale == mscale_all_dim: no factor on cos/sin
    v3 = MLAConfig(yarn_factor=40.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0)
    assert mscale_squared(v3) == pytest.approx(1.874, abs=1e-3)
    assert mscale_squared(MLAConfig()) == 1.0 and softmax_scale(MLAConfig()) == 192**-0.5
    # mscale_all_dim 0 (HF's default): no softmax factor, the whole mscale on cos/sin
    assert mscale_squared(MLAConfig(yarn_factor=40.0)) == 1.0
    assert rope_amplitude(MLAConfig(yarn_factor=40.0)) == pytest.approx(0.1 * math.log(40.0) + 1.0)


def test_yarn_keeps_fast_dims_and_interpolates_slow_ones():
    # R = 64, theta 1e4, original context 4096: dim pair i turns 4096 * theta^(-2i/64) / (2 pi) times.
    # It turns more than beta_fast = 32 times for i <= 10.47 and fewer than beta_slow = 1 for i >= 22.5,
    # so the ramp runs from i = 10 (floor) to i = 23 (ceil).
    mla = MLAConfig(qk_rope_head_dim=64, yarn_factor=40.0, yarn_original_max_position=4096)
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    inv_freq = np.asarray(rope_inv_freq(mla, 10000.0), np.float64)
    np.testing.assert_allclose(inv_freq[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(inv_freq[23:], base[23:] / 40.0, rtol=1e-6)
    assert np.all(inv_freq[11:23] < base[11:23] * (1 - 1e-3)) and np.all(inv_freq[11:23] > base[11:23] / 40.0)
    np.testing.assert_allclose(inv_freq[16], base[16] * (1 - 6 / 13) + base[16] / 40.0 * 6 / 13, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(MLAConfig(qk_rope_head_dim=64), 10000.0)), base, rtol=1e-6)


@pytest.mark.parametrize("mla", [DEEPSEEK, {**DEEPSEEK, "variant": "seed004", "rope_layout": "half"}])
def test_latents_are_causal_and_share_one_rope_key_for_deepseek(mla):
    attn = MultiHeadLatentAttention(mla_model_config(mla), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
        var[...] = jnp.asarray(0.2 * rng.standard_normal(var.shape), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (1, 20, 32))
    x = jnp.concatenate([x, x.at[:, 12:].set(jax.random.normal(jax.random.key(1), (1, 8, 32)))])  # change the tail
    positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
    c_kv, k_rope = jax.eval_shape(attn.latents, x, positions)
    assert c_kv.shape == (2, 20, mla["kv_lora_rank"])
    assert k_rope.shape == (2, 20, 1 if mla["variant"] == "deepseek" else 4, mla["qk_rope_head_dim"])
    y = np.asarray(nnx.jit(lambda attn, x, positions: attn(x, positions, AttentionMask(None, None)))(attn, x, positions))
    np.testing.assert_array_equal(y[0, :12], y[1, :12])
    assert np.abs(y[0, 12:] - y[1, 12:]).min() > 0


@pytest.mark.parametrize("mla", [DEEPSEEK, {**DEEPSEEK, "q_lora_rank": None}, {**DEEPSEEK, "variant": "seed004"}])
def test_converter_round_trip_is_exact(mla):
    cfg = mla_model_config(mla, attention=dict(kind="mla", n_head=4, mla=mla, qkv_bias=True, out_bias=True))
    assert_jax_torch_jax_round_trip_is_exact(cfg, randomized(cfg))


def test_mla_rotates_with_its_own_theta_and_ignores_position_rope_theta_when_positions_are_learned():
    """Seed 004's layout: learned positions and MLA's rope dims. `position.rope_theta` belongs to rope
    positions; MLA reads `mla.rope_theta` (resolved from position.rope_theta for rope models only)."""
    learned = dict(kind="learned")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (1, 48)))

    def logits(position, mla=DEEPSEEK):
        cfg = mla_model_config(mla, position=position)
        return np.asarray(randomized(cfg)(tokens))

    base = logits(learned)
    assert mla_model_config(DEEPSEEK, position=learned).attention.mla.rope_theta == 10000.0
    np.testing.assert_array_equal(logits(dict(learned, rope_theta=500.0)), base)
    assert np.abs(logits(learned, {**DEEPSEEK, "rope_theta": 500.0}) - base).max() > 1e-3
    assert mla_model_config(DEEPSEEK, position=dict(kind="rope", rope_theta=500.0)).attention.mla.rope_theta == 500.0


def test_mla_rope_theta_that_contradicts_position_rope_theta_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"model.attention.mla.rope_theta=500.0 is invalid") as e:
        mla_model_config({**DEEPSEEK, "rope_theta": 500.0}, position=dict(kind="rope", rope_theta=10000.0))
    assert "\n" not in str(e.value)
