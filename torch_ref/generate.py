"""Text generation for torch_ref: a prefill, then one token per step, each a forward of the model
with its cache (torch_ref.model.Cache), and the sampling controls. The same caches and semantics as
jaxllm.decode, written to be read top to bottom.

Caches, one per layer (the layers' init_cache):
- attention (MHA / GQA / MQA): keys and values [B, S, K, H];
- MLA: the normalised latent c_kv [B, S, C] and the rotated rope key k_rope [B, S, K, R]; a step
  attends with the weights absorbed (W_UK into the query, W_UV after the weighted sum).
`cache.positions` [B, S] holds the token position in each slot (-1: empty or padding). Time step t
is written to slot t % S, so with a sliding window the cache is a rolling buffer of S = W slots.
Prompts of different lengths are left-padded; each row's positions start at 0.

Sampling, in Hugging Face's order: repetition penalty, temperature, top-k, top-p, min-p.
temperature 0 is greedy.
"""
import numpy as np
import torch

from torch_ref.layers import write_cache
from torch_ref.model import Cache, mask_token_id


def position_mask(q_pos, k_pos, window):
    """[B, T, S]: query at position i sees key j iff the key is a token (j >= 0) and 0 <= i - j < window."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = (k_pos[:, None, :] >= 0) & (d >= 0)
    if window is not None:
        allowed &= d < window
    return allowed


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
    write_cache(cache.positions, valid, cache.step)
    logits = model(tokens, positions.clamp(min=0), mask, cache=cache)[:, -1]
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
        write_cache(cache.positions, q_pos, cache.step)
        mask = position_mask(q_pos, cache.positions, cfg.attention.window)
        logits = model(token[:, None], q_pos, mask, cache=cache)[:, -1]
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
