"""Mixture-of-Experts feed-forward in plain PyTorch: the readable reference for jaxllm/model/moe.py.

Routed SwiGLU experts picked per token by a router (softmax | sigmoid with the DeepSeek-V3
selection bias | Shazeer's noisy top-k), plus shared experts that every token uses (DeepSeek:
un-gated; Qwen2-MoE: one expert gated by sigmoid(x . w)). The experts run in a loop, one expert at a
time on the tokens that picked it. Each forward sets `self.aux_loss` (the coefficient-weighted sum
of the balance, z, importance and load losses, or None) and `self.expert_load` (tokens per expert).

Noise: in training the noisy router draws N(0, 1) noise, unless `self.router_noise` holds a
[B, T, E] tensor, which is used instead (parity tests feed jaxllm and torch_ref the same draw).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.model import MLP, namespace


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
            self.router_noise = None
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
        self.expert_load = torch.zeros(E)
        self.aux_loss = None

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

    def forward(self, x):
        m = self.cfg
        B, T, D = x.shape
        E, k = m.n_routed_experts, m.num_experts_per_tok
        x_flat = x.reshape(B * T, D)
        logits = self.router(x_flat).float()
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
            noise_std = F.softplus(self.noise_proj(x_flat).float())
            noise = None
            if self.training:
                noise = torch.randn_like(logits) if self.router_noise is None else self.router_noise.reshape(B * T, E)
            scores = logits if noise is None else logits + noise * noise_std
            idx = self.select(scores)
            weights = scores.gather(1, idx).softmax(-1)  # Softmax(KeepTopK(H, k))
            probs = scores.softmax(-1)
            clean, logits = logits, scores  # the z-loss reads the logits the router ranks
        if m.router != "noisy" and m.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * m.routed_scaling_factor

        gates = torch.zeros_like(probs).scatter(1, idx, weights)  # [X, E], zero for unpicked experts
        counts = F.one_hot(idx, E).sum((0, 1)).float()  # tokens that picked each expert
        self.expert_load = counts.detach()
        losses = []
        if m.aux_loss_coef:  # E / (k X) * sum_i c_i P_i; exactly 1 under uniform routing
            losses.append(m.aux_loss_coef * E / (k * B * T) * (counts * probs.mean(0)).sum())
        if m.z_loss_coef:
            losses.append(m.z_loss_coef * (torch.logsumexp(logits, -1) ** 2).mean())
        if m.router == "noisy" and m.importance_loss_coef:
            losses.append(m.importance_loss_coef * cv_squared(gates.sum(0)))
        if m.router == "noisy" and m.load_loss_coef:
            load = counts
            if noise is not None and k < E:  # smooth load estimate (Shazeer App. A)
                top = scores.topk(k + 1, dim=-1).values
                threshold_if_in, threshold_if_out = top[:, k:k + 1], top[:, k - 1:k]
                prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
                prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
                load = torch.where(scores > threshold_if_in, prob_if_in, prob_if_out).sum(0)
            losses.append(m.load_loss_coef * cv_squared(load))
        self.aux_loss = sum(losses) if losses else None

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


@torch.no_grad()
def update_router_bias(model):
    """DeepSeek-V3 bias step, after each optimiser step: b_i -= gamma if expert i was overloaded in
    the last forward (load above the mean), += gamma if underloaded."""
    for module in model.modules():
        if isinstance(module, MoE) and hasattr(module, "expert_bias") and module.cfg.bias_update_rate > 0:
            load = module.expert_load
            module.expert_bias += module.cfg.bias_update_rate * torch.sign(load.mean() - load)
