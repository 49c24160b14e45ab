"""Multi-head Latent Attention (DeepSeek-V2/V3, papers.md §3) and the seed-004 variant.

Letters: B batch, T query positions, S key positions, D model width, N heads, H head dim,
C latent rank (kv_lora_rank, or q_lora_rank for the query latent), and two more here:
R the decoupled rope head dim (qk_rope_head_dim) and K the rope-key heads (1 for DeepSeek, whose
one rope key is shared by all heads, MQA-style; N for seed 004, which projects one per head).

DeepSeek (`variant: deepseek`, Hugging Face names):

    c_q    = q_a_layernorm(q_a_proj(x))                 [B,T,C]     (or a plain q_proj from x)
    q      = q_b_proj(c_q)                              [B,T,N,nope+R] = [q_nope | q_rope]
    [c_kv | k_rope] = kv_a_proj_with_mqa(x)             [B,S,C+R]
    c_kv   = kv_a_layernorm(c_kv)                       (the norm covers c_kv only)
    [k_nope | v] = kv_b_proj(c_kv)                      [B,S,N,nope+Hv]
    k      = [k_nope | rope(k_rope) for every head]

Seed 004 (`variant: seed004`, the seed's names): per-head rope queries and keys,
q = [q_proj_u(c_q) | rope(rope_q(c_q))] with c_q = q_proj_d(x) (no latent norms),
k = [k_proj_u(c_kv) | rope(rope_k(x))], v = v_proj_u(c_kv) with c_kv = kv_proj_d(x).

Softmax scale 1/sqrt(nope + R), times mscale^2 under YaRN. MLA always rotates its rope dims, with
`mla.rope_theta` (the config resolves it from `position.rope_theta` for rope models), whatever
`position.kind` says; learned positions, if set, are added to the embeddings as well (seed 004
does both).

The forward is split where a decode cache sits: `latents` gives what is cached per token
(the normalised c_kv and the rotated k_rope, (C + K*R) numbers), `attend_latents` expands them to
keys and values and attends. Given a decode cache, `__call__` keeps those latents in it and, in a
decode step, attends with the weights absorbed (§3.1): q_nope is mapped into the
latent space by W_UK, scores are taken against c_kv directly, and the latent output is mapped back
by W_UV; keys and values are never expanded.

Biases: `attention.qkv_bias` puts a bias on the projections that read x into latents
(q_a_proj, kv_a_proj_with_mqa; seed 004: q_proj_d, kv_proj_d), as Hugging Face's
`attention_bias`; `attention.out_bias` on o_proj. The up-projections and a plain q_proj have none.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import MLAConfig, ModelConfig
from jaxllm.model.attention import AttentionMask, LayerCache, attend
from jaxllm.model.embeddings import apply_rope
from jaxllm.model.norms import RMSNorm
from jaxllm.model.params import Einsum, dtypes


def yarn_get_mscale(factor: float, mscale: float) -> float:
    """YaRN's temperature factor 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def mscale_squared(mla: MLAConfig) -> float:
    """The YaRN factor on the softmax scale, mscale(factor, mscale_all_dim)^2 (HF V3, official code); 1 without YaRN."""
    if mla.yarn_factor is None:
        return 1.0
    return yarn_get_mscale(mla.yarn_factor, mla.yarn_mscale_all_dim) ** 2


def softmax_scale(mla: MLAConfig) -> float:
    """1/sqrt(nope + R) times mscale_squared."""
    return (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5 * mscale_squared(mla)


def rope_amplitude(mla: MLAConfig) -> float:
    """The factor on cos and sin: get_mscale(f, mscale) / get_mscale(f, mscale_all_dim) under YaRN."""
    if mla.yarn_factor is None:
        return 1.0
    return yarn_get_mscale(mla.yarn_factor, mla.yarn_mscale) / yarn_get_mscale(mla.yarn_factor, mla.yarn_mscale_all_dim)


def rope_inv_freq(mla: MLAConfig, theta: float) -> jax.Array:
    """The R/2 inverse frequencies theta^(-2i/R), YaRN-corrected when yarn_factor is set.

    YaRN (HF's deepseek 'yarn' init): dims that turn more than beta_fast times over the original
    context keep their frequency, those turning fewer than beta_slow times are divided by the
    factor, with a linear ramp over the dims in between.
    """
    r = mla.qk_rope_head_dim
    inv_freq = 1.0 / theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r)
    if mla.yarn_factor is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times
        return r * math.log(mla.yarn_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(mla.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(mla.yarn_beta_slow)), r - 1)
    if low == high:
        high += 0.001
    interpolate = jnp.clip((jnp.arange(r // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    return inv_freq / mla.yarn_factor * interpolate + inv_freq * (1.0 - interpolate)


class MultiHeadLatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        a, m = cfg.attention, cfg.attention.mla
        d, n, c, cq = cfg.d_model, a.n_head, m.kv_lora_rank, m.q_lora_rank
        nope, r, hv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        dtype, param_dtype = dtypes(cfg)
        kw = dict(std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        heads = ("heads", "head_dim")
        if m.variant == "seed004":
            self.q_proj_d = Einsum((d,), (cq,), ("embed",), ("latent",), bias=a.qkv_bias, **kw)
            self.q_proj_u = Einsum((cq,), (n, nope), ("latent",), heads, bias=False, **kw)
            self.rope_q = Einsum((cq,), (n, r), ("latent",), heads, bias=False, **kw)
            self.kv_proj_d = Einsum((d,), (c,), ("embed",), ("latent",), bias=a.qkv_bias, **kw)
            self.k_proj_u = Einsum((c,), (n, nope), ("latent",), heads, bias=False, **kw)
            self.v_proj_u = Einsum((c,), (n, hv), ("latent",), heads, bias=False, **kw)
            self.rope_k = Einsum((d,), (n, r), ("embed",), heads, bias=False, **kw)
        else:
            if cq is None:
                self.q_proj = Einsum((d,), (n, nope + r), ("embed",), heads, bias=False, **kw)
            else:
                self.q_a_proj = Einsum((d,), (cq,), ("embed",), ("latent",), bias=a.qkv_bias, **kw)
                self.q_a_layernorm = RMSNorm(cq, eps=m.latent_norm_eps, dtype=dtype, param_dtype=param_dtype)
                self.q_b_proj = Einsum((cq,), (n, nope + r), ("latent",), heads, bias=False, **kw)
            self.kv_a_proj_with_mqa = Einsum((d,), (c + r,), ("embed",), ("latent",), bias=a.qkv_bias, **kw)
            self.kv_a_layernorm = RMSNorm(c, eps=m.latent_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.kv_b_proj = Einsum((c,), (n, nope + hv), ("latent",), heads, bias=False, **kw)
        self.o_proj = Einsum((n, hv), (d,), heads, ("embed",), bias=a.out_bias, **kw)
        self.dropout = nnx.Dropout(a.dropout, deterministic=True, rngs=rngs)
        self.kernel = a.implementation
        self.mla, self.rope_theta = m, m.rope_theta

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask,
                 cache: LayerCache | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
        """x [B, T, D] -> [B, T, D]. With a decode `cache` (the compressed one, c_kv [B, S, C] and
        k_rope [B, S, K, R], see LayerCache) the new latents are written and the output comes with
        the updated cache: a prefill attends over the new latents expanded (as in training), a step
        with absorbed weights over what `LayerCache.update` returns, as `mask` says."""
        q = self.queries(x, positions)
        c_kv, k_rope = self.latents(x, positions)
        if cache is None:
            return self.attend_latents(q, c_kv, k_rope, mask)
        cache, latents = cache.update(c_kv, k_rope)
        if cache.prefill:
            return self.attend_latents(q, c_kv, k_rope, mask), cache
        return self.attend_absorbed(q, *latents, mask), cache

    def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Rotate the rope dims x [B, T, N|K, R] by positions [B, T], in float32.

        Interleaved pairs (2i, 2i+1), as DeepSeek's checkpoints and official code, are first
        gathered into the half-split order (i, i + R/2) that `apply_rope` rotates, so the result
        is de-interleaved (as Hugging Face V3 does). q and k are permuted alike: scores are unchanged.
        """
        if self.mla.rope_layout == "interleaved":
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(self.mla, self.rope_theta)
        angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, R]
        amplitude = rope_amplitude(self.mla)
        return apply_rope(x, amplitude * jnp.cos(angles), amplitude * jnp.sin(angles))

    def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, D] -> q [B, T, N, nope + R] = [q_nope | rotated q_rope]."""
        if self.mla.variant == "seed004":
            c_q = self.q_proj_d("BTD,DC->BTC", x)
            q_nope = self.q_proj_u("BTC,CNH->BTNH", c_q)
            q_rope = self.rope_q("BTC,CNR->BTNR", c_q)
        else:
            if self.mla.q_lora_rank is None:
                q = self.q_proj("BTD,DNH->BTNH", x)
            else:
                q = self.q_b_proj("BTC,CNH->BTNH", self.q_a_layernorm(self.q_a_proj("BTD,DC->BTC", x)))
            q_nope, q_rope = jnp.split(q, [self.mla.qk_nope_head_dim], axis=-1)
        return jnp.concatenate([q_nope, self.rope(q_rope, positions)], axis=-1)

    def latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, S, D] -> what a decode cache keeps per token: c_kv [B, S, C] (normalised for
        DeepSeek) and the rotated rope keys k_rope [B, S, K, R] (K = 1 for DeepSeek, N for seed 004)."""
        if self.mla.variant == "seed004":
            c_kv = self.kv_proj_d("BSD,DC->BSC", x)
            k_rope = self.rope_k("BSD,DKR->BSKR", x)
        else:
            kv = self.kv_a_proj_with_mqa("BSD,DC->BSC", x)  # output [c_kv | k_rope], C + R wide
            c_kv, k_rope = jnp.split(kv, [self.mla.kv_lora_rank], axis=-1)
            c_kv = self.kv_a_layernorm(c_kv)
            k_rope = k_rope[:, :, None, :]  # one rope key for all heads
        return c_kv, self.rope(k_rope, positions)

    def attend_latents(self, q: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
                       mask: AttentionMask) -> jax.Array:
        """Attention of q [B, T, N, nope + R] over the latents of S positions -> [B, T, D], as
        `mask` says (see `attend`)."""
        if self.mla.variant == "seed004":
            k_nope = self.k_proj_u("BSC,CNH->BSNH", c_kv)
            v = self.v_proj_u("BSC,CNH->BSNH", c_kv)
        else:
            k_nope, v = jnp.split(self.kv_b_proj("BSC,CNH->BSNH", c_kv), [self.mla.qk_nope_head_dim], axis=-1)
        k_rope = jnp.broadcast_to(k_rope, (*k_nope.shape[:3], k_rope.shape[-1])).astype(k_nope.dtype)
        k = jnp.concatenate([k_nope, k_rope], axis=-1)
        # `attend` takes one head dim H for q, k and v and scales by 1/sqrt(H): zero-pad the
        # narrower of (q, k) and v to H (zeros add nothing to scores or outputs) and fold the rest
        # of the softmax scale into q.
        h_qk, h_v = q.shape[-1], v.shape[-1]
        h = max(h_qk, h_v)
        q_scale = mscale_squared(self.mla) * math.sqrt(h / h_qk)  # = softmax_scale * sqrt(h); 1.0 usually
        q = q * jnp.asarray(q_scale, q.dtype) if q_scale != 1.0 else q
        pad = lambda t: jnp.pad(t, [(0, 0)] * 3 + [(0, h - t.shape[-1])])
        o = attend(pad(q), pad(k), pad(v), mask, dropout=self.dropout, kernel=self.kernel)[..., :h_v]
        return self.o_proj("BTNH,NHD->BTD", o)

    def init_cache(self, batch: int, size: int, dtype) -> tuple[jax.Array, jax.Array]:
        """An empty compressed cache of `size` slots: c_kv [B, S, C] and k_rope [B, S, K, R], that is
        C + K*R numbers per token (K = 1 for DeepSeek), not expanded keys and values."""
        k = self.rope_k.weight.shape[1] if self.mla.variant == "seed004" else 1
        return (jnp.zeros((batch, size, self.mla.kv_lora_rank), dtype),
                jnp.zeros((batch, size, k, self.mla.qk_rope_head_dim), dtype))

    def up_projections(self) -> tuple[jax.Array, jax.Array]:
        """W_UK [C, N, nope] and W_UV [C, N, Hv], the maps from c_kv to keys and values."""
        if self.mla.variant == "seed004":
            return self.k_proj_u.kernel(), self.v_proj_u.kernel()
        w = self.kv_b_proj.kernel()
        return w[..., :self.mla.qk_nope_head_dim], w[..., self.mla.qk_nope_head_dim:]

    def attend_absorbed(self, q: jax.Array, c_kv: jax.Array, k_rope: jax.Array, mask: AttentionMask) -> jax.Array:
        """Weight-absorbed attention of q [B, T, N, nope + R] over latents c_kv [B, S, C] and
        k_rope [B, S, K, R] -> [B, T, D]: scores = (W_UK^T q_nope) . c_kv + q_rope . k_rope, the
        output W_UV (sum_s p_s c_kv_s) (papers.md §3.1, DeepSeek's attn_impl="absorb")."""
        dtype = q.dtype
        w_uk, w_uv = (w.astype(dtype) for w in self.up_projections())
        q_nope, q_rope = jnp.split(q, [self.mla.qk_nope_head_dim], axis=-1)
        q_latent = jnp.einsum("BTNH,CNH->BTNC", q_nope, w_uk)
        scores = jnp.einsum("BTNC,BSC->BNTS", q_latent, c_kv.astype(dtype)).astype(jnp.float32)
        if k_rope.shape[2] == 1:  # DeepSeek: one rope key shared by all heads
            rope_scores = jnp.einsum("BTNR,BSR->BNTS", q_rope, k_rope[:, :, 0].astype(dtype))
        else:
            rope_scores = jnp.einsum("BTNR,BSNR->BNTS", q_rope, k_rope.astype(dtype))
        scores = (scores + rope_scores.astype(jnp.float32)) * softmax_scale(self.mla)
        scores = jnp.where(mask.allowed[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        o_latent = jnp.einsum("BNTS,BSC->BTNC", probs, c_kv.astype(dtype))
        o = jnp.einsum("BTNC,CNH->BTNH", o_latent, w_uv)
        return self.o_proj("BTNH,NHD->BTD", o)
