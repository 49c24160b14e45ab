"""Text generation for torch_ref: KV caches, prefill, then one token per step, and the sampling
controls. The same caches and semantics as jaxllm.decode, written to be read top to bottom.

Caches, one per layer:
- attention (MHA / GQA / MQA): keys and values [B, S, K, H];
- MLA: the normalised latent c_kv [B, S, C] and the rotated rope key k_rope [B, S, K, R]; a step
  attends with the weights absorbed (W_UK into the query, W_UV after the weighted sum).
`positions` [B, S] holds the token position in each slot (-1: empty or padding). Time step t is
written to slot t % S, so with a sliding window the cache is a rolling buffer of S = W slots.
Prompts of different lengths are left-padded; each row's positions start at 0.

Sampling, in Hugging Face's order: repetition penalty, temperature, top-k, top-p, min-p.
temperature 0 is greedy.
"""
import numpy as np
import torch
import torch.nn.functional as F

from torch_ref.mla import MultiHeadLatentAttention, apply_rope as mla_rope, rope_amplitude, rope_inv_freq, softmax_scale
from torch_ref.layers import apply_rope, rope_angles
from torch_ref.model import mask_token_id


def position_mask(q_pos, k_pos, window):
    """[B, T, S]: query at position i sees key j iff the key is a token (j >= 0) and 0 <= i - j < window."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = (k_pos[:, None, :] >= 0) & (d >= 0)
    if window is not None:
        allowed &= d < window
    return allowed


def write_cache(buf, new, step):
    """Write new [B, T, ...] at time steps step.. into buf [B, S, ...], slot = time % S (keeps the last S)."""
    S, T = buf.shape[1], new.shape[1]
    if T > S:
        new, step, T = new[:, T - S:], step + T - S, S
    buf[:, (step + torch.arange(T, device=buf.device)) % S] = new.to(buf.dtype)
    return buf


class Cache:
    def __init__(self, model, batch, size, dtype=torch.float32):
        cfg = model.cfg
        device = model.embed_tokens.weight.device
        self.positions = torch.full((batch, size), -1, dtype=torch.long, device=device)
        self.layers = []
        for block in model.layers:
            if isinstance(block.attn, MultiHeadLatentAttention):
                m = cfg.attention.mla
                k = cfg.attention.n_head if m.variant == "seed004" else 1
                self.layers.append([torch.zeros(batch, size, m.kv_lora_rank, dtype=dtype, device=device),
                                    torch.zeros(batch, size, k, m.qk_rope_head_dim, dtype=dtype, device=device)])
            else:
                a = cfg.attention
                self.layers.append([torch.zeros(batch, size, a.n_kv_head, a.head_dim, dtype=dtype, device=device)
                                    for _ in range(2)])


def attention_cached(attn, x, positions, kv, step, mask, prefill):
    """Attention over the T new tokens (prefill, the cache was empty) or over the whole cache."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, attn.head_dim)
    v = attn.v_proj(x).view(B, T, attn.n_kv_head, attn.head_dim)
    if attn.rope_theta is not None:
        cos, sin = rope_angles(positions, attn.head_dim, attn.rope_theta)
        q = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
        k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
    write_cache(kv[0], k, step)
    write_cache(kv[1], v, step)
    if not prefill:
        k, v = kv
    groups = attn.n_head // attn.n_kv_head
    k = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, N, S, H]
    v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None])
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def mla_cached(attn, x, positions, cache, step, mask, prefill):
    """MLA with the compressed cache; prefill expands keys and values, a step absorbs the weights."""
    B, T, _ = x.shape
    m, N = attn.mla, attn.n_head
    nope, R, Hv, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    if m.variant == "seed004":
        c_q = attn.q_proj_d(x)
        q_nope, q_rope = attn.q_proj_u(c_q).view(B, T, N, nope), attn.rope_q(c_q).view(B, T, N, R)
        c_kv, k_rope = attn.kv_proj_d(x), attn.rope_k(x).view(B, T, N, R)
        w_uk, w_uv = attn.k_proj_u.weight.view(N, nope, C), attn.v_proj_u.weight.view(N, Hv, C)
    else:
        q = attn.q_proj(x) if m.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, N, nope + R).split([nope, R], dim=-1)
        c_kv, k_rope = attn.kv_a_proj_with_mqa(x).split([C, R], dim=-1)
        c_kv, k_rope = attn.kv_a_layernorm(c_kv), k_rope.view(B, T, 1, R)
        w_uk, w_uv = attn.kv_b_proj.weight.view(N, nope + Hv, C).split([nope, Hv], dim=1)
    angles = (positions.float()[..., None] * rope_inv_freq(m, attn.rope_theta))[:, :, None, :]
    q_rope = mla_rope(q_rope, angles, rope_amplitude(m), m.rope_layout)
    k_rope = mla_rope(k_rope, angles, rope_amplitude(m), m.rope_layout)
    write_cache(cache[0], c_kv, step)
    write_cache(cache[1], k_rope, step)
    if not prefill:
        c_kv, k_rope = cache
    S = c_kv.shape[1]
    if prefill:  # expand the latents to keys and values, as in training
        k_nope = torch.einsum("bsc,ndc->bsnd", c_kv, w_uk)
        v = torch.einsum("bsc,ndc->bsnd", c_kv, w_uv)
        k = torch.cat([k_nope, k_rope.expand(B, S, N, R)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None], scale=softmax_scale(m)).transpose(1, 2)
    else:  # absorbed: scores against c_kv itself, keys and values never expanded
        q_latent = torch.einsum("btnd,ndc->btnc", q_nope, w_uk)
        scores = torch.einsum("btnc,bsc->bnts", q_latent, c_kv)
        scores = scores + torch.einsum("btnr,bsnr->bnts", q_rope, k_rope.expand(B, S, N, R))
        scores = (scores * softmax_scale(m)).masked_fill(~mask[:, None], float("-inf"))
        o_latent = torch.einsum("bnts,bsc->btnc", scores.softmax(dim=-1), c_kv)
        y = torch.einsum("btnc,ndc->btnd", o_latent, w_uv)
    return attn.o_proj(y.reshape(B, T, N * Hv))


def forward_cached(model, tokens, positions, cache, step, mask, prefill):
    """Logits [B, V] of the last of the new tokens; the caches are updated in place."""
    x = model.embed_tokens(tokens)
    if model.embed_positions is not None:
        x = x + model.embed_positions(positions)
    for block, kv in zip(model.layers, cache.layers):
        h = x if block.attn_norm is None else block.attn_norm(x)
        attend = mla_cached if isinstance(block.attn, MultiHeadLatentAttention) else attention_cached
        x = block.residual(x, attend(block.attn, h, positions, kv, step, mask, prefill))
        x = block.residual(x, block.mlp(x if block.mlp_norm is None else block.mlp_norm(x)))
    x = model.final_norm(x[:, -1])
    logits = x @ model.embed_tokens.weight.T if model.lm_head is None else model.lm_head(x)
    return logits if model.lm_head_bias is None else logits + model.lm_head_bias


def process_logits(logits, seen, temperature, top_k, top_p, min_p, repetition_penalty):
    """[B, V] -> [B, V] with removed tokens at -inf (and temperature applied)."""
    if repetition_penalty != 1.0:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        keep_sorted = probs.cumsum(dim=-1) - probs < top_p  # the mass ranked before a token is < p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, eos_id=None, stop_sequences=(), seed=0, cached=True, on_token=None,
             cache_dtype=torch.float32):
    """New token ids per prompt, up to and including EOS or a stop sequence; never past the context.
    `on_token(tokens [B], active [B])` is called after every step when given (streaming).

    cached=False recomputes the whole sequence each step, one prompt at a time (the reference).
    """
    cfg = model.cfg
    if not cached:
        return generate_uncached(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                 repetition_penalty, eos_id, stop_sequences, seed, on_token)
    B, P = len(prompts), max(len(ids) for ids in prompts)
    max_new = min(max_new_tokens, cfg.max_seq_len - P)
    device = model.embed_tokens.weight.device
    lengths = torch.tensor([len(ids) for ids in prompts], device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, ids in enumerate(prompts):
        tokens[b, P - len(ids):] = torch.tensor(ids)
    positions = torch.arange(P, device=device)[None] - (P - lengths)[:, None]  # negative: padding
    valid = positions.where(positions >= 0, -1)
    size = P + max_new if cfg.attention.window is None else min(cfg.attention.window, P + max_new)
    cache = Cache(model, B, size, cache_dtype)
    mask = position_mask(valid, valid, cfg.attention.window) | torch.eye(P, dtype=torch.bool, device=device)  # padding sees itself
    logits = forward_cached(model, tokens, positions.clamp(min=0), cache, 0, mask, prefill=True)
    write_cache(cache.positions, valid, 0)
    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
    for b, ids in enumerate(prompts):
        seen[b, ids] = True
    generator = torch.Generator(device).manual_seed(seed)
    out, done, kept = [[] for _ in range(B)], [False] * B, []
    for t in range(max_new):
        logits = never_sampled(cfg, logits.float())
        token = sample(process_logits(logits, seen, temperature, top_k, top_p, min_p, repetition_penalty),
                       temperature, generator)
        if on_token is not None or eos_id is not None or stop_sequences:  # a host sync per step
            active = [not d for d in done]
            for b, tok in enumerate(token.tolist()):
                if not done[b]:
                    out[b].append(tok)
                    done[b] = tok == eos_id or any(out[b][-len(s):] == list(s) for s in stop_sequences if s)
            if on_token is not None:
                on_token(token.cpu().numpy(), active)
            if all(done):
                break
        else:
            kept.append(token)  # no host sync: the tokens stay on the device until the end
        seen[torch.arange(B, device=device), token] = True
        q_pos = (lengths + t)[:, None]
        write_cache(cache.positions, q_pos, P + t)
        mask = position_mask(q_pos, cache.positions, cfg.attention.window)
        logits = forward_cached(model, token[:, None], q_pos, cache, P + t, mask, prefill=False)
    return torch.stack(kept, dim=1).tolist() if kept else out


def never_sampled(cfg, logits):
    """TiDAR's [MASK] id (model.diffusion) is a training input, never an output."""
    if cfg.diffusion.enabled:
        logits[:, mask_token_id(cfg)] = float("-inf")
    return logits


def sample(logits, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def generate_uncached(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                      eos_id, stop_sequences, seed, on_token):
    """Full recompute of each prompt's whole context for every new token (no cache), one prompt at a
    time; all prompts advance one token per step, so that `on_token` sees each step's tokens."""
    cfg, device = model.cfg, model.embed_tokens.weight.device
    contexts = [torch.tensor([ids], device=device) for ids in prompts]
    seen = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.bool, device=device)
    for b, ids in enumerate(prompts):
        seen[b, ids] = True
    generators = [torch.Generator(device).manual_seed(seed) for _ in prompts]  # each prompt draws on its own
    limits = [min(max_new_tokens, cfg.max_seq_len - len(ids)) for ids in prompts]
    out, done = [[] for _ in prompts], [limit <= 0 for limit in limits]
    while not all(done):
        active, tokens = [not d for d in done], [0] * len(prompts)
        for b in range(len(prompts)):
            if done[b]:
                continue
            logits = never_sampled(cfg, model(contexts[b])[:, -1].float())
            logits = process_logits(logits, seen[b:b + 1], temperature, top_k, top_p, min_p, repetition_penalty)
            token = sample(logits, temperature, generators[b])
            tokens[b] = int(token[0])
            out[b].append(tokens[b])
            seen[b, token] = True
            contexts[b] = torch.cat([contexts[b], token[:, None]], dim=1)
            done[b] = (len(out[b]) == limits[b] or tokens[b] == eos_id
                       or any(out[b][-len(s):] == list(s) for s in stop_sequences if s))
        if on_token is not None:
            on_token(np.array(tokens), active)
    return out
