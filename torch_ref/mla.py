"""Multi-head Latent Attention (DeepSeek-V2/V3) and the seed-004 variant, in plain PyTorch.

DeepSeek (Hugging Face names): queries from q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj;
kv_a_proj_with_mqa gives [c_kv | k_rope], kv_a_layernorm normalises c_kv, kv_b_proj gives per head
[k_nope | v]; the one rope key is shared by every head. Seed 004: q_proj_d / q_proj_u / rope_q for
the queries, kv_proj_d / k_proj_u / v_proj_u for keys and values, rope_k gives a rope key per head
from x; no latent norms. Scores use 1/sqrt(nope + rope), times mscale^2 under YaRN.

Decoding caches the compressed latent (c_kv and the rotated rope key), not keys and values.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F



def yarn_get_mscale(factor, mscale):
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(mla):
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if mla.yarn_factor is not None:
        scale = scale * yarn_get_mscale(mla.yarn_factor, mla.yarn_mscale_all_dim) ** 2
    return scale


def rope_amplitude(mla):
    """YaRN scales cos and sin by mscale(f, mscale) / mscale(f, mscale_all_dim)."""
    if mla.yarn_factor is None:
        return 1.0
    return yarn_get_mscale(mla.yarn_factor, mla.yarn_mscale) / yarn_get_mscale(mla.yarn_factor, mla.yarn_mscale_all_dim)


def rope_inv_freq(mla, theta):
    """[R/2] inverse frequencies; with YaRN as Hugging Face's DeepseekV2YarnRotaryEmbedding."""
    dim = mla.qk_rope_head_dim
    freq_extra = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if mla.yarn_factor is None:
        return freq_extra
    freq_inter = 1.0 / (mla.yarn_factor * theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    def correction_dim(num_rotations):
        return dim * math.log(mla.yarn_original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(mla.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(mla.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp
    return freq_inter * (1 - extrapolate) + freq_extra * extrapolate


def apply_rope(x, angles, amplitude, layout):
    """Rotate x [B, T, heads, R] by angles [B, T, 1, R/2], in float32; returns x's dtype."""
    if layout == "interleaved":  # pairs (2i, 2i+1) as complex numbers, as DeepSeek's official code
        freqs_cis = torch.polar(torch.full_like(angles, amplitude), angles)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(-2).to(x.dtype)
    cos, sin = amplitude * angles.cos(), amplitude * angles.sin()  # pairs (i, i + R/2), as HF Llama
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a, m = cfg.attention, cfg.attention.mla
        d, n, c, cq = cfg.d_model, a.n_head, m.kv_lora_rank, m.q_lora_rank
        nope, r, hv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.mla, self.n_head, self.dropout = m, n, a.dropout
        self.rope_theta = m.rope_theta
        if m.variant == "seed004":
            self.kv_proj_d = nn.Linear(d, c, bias=a.qkv_bias)
            self.q_proj_d = nn.Linear(d, cq, bias=a.qkv_bias)
            self.k_proj_u = nn.Linear(c, n * nope, bias=False)
            self.v_proj_u = nn.Linear(c, n * hv, bias=False)
            self.q_proj_u = nn.Linear(cq, n * nope, bias=False)
            self.rope_k = nn.Linear(d, n * r, bias=False)
            self.rope_q = nn.Linear(cq, n * r, bias=False)
        else:
            if cq is None:
                self.q_proj = nn.Linear(d, n * (nope + r), bias=False)
            else:
                self.q_a_proj = nn.Linear(d, cq, bias=a.qkv_bias)
                self.q_a_layernorm = nn.RMSNorm(cq, eps=m.latent_norm_eps)
                self.q_b_proj = nn.Linear(cq, n * (nope + r), bias=False)
            self.kv_a_proj_with_mqa = nn.Linear(d, c + r, bias=a.qkv_bias)
            self.kv_a_layernorm = nn.RMSNorm(c, eps=m.latent_norm_eps)
            self.kv_b_proj = nn.Linear(c, n * (nope + hv), bias=False)
        self.o_proj = nn.Linear(n * hv, d, bias=a.out_bias)

    def init_cache(self, batch, size, dtype, device):
        """The compressed cache: the normalised latent c_kv [B, S, C] and the rotated rope key
        k_rope [B, S, heads, R] (one head for DeepSeek, N for seed 004)."""
        m = self.mla
        heads = self.n_head if m.variant == "seed004" else 1
        return (torch.zeros(batch, size, m.kv_lora_rank, dtype=dtype, device=device),
                torch.zeros(batch, size, heads, m.qk_rope_head_dim, dtype=dtype, device=device))

    def project(self, x):
        """x [B, T, D] -> q_nope [B, T, N, nope], q_rope [B, T, N, R], c_kv [B, T, C], k_rope [B, T, heads, R]."""
        B, T, _ = x.shape
        m, N = self.mla, self.n_head
        nope, R = m.qk_nope_head_dim, m.qk_rope_head_dim
        if m.variant == "seed004":
            c_q = self.q_proj_d(x)
            q_nope = self.q_proj_u(c_q).view(B, T, N, nope)
            q_rope = self.rope_q(c_q).view(B, T, N, R)
            return q_nope, q_rope, self.kv_proj_d(x), self.rope_k(x).view(B, T, N, R)  # one rope key per head
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, N, nope + R).split([nope, R], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, R], dim=-1)
        return q_nope, q_rope, self.kv_a_layernorm(c_kv), k_rope.view(B, T, 1, R)  # one rope key shared by all heads

    def up_weights(self):
        """W_UK [N, nope, C] and W_UV [N, Hv, C]: the latent's up-projections to keys and values."""
        m, N, C = self.mla, self.n_head, self.mla.kv_lora_rank
        if m.variant == "seed004":
            return weight(self.k_proj_u).view(N, m.qk_nope_head_dim, C), weight(self.v_proj_u).view(N, m.v_head_dim, C)
        return weight(self.kv_b_proj).view(N, m.qk_nope_head_dim + m.v_head_dim, C).split(
            [m.qk_nope_head_dim, m.v_head_dim], dim=1)

    def forward(self, x, positions, mask, cache=None):
        """mask [B or 1, T, S] (True: may attend). cache: this layer's LayerCache of latents
        (init_cache), written in place; the prefill expands keys and values as in training, a
        decoding step attends with the weights absorbed (W_UK into the query, W_UV after the
        weighted sum), so keys and values are never expanded."""
        B, T, _ = x.shape
        m, N = self.mla, self.n_head
        nope, R, Hv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        q_nope, q_rope, c_kv, k_rope = self.project(x)
        inv_freq = rope_inv_freq(m, self.rope_theta).to(positions.device)
        angles = (positions.float()[..., None] * inv_freq)[:, :, None, :]  # [B, T, 1, R/2]
        amplitude = rope_amplitude(m)
        q_rope = apply_rope(q_rope, angles, amplitude, m.rope_layout)
        k_rope = apply_rope(k_rope, angles, amplitude, m.rope_layout)
        absorbed = cache is not None and not cache.prefill
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope)
        S = c_kv.shape[1]
        if absorbed:  # scores against c_kv itself
            w_uk, w_uv = self.up_weights()
            q_latent = torch.einsum("btnd,ndc->btnc", q_nope, w_uk)
            scores = torch.einsum("btnc,bsc->bnts", q_latent, c_kv)
            scores = scores + torch.einsum("btnr,bsnr->bnts", q_rope, k_rope.expand(B, S, N, R))
            scores = (scores * softmax_scale(m)).masked_fill(~mask[:, None], float("-inf"))
            o_latent = torch.einsum("bnts,bsc->btnc", scores.softmax(dim=-1), c_kv)
            y = torch.einsum("btnc,ndc->btnd", o_latent, w_uv)
        else:  # expand the latents to keys and values
            if m.variant == "seed004":
                k_nope, v = self.k_proj_u(c_kv).view(B, S, N, nope), self.v_proj_u(c_kv).view(B, S, N, Hv)
            else:
                k_nope, v = self.kv_b_proj(c_kv).view(B, S, N, nope + Hv).split([nope, Hv], dim=-1)
            q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)                        # [B, N, T, nope+R]
            k = torch.cat([k_nope, k_rope.expand(B, S, N, R)], dim=-1).transpose(1, 2)     # [B, N, S, nope+R]
            y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask[:, None],
                                               scale=softmax_scale(m),
                                               dropout_p=self.dropout if self.training else 0.0).transpose(1, 2)
        return self.o_proj(y.reshape(B, T, N * Hv))


def weight(linear):
    """A projection's weight, with its LoRA adapters folded in when it has them."""
    return getattr(linear, "merged_weight", linear.weight)
