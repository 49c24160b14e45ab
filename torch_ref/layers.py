"""The dense building blocks shared by torch_ref's model, MLA and MoE: config access, norms, RoPE,
the causal sliding-window mask, a layer's decoding cache, attention (MHA / GQA / MQA) and the MLP.
`model.py`, `mla.py` and `moe.py` import from here; this file imports none of them.
"""
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def write_cache(buf, new, step):
    """Write new [B, T, ...] at time steps step.. into buf [B, S, ...], slot = time % S (keeps the last S)."""
    S, T = buf.shape[1], new.shape[1]
    if T > S:
        new, step, T = new[:, T - S:], step + T - S, S
    buf[:, (step + torch.arange(T, device=buf.device)) % S] = new.to(buf.dtype)
    return buf


class LayerCache:
    """One layer's decoding cache: buffers [B, S, ...] (attention: keys and values; MLA: its latents)
    and `step`, the time steps written so far. Time step t lives in slot t % S, so with a sliding
    window the buffers are a rolling window of S = W slots."""

    def __init__(self, *buffers):
        self.buffers, self.step = buffers, 0

    def update(self, *new):
        """Write the new entries [B, T, ...]; returns what the new queries attend over: the new entries
        themselves if the cache was empty (the prefill), else the whole buffers (a decoding step)."""
        prefill = self.step == 0
        for buf, entries in zip(self.buffers, new):
            write_cache(buf, entries, self.step)
        self.step += new[0].shape[1]
        return new if prefill else self.buffers


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

    def init_cache(self, batch, size, dtype, device):
        return LayerCache(*(torch.zeros(batch, size, self.n_kv_head, self.head_dim, dtype=dtype, device=device)
                            for _ in range(2)))

    def forward(self, x, positions, mask=None, cache=None):
        """mask [B or 1, T, S] (True: may attend) replaces the causal sliding window (TiDAR, decoding).
        cache: this layer's LayerCache of keys and values [B, S, K, H], updated in place."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # [B, N, T, H]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, H]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            rope = rope_angles(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = (t.transpose(1, 2) for t in cache.update(k.transpose(1, 2), v.transpose(1, 2)))
        groups = self.n_head // self.n_kv_head  # query head n reads kv head n // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = causal_mask(T, self.window).to(x.device) if mask is None else mask[:, None]
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
