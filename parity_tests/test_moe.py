"""jaxllm vs torch_ref on Mixture-of-Experts models: every router, both kinds of shared experts, MoE
placement, capacity dropping, LayerDrop, and the full loss with its auxiliary losses (DESIGN.md
parity contract).

The harness compares the loss in training mode (only training records aux losses); the noisy
router's training noise is the pair's `router_noise` [B, T, E], passed to both sides' forward
(`router_noise=`). Dropout is 0 in these configs, so training mode switches on only the noise.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_ref.moe as ref_moe
from jaxllm.config import to_dict
from jaxllm.model.moe import MoE, pop_expert_load, update_router_bias
from parity_tests.harness import LOGITS_TOL, compare, make_pair, tiny_config
from torch_ref.model import Transformer as TorchTransformer

BASE = dict(position=dict(kind="rope"), norm=dict(kind="rmsnorm", eps=1e-6), mlp=dict(kind="swiglu", d_ff=96),
            attention=dict(n_head=4, n_kv_head=2))


def moe_config(n_layer=2, layerdrop=0.0, **moe):
    return tiny_config(**BASE, n_layer=n_layer, layerdrop=layerdrop, moe=dict(moe_intermediate_size=32, **moe))


CASES = {
    # Mixtral: softmax, top-2 renormalised, Switch balance loss and z-loss
    "softmax-renorm": dict(n_routed_experts=4, num_experts_per_tok=2, router="softmax", norm_topk_prob=True,
                           aux_loss_coef=0.01, z_loss_coef=0.001),
    # DeepSeek-V2: no renormalisation, scaled weights, group-limited (max) selection, 2 shared experts
    "softmax-v2-groups-shared": dict(n_routed_experts=8, num_experts_per_tok=2, router="softmax", norm_topk_prob=False,
                                     routed_scaling_factor=2.0, n_group=4, topk_group=1, n_shared_experts=2,
                                     shared_intermediate_size=16, aux_loss_coef=0.003),
    # DeepSeek-V3: sigmoid, selection-only bias (set nonzero below), top-2-sum groups, scaled renormalised weights
    "sigmoid-v3-bias-groups": dict(n_routed_experts=8, num_experts_per_tok=3, router="sigmoid", norm_topk_prob=True,
                                   routed_scaling_factor=2.5, n_group=4, topk_group=2, n_shared_experts=1,
                                   bias_update_rate=0.001, aux_loss_coef=0.01, z_loss_coef=0.001),
    # Qwen2-MoE: softmax without renormalisation and one sigmoid-gated shared expert
    "qwen2-gated-shared": dict(n_routed_experts=4, num_experts_per_tok=2, router="softmax", norm_topk_prob=False,
                               n_shared_experts=1, shared_intermediate_size=48, shared_expert_gate=True,
                               aux_loss_coef=0.001),
    # Shazeer: noisy top-k, eval logits without noise; the training loss with the pair's noise:
    # importance loss, smooth load estimate, balance and z-loss
    "noisy": dict(n_routed_experts=4, num_experts_per_tok=2, router="noisy", n_shared_experts=1,
                       importance_loss_coef=0.1, load_loss_coef=0.1, aux_loss_coef=0.01, z_loss_coef=0.001),
    # capacity dropping (jaxllm: sort-based ranks; torch_ref: cumulative one-hot counts)
    "capacity-1.0-grouped": dict(n_routed_experts=4, num_experts_per_tok=2, capacity_factor=1.0, aux_loss_coef=0.01),
}


def set_expert_bias(pair, seed):
    """A nonzero V3 bias (a buffer, which the harness does not redraw), the same on both sides."""
    rng = np.random.default_rng(seed)
    for block, torch_block in zip(pair.jax_model.layers, pair.torch_model.layers):
        if isinstance(block.mlp, MoE) and block.mlp.expert_bias is not None:
            bias = rng.uniform(-0.3, 0.3, block.mlp.expert_bias.shape).astype(np.float32)
            block.mlp.expert_bias[...] = jnp.asarray(bias)
            torch_block.mlp.expert_bias.copy_(torch.from_numpy(bias))




@pytest.mark.parametrize("name", sorted(CASES))
def test_moe_parity(name):
    seed = sorted(CASES).index(name)
    pair = make_pair(moe_config(**CASES[name]), seed=seed)
    set_expert_bias(pair, seed)
    report = compare(pair)
    assert report.ok(), f"{name}: {report}"


def test_noisy_router_with_training_noise():
    moe = dict(n_routed_experts=4, num_experts_per_tok=2, router="noisy", n_shared_experts=1,
               importance_loss_coef=0.1, load_loss_coef=0.1, aux_loss_coef=0.01, z_loss_coef=0.001)
    pair = make_pair(moe_config(**moe), seed=11)
    pair.train()  # the logits with the noise too
    report = compare(pair)
    assert report.ok(), str(report)
    # the pair's noise is what both sides used: other noise changes torch_ref's loss
    inputs, targets = (torch.from_numpy(t) for t in (pair.tokens[:, :-1], pair.tokens[:, 1:]))
    noise = torch.from_numpy(pair.router_noise)
    with torch.no_grad():
        loss = pair.torch_model.loss(inputs, targets, router_noise=noise).item()
        zeroed = pair.torch_model.loss(inputs, targets, router_noise=torch.zeros_like(noise)).item()
        assert abs(zeroed - loss) > LOGITS_TOL * abs(loss)


def test_placement_first_k_dense_and_moe_every():
    cfg = moe_config(n_layer=4, n_routed_experts=4, num_experts_per_tok=2, first_k_dense=1, moe_every=2,
                     aux_loss_coef=0.01, z_loss_coef=0.001)
    pair = make_pair(cfg, seed=21)
    assert [isinstance(b.mlp, MoE) for b in pair.jax_model.layers] == [False, True, False, True]
    assert [isinstance(b.mlp, ref_moe.MoE) for b in pair.torch_model.layers] == [False, True, False, True]
    report = compare(pair)
    assert report.ok(), str(report)


def test_seed002_shape_with_window_gqa_rezero():
    cfg = tiny_config(position=dict(kind="rope"), norm=dict(kind="rmsnorm"), rezero=True,
                      attention=dict(n_head=4, n_kv_head=2, window=32), mlp=dict(kind="swiglu", d_ff=96),
                      moe=dict(n_routed_experts=4, num_experts_per_tok=2, router="noisy", moe_intermediate_size=32,
                               n_shared_experts=1, aux_loss_coef=0.01, z_loss_coef=0.001))
    pair = make_pair(cfg, seed=31)
    pair.train()
    report = compare(pair)
    assert report.ok(), str(report)


def next_layerdrop_draw(model, n_layer) -> list[bool]:
    """Which layers jaxllm's next training forward keeps: a copy of its LayerDrop (the same RNG
    stream, at the same count) draws the same mask."""
    layerdrop = nnx.clone(model.layerdrop)
    layerdrop.train()
    return np.asarray(layerdrop.keep(n_layer)).tolist()


def test_layerdrop_with_moe_matches_torch_ref_on_the_same_dropped_layers(monkeypatch):
    """Training steps at LayerDrop 0.5: torch_ref skips the layers that jaxllm's draw skips. The loss
    holds the aux losses of the layers that ran in this forward only; it, every gradient and the V3
    bias step from the loads of the layers that ran agree, step after step."""
    n_layer, seed = 4, 41
    pair = make_pair(moe_config(n_layer=n_layer, layerdrop=0.5, **CASES["sigmoid-v3-bias-groups"]), seed=seed)
    set_expert_bias(pair, seed)
    masks = []
    for step in range(3):
        keep = next_layerdrop_draw(pair.jax_model, n_layer)
        monkeypatch.setattr(TorchTransformer, "layerdrop_keep", lambda self, n, keep=keep: keep)
        report = compare(pair, train=True)  # eval logits, then one training forward on each side
        assert report.ok(), f"step {step}, keep {keep}: {report}"
        update_router_bias(pair.jax_model, pop_expert_load(pair.jax_model))
        ref_moe.update_router_bias(pair.torch_model)
        for i, (block, torch_block) in enumerate(zip(pair.jax_model.layers, pair.torch_model.layers)):
            np.testing.assert_allclose(np.asarray(block.mlp.expert_bias[...]), torch_block.mlp.expert_bias.numpy(),
                                       atol=1e-6, err_msg=f"step {step}, layer {i}, keep {keep}")
        masks.append(keep)
    # the draws exercise the defect: a layer that ran in one step is skipped in the next
    assert any(a and not b for prev, now in zip(masks, masks[1:]) for a, b in zip(prev, now)), masks
    assert all(any(m) and not all(m) for m in masks[1:]), masks


def test_torch_ref_trains_with_layerdrop_on_a_moe_model():
    """A layer LayerDrop skips records no aux loss in that forward: the loss never holds an earlier
    step's aux loss, whose graph backward() has already freed."""
    cfg = moe_config(n_layer=4, layerdrop=0.5, **CASES["softmax-renorm"])
    torch.manual_seed(0)
    model = TorchTransformer(to_dict(cfg.model)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65))
    ran = []
    for _ in range(8):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ran.append([block.mlp.aux_loss is not None for block in model.layers])
    assert any(a and not b for prev, now in zip(ran, ran[1:]) for a, b in zip(prev, now)), ran


# -- sensitivity: break one MoE piece in torch_ref only; the comparison must fail ---------------


def cv_squared_sample_variance(v):
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def select_ignoring_groups(self, scores):
    return scores.topk(self.cfg.num_experts_per_tok, dim=-1).indices


BREAKS = {
    "cv-squared-sample-variance": ("noisy", "cv_squared", cv_squared_sample_variance, ref_moe),
    "groups-ignored": ("softmax-v2-groups-shared", "select", select_ignoring_groups, ref_moe.MoE),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_breaking_torch_moe_breaks_parity(name, monkeypatch):
    case, attr, replacement, target = BREAKS[name]
    seed = sorted(CASES).index(case)
    monkeypatch.setattr(target, attr, replacement)
    pair = make_pair(moe_config(**CASES[case]), seed=seed)
    set_expert_bias(pair, seed)
    report = compare(pair)
    assert not report.ok(), f"{name}: breaking torch_ref went unnoticed ({report})"


def test_ignoring_the_v3_bias_breaks_parity():
    seed = sorted(CASES).index("sigmoid-v3-bias-groups")
    pair = make_pair(moe_config(**CASES["sigmoid-v3-bias-groups"]), seed=seed)
    set_expert_bias(pair, seed)
    for torch_block in pair.torch_model.layers:
        torch_block.mlp.expert_bias.zero_()
    assert not compare(pair).ok()
