"""Text generation for torch_ref (docs/sampling.md): a prefill, then steps, each a forward of
the model with its cache (torch_ref.model.Cache), and the sampling controls. The same semantics as
jaxllm.decode, written to be read top to bottom.

The model builds every attention mask itself from the tokens' positions and groups (the one mask
rule, torch_ref.layers.visible). Prompts of different lengths are left-padded to P (padding:
position -1); each row's positions start at 0. The prefill writes time steps 0..P-1 of every row;
time step t lives in slot t % S, so with a sliding window the cache is a rolling buffer.

- Plain decoding: one token per step.
- TiDAR self-speculative decoding (speculative="tidar", papers.md §1.3): each step verifies the
  block's B - 1 drafts autoregressively and drafts the next block for every possible acceptance, in
  one forward of B(1 + B) tokens, and commits 1..B tokens.

Sampling, in Hugging Face's order: repetition penalty, temperature, top-k, top-p, min-p.
temperature 0 is greedy.
"""
import numpy as np
import torch
import torch.nn.functional as F

from torch_ref.model import Cache, mask_token_id


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


def never_sampled(cfg, logits):
    """TiDAR's [MASK] id (model.diffusion) is a training input, never an output."""
    if cfg.diffusion.enabled:
        logits[..., mask_token_id(cfg)] = float("-inf")
    return logits


def sample(logits, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, eos_id=None, stop_sequences=(), seed=0, cached=True, on_token=None,
             cache_dtype=torch.float32, speculative=None, block=8, beta=1.0, return_stats=False):
    """New token ids per prompt, up to and including EOS or a stop sequence; never past the context.
    `on_token(tokens [B], active [B])` is called after every token when given (streaming).

    cached=False recomputes the whole sequence each step, one prompt at a time (the reference).
    speculative="tidar": TiDAR self-speculative decoding with blocks of `block` tokens and the mix
    beta * AR + (1 - beta) * diffusion for the targets (needs model.diffusion.enabled);
    return_stats=True then also returns, per row, the accepted-draft count n of each of its steps.
    """
    cfg = model.cfg
    if speculative not in (None, "tidar"):
        raise ValueError(f"speculative={speculative!r}: expected None or 'tidar'")
    if speculative is not None and not cfg.diffusion.enabled:
        raise ValueError("speculative='tidar' needs a TiDAR model (model.diffusion.enabled)")
    if speculative is not None and not cached:
        raise ValueError("speculative='tidar' decodes with the cache (cached=True)")
    if speculative is not None and block < 1:
        raise ValueError(f"block={block}: TiDAR needs blocks of at least 1 token")
    if return_stats and speculative is None:
        raise ValueError("return_stats=True reports TiDAR's acceptances (speculative='tidar')")
    if not cached:
        return generate_uncached(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                 repetition_penalty, eos_id, stop_sequences, seed, on_token)

    def process(logits, seen):
        return process_logits(never_sampled(cfg, logits.float()), seen, temperature, top_k, top_p, min_p,
                              repetition_penalty)

    def ends(row):  # EOS or a stop sequence
        return row[-1] == eos_id or any(row[-len(s):] == list(s) for s in stop_sequences if s)

    device = model.embed_tokens.weight.device
    tokens, positions = left_pad(prompts, device)
    max_new = min(max_new_tokens, cfg.max_seq_len - tokens.shape[1])
    seen = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.bool, device=device)
    for b, ids in enumerate(prompts):
        seen[b, ids] = True
    generator = torch.Generator(device).manual_seed(seed)
    if speculative is not None:
        out, stats = generate_tidar(model, tokens, positions, max_new, block, beta, process, temperature, seen,
                                    generator, ends, on_token, cache_dtype)
        return (out, stats) if return_stats else out
    return generate_plain(model, tokens, positions, max_new, process, temperature, seen, generator, ends,
                          on_token, cache_dtype, watch=on_token is not None or eos_id is not None or bool(stop_sequences))


def left_pad(prompts, device):
    """tokens [B, P] (left-padded with 0) and positions [B, P] (-1: padding)."""
    B, P = len(prompts), max(len(ids) for ids in prompts)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    positions = torch.full((B, P), -1, dtype=torch.long, device=device)
    for b, ids in enumerate(prompts):
        tokens[b, P - len(ids):] = torch.tensor(ids)
        positions[b, P - len(ids):] = torch.arange(len(ids))
    return tokens, positions


def cache_size(cfg, P, max_new, slack=0):
    """P + max_new slots, or a rolling buffer of min(W, P + max_new) with a window; plus `slack`."""
    window = cfg.attention.window
    return (P + max_new if window is None else min(window, P + max_new)) + slack


def generate_plain(model, tokens, positions, max_new, process, temperature, seen, generator, ends, on_token,
                   cache_dtype, watch):
    """One token per step. watch: end rows at EOS / stop sequences and stream (a host sync per step)."""
    B, P = tokens.shape
    cache = Cache(model, B, cache_size(model.cfg, P, max_new), cache_dtype)
    logits = model(tokens, positions, cache=cache)[:, -1]
    lengths = positions[:, -1] + 1
    out, done, kept = [[] for _ in range(B)], [False] * B, []
    for t in range(max_new):
        token = sample(process(logits, seen), temperature, generator)
        if watch:
            active = [not d for d in done]
            for b, tok in enumerate(token.tolist()):
                if not done[b]:
                    out[b].append(tok)
                    done[b] = ends(out[b])
            if on_token is not None:
                on_token(token.cpu().numpy(), active)
            if all(done):
                break
        else:
            kept.append(token)  # no host sync: the tokens stay on the device until the end
        seen[torch.arange(B, device=seen.device), token] = True
        logits = model(token[:, None], (lengths + t)[:, None], cache=cache)[:, -1]
    return torch.stack(kept, dim=1).tolist() if kept else out


def generate_tidar(model, tokens, positions, max_new, block, beta, process, temperature, seen, generator, ends,
                   on_token, cache_dtype):
    """TiDAR (docs/sampling.md, "TiDAR self-speculative decoding"): the prefill gives the first block, each step commits
    d_0..d_n and emits d_1..d_n and y_n. Returns (out, stats)."""
    batch, P = tokens.shape
    out, done, stats = [[] for _ in range(batch)], [False] * batch, [[] for _ in range(batch)]
    if max_new <= 0:
        return out, stats
    # a block write may run up to B - 1 slots past the committed length: B slots of slack
    cache = Cache(model, batch, cache_size(model.cfg, P, max_new, slack=block), cache_dtype)
    lengths = positions[:, -1] + 1
    drafts = tidar_prefill(model, cache, tokens, positions, lengths, block, beta, process, temperature, seen,
                           generator)

    def emit(new):  # each unfinished row's new tokens, up to the first that ends it
        streamed = [[] for _ in range(batch)]
        for b, row in enumerate(new):
            for tok in row:
                if done[b]:
                    break
                out[b].append(tok)
                streamed[b].append(tok)
                seen[b, tok] = True
                done[b] = len(out[b]) == max_new or ends(out[b])
        if on_token is not None:
            for i in range(max(map(len, streamed))):
                on_token(np.array([row[i] if i < len(row) else 0 for row in streamed]),
                         [i < len(row) for row in streamed])

    emit([[d] for d in drafts[:, 0].tolist()])
    pad = P - lengths
    while not all(done):
        active = torch.tensor([not d for d in done], device=tokens.device)
        n, next_drafts = tidar_step(model, cache, drafts, pad, active, beta, process, temperature, seen, generator)
        for b, n_b in enumerate(n.tolist()):
            if not done[b]:
                stats[b].append(n_b)
        emit([row[1:n_b + 1] + [y] for row, n_b, y in zip(drafts.tolist(), n.tolist(), next_drafts[:, 0].tolist())])
        drafts = next_drafts
    return out, stats


def tidar_prefill(model, cache, tokens, positions, lengths, block, beta, process, temperature, seen, generator):
    """The prompt (written to the cache) and one block of B masks at positions L..L+B-1 (not written)
    -> the first block [B_rows, B]: d_0 = pick(beta a + (1 - beta) P_0), d_k = argmax P_k ([MASK] never drafted)."""
    P = tokens.shape[1]
    masks = torch.full((len(tokens), block), mask_token_id(model.cfg), device=tokens.device)
    mask_positions = lengths[:, None] + torch.arange(block, device=tokens.device)
    groups = torch.cat([torch.zeros(P, dtype=torch.long), torch.ones(block, dtype=torch.long)]).to(tokens.device)
    logits = model(torch.cat([tokens, masks], dim=1), in_context(model, torch.cat([positions, mask_positions], dim=1)),
                   groups[None], cache=cache, write=P).float()
    target = beta * logits[:, P - 1] + (1 - beta) * logits[:, P]
    d_0 = sample(process(target, seen), temperature, generator)
    return torch.cat([d_0[:, None], never_sampled(model.cfg, logits[:, P + 1:]).argmax(-1)], dim=1)


def in_context(model, positions):
    """Positions past the context (only tokens that are never emitted) are clamped to its last one."""
    return positions.clamp(max=model.cfg.max_seq_len - 1)


def tidar_step_inputs(drafts, start, mask_id):
    """tokens, positions [B_rows, B(1+B)] and groups [1, B(1+B)] of a step: [d_0..d_{B-1} | M^(0) .. M^(B-1)]
    at positions [L..L+B-1 | for j: L+j+1..L+j+B] (L = `start`, d_0's position), groups [0 x B | for j: j+1 x B]."""
    B = drafts.shape[1]
    i = torch.arange(B, device=drafts.device)
    tokens = torch.cat([drafts, torch.full((len(drafts), B * B), mask_id, device=drafts.device)], dim=1)
    mask_positions = (start[:, None, None] + i[:, None] + 1 + i).flatten(1)  # [j, k]: L + j + 1 + k
    positions = torch.cat([start[:, None] + i, mask_positions], dim=1)
    groups = torch.cat([torch.zeros_like(i), (1 + i).repeat_interleave(B)])[None]
    return tokens, positions, groups


def tidar_step(model, cache, drafts, pad, active, beta, process, temperature, seen, generator):
    """One forward on the block d_0..d_{B-1} (d_0 committed, its KV not yet written) and B mask blocks.
    Commits d_0..d_n of the active rows (the cache step rolls back past the rejected drafts) and
    returns n [B_rows] and the next block: d'_0 = y_n, d'_k = argmax P^(n)_k."""
    B_rows, B = drafts.shape
    step = cache.step
    tokens, positions, groups = tidar_step_inputs(drafts, step - pad, mask_token_id(model.cfg))
    logits = model(tokens, in_context(model, positions), groups, cache=cache, write=B).float()
    ar, diffusion = logits[:, :B], logits[:, B:].view(B_rows, B, B, -1)  # a_j; P^(j)_k
    targets = beta * ar + (1 - beta) * diffusion[:, :, 0]  # t_j predicts position L + j + 1
    seen_j = seen[:, None] | F.one_hot(drafts, seen.shape[-1]).cumsum(1).bool()  # plus d_0..d_j
    processed = process(targets.flatten(0, 1), seen_j.flatten(0, 1)).view(B_rows, B, -1)
    n, y = accept(processed, drafts, temperature, generator)
    cache.step = torch.where(active, step + n + 1, step)
    rows = torch.arange(B_rows, device=drafts.device)
    return n, torch.cat([y[:, None], never_sampled(model.cfg, diffusion[rows, n, 1:]).argmax(-1)], dim=1)


def accept(processed, drafts, temperature, generator):
    """n [B_rows], the accepted drafts (0..B-1), and y_n, from the processed targets t_j [B_rows, B, V].
    Greedy: y_j = argmax t_j, d_{j+1} accepted iff it equals y_j. Sampling (p_j = softmax t_j; exact
    for one-hot drafts): d_{j+1} accepted with probability p_j(d_{j+1}); at the first rejection j,
    y_j is drawn from p_j without d_{j+1}, renormalised; after B - 1 acceptances, from p_{B-1}."""
    B_rows, B, _ = processed.shape
    rows = torch.arange(B_rows, device=drafts.device)
    if temperature == 0:
        y = processed.argmax(-1)
        n = (drafts[:, 1:] == y[:, :-1]).long().cumprod(1).sum(1)
        return n, y[rows, n]
    p = processed.softmax(-1)
    p_draft = p[:, :-1].gather(-1, drafts[:, 1:, None])[..., 0]  # p_j(d_{j+1})
    u = torch.rand(p_draft.shape, generator=generator, device=p.device)
    n = (u < p_draft).long().cumprod(1).sum(1)
    p_n, rejected = p[rows, n], drafts[rows, (n + 1).clamp(max=B - 1)]  # d_{n+1}, where n < B - 1
    residual = torch.where((n < B - 1)[:, None], p_n.scatter(-1, rejected[:, None], 0.0), p_n)
    return n, torch.multinomial(residual, 1, generator=generator)[:, 0]


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
