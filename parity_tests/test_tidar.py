"""jaxllm vs torch_ref on TiDAR dual-mode training (papers.md §1.2): the structured attention mask,
the logits of both halves of the doubled sequence, the AR and diffusion loss terms, their
combination and every gradient, with MHA, GQA, a sliding window, MLA and MoE."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.model as ref
from jaxllm.model.diffusion import tidar_forward, tidar_mask
from jaxllm.model.losses import tidar_losses
from parity_tests.harness import LOGITS_TOL, compare, make_pair, tiny_config

ROPE = dict(position=dict(kind="rope"), norm=dict(kind="rmsnorm", eps=1e-6), mlp=dict(kind="swiglu", d_ff=96))
CASES = {
    "gpt-mha-learned": dict(diffusion=dict(enabled=True, block_size=8)),
    "gqa-rope-alpha": dict(**ROPE, attention=dict(n_head=4, n_kv_head=2), diffusion=dict(enabled=True, block_size=16, alpha=0.5)),
    "sliding-window": dict(**ROPE, attention=dict(n_head=4, n_kv_head=2, window=24),
                           diffusion=dict(enabled=True, block_size=8, mask_token_id=3)),
    "mla": dict(**ROPE, attention=dict(kind="mla", n_head=4, mla=dict(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
                                                                        qk_rope_head_dim=8, v_head_dim=16)),
                diffusion=dict(enabled=True, block_size=4)),
    "moe": dict(**ROPE, moe=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, aux_loss_coef=0.01,
                                 z_loss_coef=0.001), diffusion=dict(enabled=True, block_size=8, alpha=2.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tidar_mask_logits_losses_and_gradients_match(name):
    cfg = tiny_config(**CASES[name])
    pair = make_pair(cfg, seed=5)
    d, window = cfg.model.diffusion, cfg.model.attention.window
    s = pair.tokens.shape[1] - 1
    assert s >= 256
    np.testing.assert_array_equal(np.asarray(tidar_mask(s, d.block_size, window)),
                                  ref.tidar_mask(s, d.block_size, window).numpy())

    inputs, targets = pair.tokens[:, :-1], pair.tokens[:, 1:]
    clean_j, masked_j = nnx.jit(tidar_forward)(pair.jax_model, jnp.asarray(inputs))
    losses_j = nnx.jit(tidar_losses)(pair.jax_model, jnp.asarray(inputs), jnp.asarray(targets))
    with torch.no_grad():
        clean_t, masked_t = pair.torch_model.tidar_forward(torch.from_numpy(inputs))
        losses_t = pair.torch_model.tidar_losses(torch.from_numpy(inputs), torch.from_numpy(targets))
    for half_j, half_t in ((clean_j, clean_t), (masked_j, masked_t)):
        half_t = half_t.double().numpy()
        assert np.abs(np.asarray(half_j) - half_t).max() / np.abs(half_t).max() <= LOGITS_TOL
    for name_, value_j, value_t in zip(("combined", "AR", "diffusion"), losses_j, losses_t):
        assert abs(float(value_j) - value_t.item()) / value_t.item() <= LOGITS_TOL, name_
    alpha = d.alpha
    combined, ar, diffusion = (v.item() for v in losses_t)
    assert combined == pytest.approx((alpha * ar + diffusion) / (1 + alpha), rel=1e-6)

    report = compare(pair)  # the full training loss (aux losses included) and all its gradients
    assert report.ok(), f"{name}: {report}"
