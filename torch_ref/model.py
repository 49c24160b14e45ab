"""The jaxllm model family in plain PyTorch: small, readable, the numerical reference.

`Transformer(cfg)` takes the *model* section of a resolved jaxllm config as a nested dict (or
namespace): the YAML presets in configs/, with every derived field filled in. Parameter names and
the module tree are jaxllm's; only the layout differs: nn.Linear stores [out, in] where jaxllm
stores [in..., out...] (e.g. q_proj [D, N, H] there, [N*H, D] here).
"""
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def namespace(cfg):
    """A nested dict -> attribute access (cfg.attention.n_head)."""
    if isinstance(cfg, dict):
        return SimpleNamespace(**{k: namespace(v) for k, v in cfg.items()})
    return cfg


def make_norm(cfg):
    if cfg.norm.kind == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm.eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm.eps, bias=cfg.norm.bias)


def rope_angles(positions, head_dim, theta):
    """cos, sin [B, T, H] for Hugging Face's half-split layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, N, T, H]; rotate the pairs (i, i + H/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def causal_mask(t, window=None):
    """[T, T] booleans: query i sees key j iff 0 <= i - j < window (W keys including itself)."""
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.n_head, self.n_kv_head, self.head_dim, self.window = a.n_head, a.n_kv_head, a.head_dim, a.window
        self.q_proj = nn.Linear(cfg.d_model, a.n_head * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, a.n_kv_head * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, a.n_kv_head * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_head * a.head_dim, cfg.d_model, bias=a.out_bias)
        self.dropout = a.dropout
        self.rope_theta = cfg.position.rope_theta if cfg.position.kind == "rope" else None

    def forward(self, x, positions):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # [B, N, T, H]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, H]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            rope = rope_angles(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        groups = self.n_head // self.n_kv_head  # query head n reads kv head n // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = causal_mask(T, self.window).to(x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.mlp
        self.kind = m.kind
        if m.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, m.d_ff, bias=m.bias)
        self.up_proj = nn.Linear(cfg.d_model, m.d_ff, bias=m.bias)
        self.down_proj = nn.Linear(m.d_ff, cfg.d_model, bias=m.bias)
        self.dropout = nn.Dropout(m.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.down_proj(self.dropout(h))


def is_moe_layer(cfg, layer):
    moe = cfg.moe
    return moe.n_routed_experts > 0 and layer >= moe.first_k_dense and (layer - moe.first_k_dense) % moe.moe_every == 0


def make_attention(cfg):
    if cfg.attention.kind == "mla":
        from torch_ref.mla import MultiHeadLatentAttention  # imported here: it builds on this file
        return MultiHeadLatentAttention(cfg)
    return Attention(cfg)


def make_mlp(cfg, layer):
    if is_moe_layer(cfg, layer):
        from torch_ref.moe import MoE  # imported here: it builds on this file
        return MoE(cfg)
    return MLP(cfg)


class Block(nn.Module):
    """Pre-norm: x + f(norm(x)). ReZero: no norms, x + alpha * f(x) with one alpha per layer."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_norm = None if cfg.rezero else make_norm(cfg)
        self.attn = make_attention(cfg)
        self.mlp_norm = None if cfg.rezero else make_norm(cfg)
        self.mlp = make_mlp(cfg, layer)
        self.rezero_alpha = nn.Parameter(torch.zeros(())) if cfg.rezero else None
        self.dropout = nn.Dropout(cfg.dropout)

    def residual(self, x, f_x):
        f_x = self.dropout(f_x)
        if self.rezero_alpha is not None:
            f_x = self.rezero_alpha * f_x
        return x + f_x

    def forward(self, x, positions):
        x = self.residual(x, self.attn(x if self.attn_norm is None else self.attn_norm(x), positions))
        return self.residual(x, self.mlp(x if self.mlp_norm is None else self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg = namespace(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position.kind == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.lm_head_bias else None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens, positions=None):
        """tokens [B, T] -> logits [B, T, V]."""
        cfg = self.cfg
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        x = self.dropout(x)
        for block in self.layers:
            if self.training and cfg.layerdrop > 0 and torch.rand(()) < cfg.layerdrop:
                continue  # LayerDrop: skip the whole layer
            if self.training and cfg.remat:
                x = checkpoint(block, x, positions, use_reentrant=False)
            else:
                x = block(x, positions)
        x = self.final_norm(x)
        logits = x @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(x)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        return logits

    def loss(self, tokens, targets):
        """Next-token cross-entropy plus every auxiliary loss the layers recorded in this forward."""
        logits = self(tokens)
        aux = sum(m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + aux

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
