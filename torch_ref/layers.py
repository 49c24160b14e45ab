"""The dense building blocks shared by torch_ref's model, MLA and MoE: config access, norms, RoPE,
the attention masks (the causal sliding window and the one mask rule), a layer's view of the
decoding cache, attention (MHA / GQA / MQA) and the MLP.
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
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, N, T, H]; rotate the pairs (i, i + H/2) in float32 and return x's dtype, as jaxllm does."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]).to(x.dtype)


def causal_mask(t, window=None):
    """[T, T] booleans: query i sees key j iff 0 <= i - j < window (W keys including itself)."""
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def horizon(positions, groups):
    """[B, T]: the last causal position each query may see: its own (group 0), or one before the
    smallest position among its row's tokens of its mask block (group g >= 1)."""
    same = groups[:, :, None] == groups[:, None, :]
    first = positions[:, None, :].expand_as(same).masked_fill(~same, positions.max() + 1).amin(-1)
    return torch.where(groups > 0, first - 1, positions)


def visible(q_pos, q_group, k_pos, k_group, window=None):
    """The one mask rule (docs/sampling.md, "The mask"): [B, T, S] booleans, True where query t may see
    key s. Positions [B, T] / [B, S], groups [B or 1, ...] (0 causal, g >= 1 mask block g); a
    negative position is padding (group -1): it sees only padding, and nobody sees it.

        allowed = (k.group == 0 and k.p >= 0 and k.p <= q.horizon and q.p - k.p < window)
                  or (q.group != 0 and k.group == q.group)
    """
    q_group = torch.where(q_pos < 0, -1, q_group)
    k_group = torch.where(k_pos < 0, -1, k_group)
    q_p, k_p = q_pos[:, :, None], k_pos[:, None, :]
    causal = (k_group[:, None, :] == 0) & (k_p >= 0) & (k_p <= horizon(q_pos, q_group)[:, :, None])
    if window is not None:
        causal &= q_p - k_p < window
    block = (q_group[:, :, None] != 0) & (k_group[:, None, :] == q_group[:, :, None])
    return causal | block


def write_cache(buf, new, step):
    """Write new [B, T, ...] at time steps step[b].. of each row of buf [B, S, ...], slot = time % S
    (keeps the last S)."""
    S, T = buf.shape[1], new.shape[1]
    if T > S:
        new, step, T = new[:, T - S:], step + T - S, S
    slots = (step[:, None] + torch.arange(T, device=buf.device)) % S
    buf[torch.arange(len(buf), device=buf.device)[:, None], slots] = new.to(buf.dtype)


class LayerCache:
    """One attention layer's buffers [B, S, ...] (keys and values, or MLA's latents) as one forward
    sees them: it writes its first `write` new entries at time steps step[b].. of each row (slot =
    time % S). A prefill (the cache was empty) attends over the new entries themselves; a decoding
    step over every slot, then the new entries it does not write (TiDAR's mask tokens)."""

    def __init__(self, buffers, step, write, prefill):
        self.buffers, self.step, self.write, self.prefill = buffers, step, write, prefill

    def update(self, *new):
        """Write the new entries [B, T, ...]; returns what the queries attend over."""
        for buf, entries in zip(self.buffers, new):
            write_cache(buf, entries[:, :self.write], self.step)
        if self.prefill:
            return new
        return tuple(torch.cat([buf.to(entries.dtype), entries[:, self.write:]], dim=1)
                     for buf, entries in zip(self.buffers, new))


class LoRALinear(nn.Linear):
    """nn.Linear with LoRA adapters (PEFT's layout): y = x (W + (alpha / r) B A)^T + b, with
    lora_a [r, in] (kaiming-uniform) and lora_b [out, r] (zeros): at first the base layer exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.lora_a, a=5 ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    @property
    def merged_weight(self):
        return self.weight + self.scale * self.lora_b @ self.lora_a

    def forward(self, x):
        return F.linear(x, self.merged_weight, self.bias)


def add_lora(model: nn.Module, lora) -> None:
    """Replace each nn.Linear whose name matches one of lora.targets (globs) by a LoRALinear."""
    from fnmatch import fnmatchcase

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(fnmatchcase(name, p) for p in lora.targets):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, LoRALinear(module, lora.rank, lora.alpha))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.attention
        self.n_head, self.n_kv_head, self.head_dim = a.n_head, a.n_kv_head, a.head_dim
        self.q_proj = nn.Linear(cfg.d_model, a.n_head * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, a.n_kv_head * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, a.n_kv_head * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_head * a.head_dim, cfg.d_model, bias=a.out_bias)
        self.dropout = a.dropout
        self.rope_theta = cfg.position.rope_theta if cfg.position.kind == "rope" else None

    def init_cache(self, batch, size, dtype, device):
        """Keys and values [B, S, K, H]."""
        return tuple(torch.zeros(batch, size, self.n_kv_head, self.head_dim, dtype=dtype, device=device)
                     for _ in range(2))

    def forward(self, x, positions, mask, cache=None):
        """mask [B or 1, T, S] (True: may attend). cache: this layer's LayerCache, written in place."""
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
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
