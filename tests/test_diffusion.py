"""TiDAR dual-mode training: the attention mask against a brute-force reading of papers.md §1.2,
no label leak, and the clean half equal to a plain causal forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import config_from_dict
from jaxllm.model import Transformer, lm_loss
from jaxllm.model.diffusion import mask_token_id, tidar_forward, tidar_inputs, tidar_mask
from jaxllm.model.losses import tidar_losses


def brute_force_mask(s, block, window):
    """Query by query, key by key, the rules of papers.md §1.2 written out."""
    allowed = np.zeros((2 * s, 2 * s), bool)
    for q in range(2 * s):
        for k in range(2 * s):
            if q < s:  # clean query: causal over clean keys, never a mask token
                ok = k < s and k <= q and (window is None or q - k < window)
            else:
                j, b = q - s, (q - s) // block
                if k < s:  # clean keys strictly before the block
                    ok = k < b * block and (window is None or j - k < window)
                else:  # mask keys of the same block, both directions
                    ok = (k - s) // block == b
            allowed[q, k] = ok
    return allowed


@pytest.mark.parametrize("s,block,window", [(1, 1, None), (7, 3, None), (16, 4, None), (16, 16, None),
                                            (20, 8, None), (24, 5, 6), (33, 4, 40), (12, 1, 3)])
def test_mask_matches_a_brute_force_construction(s, block, window):
    np.testing.assert_array_equal(np.asarray(tidar_mask(s, block, window)), brute_force_mask(s, block, window))


def model_config(**model):
    base = dict(vocab_size=97, d_model=64, n_layer=2, max_seq_len=128, attention=dict(n_head=4, n_kv_head=2),
                position=dict(kind="rope"), norm=dict(kind="rmsnorm"), mlp=dict(kind="swiglu", d_ff=128),
                diffusion=dict(enabled=True, block_size=8), init_std=0.2)
    return config_from_dict({"model": {**base, **model}}).model


def test_inputs_double_the_sequence_with_mask_copies_at_the_same_positions():
    tokens = jnp.array([[5, 6, 7], [1, 2, 3]])
    doubled, positions = tidar_inputs(tokens, 96)
    np.testing.assert_array_equal(doubled, [[5, 6, 7, 96, 96, 96], [1, 2, 3, 96, 96, 96]])
    np.testing.assert_array_equal(positions, [[0, 1, 2, 0, 1, 2]] * 2)
    assert mask_token_id(model_config()) == 96 and mask_token_id(model_config(diffusion=dict(enabled=True, mask_token_id=4))) == 4


@pytest.mark.parametrize("window", [None, 12])
def test_no_mask_token_sees_its_own_label(window):
    """Changing clean token x_j must leave the diffusion logits of every mask token whose block
    starts at or before j unchanged (none of them may see x_j), and change later blocks'."""
    cfg = model_config(attention=dict(n_head=4, n_kv_head=2, window=window))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 96)
    forward = nnx.jit(tidar_forward)
    _, masked = forward(model, tokens)
    for j in (0, 5, 8, 21, 40):
        perturbed = tokens.at[:, j].set((tokens[:, j] + 1) % 96)
        _, masked_p = forward(model, perturbed)
        blind = (j // 8 + 1) * 8  # mask tokens before this position cannot see x_j
        np.testing.assert_array_equal(masked[:, :blind], masked_p[:, :blind])
        if blind < 48:
            assert np.abs(np.asarray(masked[:, blind:] - masked_p[:, blind:])).max() > 1e-4


def test_clean_half_equals_a_plain_causal_forward():
    cfg = model_config(attention=dict(n_head=4, n_kv_head=2, window=10))
    model = Transformer(cfg, rngs=nnx.Rngs(2))
    tokens = jax.random.randint(jax.random.key(3), (2, 40), 0, 96)
    clean, masked = nnx.jit(tidar_forward)(model, tokens)
    plain = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(clean, plain, rtol=0, atol=1e-5 * float(jnp.abs(plain).max()))
    assert np.abs(np.asarray(masked - plain)).max() > 1e-3  # the halves are different predictions


def test_training_loss_is_the_alpha_weighted_mix_and_lm_loss_uses_it():
    cfg = model_config(diffusion=dict(enabled=True, block_size=4, alpha=0.25))
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 33), 0, 96)
    combined, ar, diffusion = tidar_losses(model, tokens[:, :-1], tokens[:, 1:])
    assert float(combined) == pytest.approx((0.25 * float(ar) + float(diffusion)) / 1.25, rel=1e-6)
    assert float(lm_loss(model, tokens[:, :-1], tokens[:, 1:])) == pytest.approx(float(combined), rel=1e-6)
    assert abs(float(ar) - float(diffusion)) > 1e-3
