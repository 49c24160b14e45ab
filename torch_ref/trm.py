"""The Tiny Recursive Model (TRM, papers.md §2.1-2.2) in plain PyTorch: the reference for
`jaxllm.model.trm`, written as the official `models/recursive_reasoning/trm.py` computes it.

`TRM(cfg)` takes the *model* section of a resolved jaxllm config as a nested dict (or namespace),
as `torch_ref.model.Transformer` does; parameter names are jaxllm's, nn.Linear stores [out, in].
One forward is one supervision step (a deep recursion):

    x = embed(puzzle)                          # [B, P + L, D]: P learned prefix rows, then the cells
    with torch.no_grad():                      # T - 1 cycles
        y, z = latent_recursion(x, y, z)
    y, z = latent_recursion(x, y, z)           # the one cycle with gradient
    return y.detach(), z.detach(), lm_head(y)[:, P:], q_head(y[:, 0])

    latent_recursion: n times z = core(x + y + z), then y = core(y + z)

`core` is n_layer post-norm blocks h = rms_norm(h + mixer(h)); h = rms_norm(h + SwiGLU(h)), the
RMSNorm without weights; the mixer is non-causal attention or (TRM-MLP) a SwiGLU over the sequence
axis, normalised over the sequence. Mode `plain` runs the core once on x and ignores the carry.
"""
import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.layers import MLP, Attention, namespace


def rms_norm(x, eps, dim=-1):
    """The parameter-free RMSNorm of the official code (float32 inside)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim, keepdim=True) + eps)).to(x.dtype)


def at_least_float32(x):
    """x in float32, or float64 if it is (a float64 model is the parity tests' ground truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def n_positions(cfg):
    """Positions the core sees: the learned prefix and the puzzle's cells."""
    return cfg.trm.n_prefix + cfg.max_seq_len


def sequence_mlp(cfg):
    """TRM-MLP's token mixer: a SwiGLU from T positions to T positions, shared by all channels, of
    the official width round(4 * T * 2/3) rounded up to a multiple of 256."""
    t = n_positions(cfg)
    width = 256 * math.ceil(round(4 * t * 2 / 3) / 256)
    return MLP(SimpleNamespace(d_model=t, mlp=SimpleNamespace(kind="swiglu", d_ff=width, bias=False, dropout=0.0)))


class TRMBlock(nn.Module):
    """Post-norm: h = rms_norm(h + mixer(h)); h = rms_norm(h + mlp(h))."""

    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.norm.eps
        if cfg.trm.mixer == "attention":
            self.attn, self.mlp_t = Attention(cfg), None
        else:
            self.attn, self.mlp_t = None, sequence_mlp(cfg)
        self.mlp = MLP(cfg)

    def forward(self, h, positions, mask):
        if self.mlp_t is None:
            h = rms_norm(h + self.attn(h, positions, mask), self.eps)
        else:  # as the official code: mix and normalise [B, D, T], over the positions
            h = h.transpose(1, 2)
            h = rms_norm(h + self.mlp_t(h), self.eps).transpose(1, 2)
        return rms_norm(h + self.mlp(h), self.eps)


class TRM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg = namespace(cfg)
        d, t = cfg.d_model, cfg.trm
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_prefix = nn.Parameter(torch.zeros(t.n_prefix, d)) if t.n_prefix else None
        self.embed_positions = nn.Embedding(n_positions(cfg), d) if cfg.position.kind == "learned" else None
        self.layers = nn.ModuleList([TRMBlock(cfg) for _ in range(cfg.n_layer)])
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.q_head = nn.Linear(d, 1)
        # the fixed random initial y and z (H_init, L_init), never trained: std 1 after the cut at
        # 2 std (the official trunc_normal_init_; 0.8796 is the std of N(0, 1) cut to [-2, 2])
        s = 1 / 0.87962566103423978
        self.register_buffer("init_state", nn.init.trunc_normal_(torch.empty(2, d), std=s, a=-2 * s, b=2 * s))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=cfg.init_std)
        for table in (self.embed_tokens, self.embed_positions):
            if table is not None:
                nn.init.normal_(table.weight, std=d**-0.5)
        nn.init.zeros_(self.q_head.weight)
        nn.init.constant_(self.q_head.bias, -5.0)

    def initial_state(self, batch):
        """(y, z) of a fresh puzzle: H_init and L_init broadcast to [batch, T, D]."""
        shape = (batch, n_positions(self.cfg), self.cfg.d_model)
        return self.init_state[0].expand(shape), self.init_state[1].expand(shape)

    def embed(self, tokens):
        """x [B, T, D]: the prefix rows and the cells' embeddings (+ learned positions, times
        1/sqrt(2)), all times sqrt(D)."""
        x = self.embed_tokens(tokens)
        if self.embed_prefix is not None:
            x = torch.cat([self.embed_prefix.expand(len(x), -1, -1), x], dim=1)
        if self.embed_positions is not None:
            x = 0.707106781 * (x + self.embed_positions.weight)
        return math.sqrt(self.cfg.d_model) * x

    def core(self, h):
        """Every block once; attention is non-causal (every position sees every other)."""
        T = h.shape[1]
        positions = torch.arange(T, device=h.device)[None]
        mask = torch.ones(1, T, T, dtype=torch.bool, device=h.device)
        for block in self.layers:
            h = block(h, positions, mask)
        return h

    def latent_recursion(self, x, y, z, l_cycles):
        for _ in range(l_cycles):
            z = self.core(x + y + z)
        return self.core(y + z), z

    def forward(self, tokens, y, z, h_cycles=None, l_cycles=None):
        """tokens [B, L], the carried (y, z) [B, T, D] -> (y, z) detached, logits [B, L, V] float32,
        q_halt [B] float32 (float64 in a float64 model). h_cycles / l_cycles (T, n) default to the
        config's. The carry is detached on the way in too: no gradient reaches it."""
        t = self.cfg.trm
        h_cycles, l_cycles = h_cycles or t.h_cycles, l_cycles or t.l_cycles
        x = self.embed(tokens)
        if t.mode == "plain":
            y = self.core(x)
        else:
            y, z = y.detach(), z.detach()
            with torch.no_grad():
                for _ in range(h_cycles - 1):
                    y, z = self.latent_recursion(x, y, z, l_cycles)
            y, z = self.latent_recursion(x, y, z, l_cycles)
        logits = at_least_float32(self.lm_head(y[:, t.n_prefix:]))
        q_halt = self.q_head(at_least_float32(y[:, 0]))[:, 0]
        return y.detach(), z.detach(), logits, q_halt


def log_stablemax(logits, dim=-1):
    """log(s(x) / sum s(x)), s(x) = x + 1 for x >= 0 and 1 / (1 - x) below, in float64 as the
    official `models/losses.py`."""
    x = logits.double()
    s = torch.where(x < 0, 1 / (1 - x), x + 1)
    return torch.log(s / s.sum(dim, keepdim=True))


def trm_loss(logits, q_halt, labels, stablemax=False):
    """One supervision step's loss: per puzzle the mean cross-entropy over its cells plus
    0.5 * BCE(q_halt, answer exactly right), averaged over the batch. logits [B, L, V], q_halt [B],
    labels [B, L]. Returns (loss, (cross-entropy, exactly right [B] bool))."""
    log_probs = log_stablemax(logits) if stablemax else F.log_softmax(logits.float(), dim=-1)
    ce = -log_probs.gather(-1, labels[..., None])[..., 0].mean(-1).float()  # [B]
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).all(-1)
    halt = F.binary_cross_entropy_with_logits(q_halt, correct.float(), reduction="none")
    return (ce + 0.5 * halt).mean(), (ce.mean(), correct)
