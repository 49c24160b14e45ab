"""Mixture-of-Experts feed-forward in plain PyTorch: the readable reference for jaxllm/model/moe.py.

Routed SwiGLU experts picked per token by a router (softmax | sigmoid with the DeepSeek-V3
selection bias | Shazeer's noisy top-k), plus shared experts that every token uses (DeepSeek:
un-gated; Qwen2-MoE: one expert gated by sigmoid(x . w)). The experts run in a loop, one expert at a
time on the tokens that picked it. `route` picks the experts; `router_losses` computes the
auxiliary losses beside it. A training forward sets `self.aux_loss` (the coefficient-weighted sum
of the balance, z, importance and load losses, or None) and `self.expert_load` (tokens per
expert); an eval forward sets neither, and `Transformer.forward` clears both first, so a layer
that LayerDrop skipped has none.

Noise: in training the noisy router draws N(0, 1) noise, unless the forward is given `noise`
[B, T, E], which is used instead (parity tests feed jaxllm and torch_ref the same draw).
"""
import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.layers import MLP, namespace


def cv_squared(v):
    """var / mean^2 with the population variance (Shazeer's cv_squared, eps 1e-10)."""
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked, each in nn.Linear layout: gate_proj, up_proj [E, F, D], down_proj [E, D, F]."""

    def __init__(self, n_experts, d_model, d_ff, std):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * std)
        self.up_proj = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * std)
        self.down_proj = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * std)

    def forward(self, x, e):
        """Expert e on the rows x [N, D]."""
        return (F.silu(x @ self.gate_proj[e].T) * (x @ self.up_proj[e].T)) @ self.down_proj[e].T


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = self.cfg = cfg.moe
        D, E = cfg.d_model, m.n_routed_experts
        self.router = nn.Linear(D, E, bias=False)
        if m.router == "noisy":
            self.noise_proj = nn.Linear(D, E, bias=False)
        if m.router == "sigmoid":
            self.register_buffer("expert_bias", torch.zeros(E))  # V3: steers the selection only
        self.experts = Experts(E, D, m.moe_intermediate_size, cfg.init_std)
        shared_width = m.n_shared_experts * m.shared_intermediate_size
        shared_cfg = namespace(dict(d_model=D, mlp=dict(kind="swiglu", d_ff=shared_width, bias=False, dropout=0.0)))
        if m.n_shared_experts and m.shared_expert_gate:
            self.gated_shared_mlp = MLP(shared_cfg)
            self.shared_mlp_gate = nn.Linear(D, 1, bias=False)
        elif m.n_shared_experts:
            self.shared_mlp = MLP(shared_cfg)
        self.aux_loss = self.expert_load = None  # this training forward's, for Transformer.loss and update_router_bias

    def select(self, scores):
        """Top-k expert indices [X, k] from selection scores [X, E], within the best topk_group groups."""
        m = self.cfg
        if m.n_group > 1:
            grouped = scores.view(scores.shape[0], m.n_group, -1)
            if m.router == "sigmoid":  # V3: a group scores the sum of its two best experts
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            else:  # V2: a group scores its best expert
                group_scores = grouped.max(-1).values
            best = group_scores.topk(m.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            scores = grouped.masked_fill(~mask[..., None], float("-inf")).flatten(1)
        return scores.topk(m.num_experts_per_tok, dim=-1).indices

    def route(self, x, noise=None):
        """x [X, D] -> the picked experts idx [X, k], their weights [X, k], and what the aux losses read:
        probs [X, E] (the balance loss's P), the logits the router ranks, the clean logits and the noise
        scale (noisy router in training; else None)."""
        m = self.cfg
        logits = self.router(x).float()
        ranked, noise_std = logits, None
        if m.router == "softmax":
            scores = logits.softmax(-1)
            idx = self.select(scores)
            weights = scores.gather(1, idx)
            probs = scores
        elif m.router == "sigmoid":
            scores = logits.sigmoid()
            idx = self.select(scores + self.expert_bias)
            weights = scores.gather(1, idx)  # the unbiased affinities
            probs = scores / scores.sum(-1, keepdim=True)
        else:  # noisy top-k: H = x W_g + N(0, 1) * softplus(x W_noise), training only
            if self.training:
                noise_std = F.softplus(self.noise_proj(x).float())
                ranked = logits + (torch.randn_like(logits) if noise is None else noise) * noise_std
            idx = self.select(ranked)
            weights = ranked.gather(1, idx).softmax(-1)  # Softmax(KeepTopK(H, k))
            probs = ranked.softmax(-1)
        if m.router != "noisy" and m.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * m.routed_scaling_factor
        return SimpleNamespace(idx=idx, weights=weights, probs=probs, logits=ranked, clean_logits=logits,
                               noise_std=noise_std)

    def forward(self, x, noise=None):
        """x [B, T, D]; noise [B, T, E]: the noisy router's N(0, 1) draw in training (default: a random one)."""
        m = self.cfg
        B, T, D = x.shape
        E, k = m.n_routed_experts, m.num_experts_per_tok
        x_flat = x.reshape(B * T, D)
        r = self.route(x_flat, None if noise is None else noise.reshape(B * T, E))
        idx, weights = r.idx, r.weights
        if self.training:
            losses = router_losses(m, r)
            self.aux_loss = sum(losses.values()) if losses else None
            self.expert_load = F.one_hot(idx, E).sum((0, 1)).float()  # tokens that picked each expert

        if m.capacity_factor is not None:  # keep each expert's first C assignments in (token, choice) order
            capacity = math.ceil(B * T * k / E * m.capacity_factor)
            onehot = F.one_hot(idx.flatten(), E)  # [X*k, E]
            rank = (onehot.cumsum(0) * onehot).sum(-1) - 1  # earlier assignments to the same expert
            weights = weights * (rank < capacity).view(B * T, k)

        out = torch.zeros_like(x_flat)
        for e in range(E):
            token, choice = torch.where(idx == e)
            if len(token):
                out = out.index_add(0, token, weights[token, choice, None].to(x.dtype) * self.experts(x_flat[token], e))
        out = out.view(B, T, D)
        if hasattr(self, "shared_mlp"):
            out = out + self.shared_mlp(x)
        if hasattr(self, "gated_shared_mlp"):
            out = out + torch.sigmoid(self.shared_mlp_gate(x)) * self.gated_shared_mlp(x)
        return out


def router_losses(m, r):
    """The auxiliary losses of one routing, each times its coefficient: {name: loss} for the nonzero coefficients."""
    X, E = r.probs.shape
    k = m.num_experts_per_tok
    counts = F.one_hot(r.idx, E).sum((0, 1)).float()  # tokens that picked each expert
    losses = {}
    if m.aux_loss_coef:  # E / (k X) * sum_i c_i P_i; exactly 1 under uniform routing
        losses["balance_loss"] = m.aux_loss_coef * E / (k * X) * (counts * r.probs.mean(0)).sum()
    if m.z_loss_coef:
        losses["z_loss"] = m.z_loss_coef * (torch.logsumexp(r.logits, -1) ** 2).mean()
    if m.router == "noisy" and m.importance_loss_coef:
        gates = torch.zeros_like(r.probs).scatter(1, r.idx, r.weights)  # [X, E], zero for unpicked experts
        losses["importance_loss"] = m.importance_loss_coef * cv_squared(gates.sum(0))
    if m.router == "noisy" and m.load_loss_coef:
        load = counts
        if r.noise_std is not None and k < E:  # smooth load estimate (Shazeer App. A)
            top = r.logits.topk(k + 1, dim=-1).values
            threshold_if_in, threshold_if_out = top[:, k:k + 1], top[:, k - 1:k]
            prob_if_in = torch.special.ndtr((r.clean_logits - threshold_if_in) / r.noise_std)
            prob_if_out = torch.special.ndtr((r.clean_logits - threshold_if_out) / r.noise_std)
            load = torch.where(r.logits > threshold_if_in, prob_if_in, prob_if_out).sum(0)
        losses["load_loss"] = m.load_loss_coef * cv_squared(load)
    return losses


@torch.no_grad()
def update_router_bias(model):
    """DeepSeek-V3 bias step, after each optimiser step: b_i -= gamma if expert i was overloaded in
    the last training forward (load above the mean), += gamma if underloaded; a layer that did not
    run (LayerDrop) keeps its bias."""
    for module in model.modules():
        if (isinstance(module, MoE) and hasattr(module, "expert_bias") and module.cfg.bias_update_rate > 0
                and module.expert_load is not None):
            load = module.expert_load
            module.expert_bias += module.cfg.bias_update_rate * torch.sign(load.mean() - load)
