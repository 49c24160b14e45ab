"""The parity suite has teeth: break one option in torch_ref only, and the comparison must fail.

Each case patches one piece of torch_ref (the jaxllm side is untouched), builds the config that
exercises it, and asserts that the harness reports a mismatch beyond the tolerances.
"""
import pytest
import torch
import torch.nn.functional as F

import torch_ref.layers as layers
import torch_ref.model as ref
from parity_tests.harness import compare, make_pair, tiny_config


def rope_interleaved(x, cos, sin):  # pairs (2i, 2i+1) instead of Hugging Face's (i, i + H/2)
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos[:, None] + rotated * sin[:, None]


def mask_window_plus_one(t, window=None):  # the paper's literal i - W: W + 1 keys
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j <= i) & ((i - j <= window) if window is not None else True)


def gqa_modulo_forward(self, x, positions, mask, cache=None):  # query head n reads kv head n % K instead of n // G
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
    if self.rope_theta is not None:
        rope = layers.rope_angles(positions, self.head_dim, self.rope_theta)
        q, k = layers.apply_rope(q, *rope), layers.apply_rope(k, *rope)
    groups = self.n_head // self.n_kv_head
    k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def residual_without_alpha(self, x, f_x):  # ReZero scalar forgotten
    return x + self.dropout(f_x)


def gelu_always_tanh(x, approximate="none", _gelu=F.gelu):
    return _gelu(x, approximate="tanh")


def rope_theta_ignored(positions, head_dim, theta, _angles=layers.rope_angles):
    return _angles(positions, head_dim, 10000.0)


def horizon_leaking_labels(positions, groups, _horizon=layers.horizon):
    # the pitfall of papers.md §1.2: a mask token also sees the clean token at its block's start
    return _horizon(positions, groups) + (groups > 0).long()


def recursion_with_gradient_through_every_loop(self, core, e, positions, mask, caches,
                                               _forward=ref.RecursiveBlock.forward):
    self.n_grad_loops = self.r.n_loops  # the no-gradient loops forgotten
    return _forward(self, core, e, positions, mask, caches)


MUTATIONS = {
    "rope-layout": (dict(position=dict(kind="rope")), layers, "apply_rope", rope_interleaved),
    "rope-theta": (dict(position=dict(kind="rope", rope_theta=500000.0)), layers, "rope_angles", rope_theta_ignored),
    "window-off-by-one": (dict(attention=dict(n_head=4, window=16)), ref, "causal_mask", mask_window_plus_one),
    "gqa-grouping": (dict(position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2)), layers.Attention,
                     "forward", gqa_modulo_forward),
    "tidar-label-leak": (dict(diffusion=dict(enabled=True, block_size=8)), layers, "horizon", horizon_leaking_labels),
    "recursion-no-grad-loops": (dict(recursion=dict(mode="loop", n_core=1, n_loops=3, n_grad_loops=1)),
                                ref.RecursiveBlock, "forward", recursion_with_gradient_through_every_loop),
    "rezero-alpha": (dict(rezero=True), ref.Block, "residual", residual_without_alpha),
    "gelu-form": (dict(mlp=dict(kind="gelu")), layers.F, "gelu", gelu_always_tanh),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_breaking_torch_ref_breaks_parity(name, monkeypatch):
    model, target, attr, replacement = MUTATIONS[name]
    cfg = tiny_config(**model)
    unbroken = compare(make_pair(cfg))
    assert unbroken.ok(), f"the unbroken pair must agree: {unbroken}"
    monkeypatch.setattr(target, attr, replacement)
    report = compare(make_pair(cfg))
    assert not report.ok(), f"{name}: breaking torch_ref went unnoticed ({report})"


@pytest.mark.parametrize("option", ["lm_head_bias", "qkv_bias", "norm_bias"])
def test_dropping_a_bias_breaks_parity(option):
    model = dict(lm_head_bias=option == "lm_head_bias", attention=dict(n_head=4, qkv_bias=option == "qkv_bias"),
                 norm=dict(kind="layernorm", bias=option == "norm_bias"))
    pair = make_pair(tiny_config(**model))
    zeroed = {"lm_head_bias": "lm_head_bias", "qkv_bias": "layers.1.attn.v_proj.bias",
              "norm_bias": "layers.0.mlp_norm.bias"}[option]
    with torch.no_grad():
        pair.torch_model.get_parameter(zeroed).zero_()
    assert not compare(pair).ok()
