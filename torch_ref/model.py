"""The jaxllm model family in plain PyTorch: small, readable, the numerical reference.

`Transformer(cfg)` takes the *model* section of a resolved jaxllm config as a nested dict (or
namespace): the YAML presets in configs/, with every derived field filled in. Parameter names and
the module tree are jaxllm's; only the layout differs: nn.Linear stores [out, in] where jaxllm
stores [in..., out...] (e.g. q_proj [D, N, H] there, [N*H, D] here).
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torch_ref.layers import MLP, Attention, LayerCache, add_lora, causal_mask, make_norm, namespace, visible, write_cache
from torch_ref.mla import MultiHeadLatentAttention
from torch_ref.moe import MoE


def is_moe_layer(cfg, layer):
    moe = cfg.moe
    return moe.n_routed_experts > 0 and layer >= moe.first_k_dense and (layer - moe.first_k_dense) % moe.moe_every == 0


def make_attention(cfg):
    if cfg.attention.kind == "mla":
        return MultiHeadLatentAttention(cfg)
    return Attention(cfg)


def make_mlp(cfg, layer):
    if is_moe_layer(cfg, layer):
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
        self.is_moe = is_moe_layer(cfg, layer)
        self.rezero_alpha = nn.Parameter(torch.zeros(())) if cfg.rezero else None
        self.dropout = nn.Dropout(cfg.dropout)

    def residual(self, x, f_x):
        f_x = self.dropout(f_x)
        if self.rezero_alpha is not None:
            f_x = self.rezero_alpha * f_x
        return x + f_x

    def forward(self, x, positions, mask, router_noise=None, cache=None):
        """mask [B or 1, T, S]; router_noise [B, T, E]: the noisy router's N(0, 1) draw in training,
        for an MoE layer. cache: this layer's LayerCache (decoding)."""
        x = self.residual(x, self.attn(x if self.attn_norm is None else self.attn_norm(x), positions, mask, cache))
        h = x if self.mlp_norm is None else self.mlp_norm(x)
        return self.residual(x, self.mlp(h, router_noise) if self.is_moe else self.mlp(h))


def at(caches, i):
    """Each layer's cache of application i (None without a cache)."""
    return [None if layer_caches is None else layer_caches[i] for layer_caches in caches]


class RecursiveBlock(nn.Module):
    """Loops the core layers (shared weights) on a state with input injection: `loop` runs
    s = core(inject(s, e)) n_loops times; `trm` runs n_loops cycles of n_latent_steps updates
    z = core(inject(y + z, e)) then y = core(y + z), and returns y. The first n_loops - n_grad_loops
    loops run under torch.no_grad(). It owns the concat adapter and the fixed random initial states;
    the core layers are the model's and are passed in. Each of the `applications` core runs of a
    forward (n_loops * (n_latent_steps + 1) for trm) has its own cache of each core layer."""

    def __init__(self, cfg):
        super().__init__()
        self.r = r = cfg.recursion
        self.n_grad_loops = r.n_loops if r.n_grad_loops is None else r.n_grad_loops
        self.applications = r.n_loops * (r.n_latent_steps + 1 if r.mode == "trm" else 1)
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False) if r.inject == "concat" else None
        if r.init == "random":
            self.register_buffer("init_state", cfg.init_std * torch.randn(2 if r.mode == "trm" else 1, cfg.d_model))
        self.aux_loss = None

    def inject(self, s, e):
        return s + e if self.adapter is None else self.adapter(torch.cat([s, e], dim=-1))

    def forward(self, core, e, positions, mask, caches):
        """caches: per core layer None, or its list of LayerCaches, one per application."""
        r = self.r
        loops, grad_loops = r.n_loops, self.n_grad_loops
        if self.training and r.random_loops:  # Huginn: Poisson(LogNormal(ln n - 1/8, 1/2)) + 1
            rate = torch.exp(torch.log(torch.tensor(float(r.n_loops))) - 0.125 + 0.5 * torch.randn(()))
            loops = int(torch.poisson(rate)) + 1
            grad_loops = min(loops, self.n_grad_loops)
        n_states = 2 if r.mode == "trm" else 1
        if r.init == "random":
            state = [self.init_state[i].expand_as(e) for i in range(n_states)]
        else:
            state = [e if r.init == "embedding" else torch.zeros_like(e)] * n_states
        self.aux_loss, loads, application = 0.0, {}, itertools.count()

        def run(x):  # the core once; its MoE aux losses and expert loads add up over the loops
            for block, cache in zip(core, at(caches, next(application))):
                x = block(x, positions, mask, cache=cache)
            for m in core.modules():
                if getattr(m, "aux_loss", None) is not None:
                    self.aux_loss, m.aux_loss = self.aux_loss + m.aux_loss, None
                if getattr(m, "expert_load", None) is not None:
                    loads[m], m.expert_load = loads.get(m, 0) + m.expert_load, None
            return x

        def one_loop(state):
            if r.mode == "loop":
                return [run(self.inject(state[0], e))]
            y, z = state
            for _ in range(r.n_latent_steps):
                z = run(self.inject(y + z, e))
            return [run(y + z), z]

        with torch.no_grad():
            for _ in range(loops - grad_loops):
                state = one_loop(state)
        for _ in range(grad_loops):
            state = one_loop(state)
        for m, load in loads.items():
            m.expert_load = load  # every loop's tokens, for update_router_bias
        return state[0]


def mask_token_id(cfg):
    """TiDAR's reserved [MASK] id: diffusion.mask_token_id, or the last id."""
    d = cfg.diffusion
    return cfg.vocab_size - 1 if d.mask_token_id is None else d.mask_token_id


def tidar_metadata(s, block_size):
    """Positions and groups [2S] of TiDAR's doubled sequence [x_0..x_{S-1} | M x S] (papers.md §1.2):
    each mask at its clean token's position; mask j in block 1 + j // block_size."""
    positions = torch.arange(s).repeat(2)
    groups = torch.cat([torch.zeros(s, dtype=torch.long), 1 + torch.arange(s) // block_size])
    return positions, groups


def tidar_mask(s, block_size, window=None):
    """[2S, 2S]: the mask rule on the doubled sequence. Clean query q: clean keys k <= q; mask query j
    of block b: clean keys before the block's first position and the whole block; a window limits
    clean keys to j - k < W."""
    positions, groups = (t[None] for t in tidar_metadata(s, block_size))
    return visible(positions, groups, positions, groups, window)[0]


class Cache:
    """The decoding cache of the whole model (docs/sampling.md, "Caches and the loop"): each attention layer's
    buffers (init_cache; a core layer of a recursive model has R, one per application of the
    core), `positions` [B, S] (the token position in each slot; -1: empty or padding) and `step`
    [B] (per row, the time step of the next write; time step t lives in slot t % S). Rollback is
    setting `step` back."""

    def __init__(self, model, batch, size, dtype=torch.float32):
        device = model.embed_tokens.weight.device
        self.positions = torch.full((batch, size), -1, dtype=torch.long, device=device)
        self.step = torch.zeros(batch, dtype=torch.long, device=device)
        r = model.cfg.recursion
        core = range(r.n_prelude, r.n_prelude + r.n_core) if model.recursion is not None else ()
        self.layers = [[block.attn.init_cache(batch, size, dtype, device)
                        for _ in range(model.recursion.applications if i in core else 1)]
                       for i, block in enumerate(model.layers)]

    def begin(self, positions, groups, write):
        """Start a forward of new tokens (positions [B, T], groups [B or 1, T]) that writes its first
        `write`: their positions go to time steps step.. and step advances by `write`. Returns the
        keys' positions and groups (the new tokens themselves in a prefill, when the cache is
        empty; else every slot, group 0, then the unwritten new tokens) and per layer its list of
        LayerCaches."""
        prefill = not bool(self.step.any())
        write_cache(self.positions, positions[:, :write], self.step)
        layers = [[LayerCache(buffers, self.step, write, prefill) for buffers in layer] for layer in self.layers]
        self.step = self.step + write
        if prefill:
            return positions, groups, layers
        k_pos = torch.cat([self.positions, positions[:, write:]], dim=1)
        k_group = torch.cat([torch.zeros_like(self.positions), groups[:, write:].expand(len(k_pos), -1)], dim=1)
        return k_pos, k_group, layers


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg = namespace(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position.kind == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.recursion = RecursiveBlock(cfg) if cfg.recursion.mode != "none" else None
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.lm_head_bias else None
        self.apply(self._init_weights)
        lora = getattr(cfg, "lora", None)
        if lora is not None and lora.rank:
            add_lora(self, lora)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, tokens, positions=None, groups=None, router_noise=None, cache=None, write=None):
        """tokens [B, T] -> logits [B, T, V]. positions [B, T] (-1: left padding; default 0..T-1),
        groups [B or 1, T] (0: causal, g >= 1: TiDAR mask block g; default 0): the mask is the rule
        of layers.visible, built once here for every layer; with none of them nor a cache, the
        causal sliding window (training). router_noise [B, T, E]: in training, the noisy router's
        draw in every MoE layer (parity tests; not with recursion). cache: a Cache, written in
        place: the first `write` new tokens (default all) at each row's step (Cache.begin)."""
        cfg = self.cfg
        B, T = tokens.shape
        for moe in self.moe_layers():  # what this forward records: a layer LayerDrop skips has none
            moe.aux_loss = moe.expert_load = None
        caches = [None] * len(self.layers)
        if positions is None and groups is None and cache is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            mask = causal_mask(T, cfg.attention.window).to(tokens.device)[None]
        else:
            if positions is None:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
            if groups is None:
                groups = torch.zeros(1, T, dtype=torch.long, device=tokens.device)
            k_pos, k_group = positions, groups
            if cache is not None:
                k_pos, k_group, caches = cache.begin(positions, groups, T if write is None else write)
            mask = visible(positions, groups, k_pos, k_group, cfg.attention.window)
            positions = positions.clamp(min=0)
        x = self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        x = self.dropout(x)
        if self.recursion is None:
            x = self.run_layers(self.layers, x, positions, mask, at(caches, 0), router_noise)
        else:  # prelude, the looped core, coda
            assert router_noise is None, "router_noise is not supported with recursion"
            p, c = cfg.recursion.n_prelude, cfg.recursion.n_core
            e = self.run_layers(self.layers[:p], x, positions, mask, at(caches[:p], 0))
            x = self.recursion(self.layers[p:p + c], e, positions, mask, caches[p:p + c])
            x = self.run_layers(self.layers[p + c:], x, positions, mask, at(caches[p + c:], 0))
        x = self.final_norm(x)
        logits = x @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(x)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        return logits

    def layerdrop_keep(self, n):
        """LayerDrop: which of n layers run in this training forward (each skipped with probability model.layerdrop)."""
        return (torch.rand(n) >= self.cfg.layerdrop).tolist()

    def run_layers(self, layers, x, positions, mask, caches, router_noise=None):
        """caches: per layer its LayerCache (or None)."""
        keep = self.layerdrop_keep(len(layers)) if self.training and self.cfg.layerdrop > 0 else [True] * len(layers)
        for block, kept, layer_cache in zip(layers, keep, caches):
            if not kept:
                continue  # LayerDrop: skip the whole layer
            if self.training and self.cfg.remat:
                x = checkpoint(block, x, positions, mask, router_noise, layer_cache, use_reentrant=False)
            else:
                x = block(x, positions, mask, router_noise, layer_cache)
        return x

    def tidar_forward(self, tokens):
        """TiDAR: one forward on [tokens | MASK x S] (mask copies at their clean token's position)
        -> (clean-half logits, mask-half logits)."""
        d = self.cfg.diffusion
        B, S = tokens.shape
        doubled = torch.cat([tokens, torch.full_like(tokens, mask_token_id(self.cfg))], dim=1)
        positions, groups = (t.to(tokens.device)[None] for t in tidar_metadata(S, d.block_size))
        logits = self(doubled, positions.expand(B, 2 * S), groups)
        return logits[:, :S], logits[:, S:]

    def tidar_losses(self, tokens, targets):
        """(combined, AR, diffusion): (alpha * AR + diffusion) / (1 + alpha), diffusion labels unshifted."""
        clean, masked = self.tidar_forward(tokens)
        ar = F.cross_entropy(clean.flatten(0, 1), targets.flatten())
        diffusion = F.cross_entropy(masked.flatten(0, 1), tokens.flatten())
        alpha = self.cfg.diffusion.alpha
        return (alpha * ar + diffusion) / (1 + alpha), ar, diffusion

    def loss(self, tokens, targets, router_noise=None):
        """The training loss (next-token, or TiDAR's when diffusion is on) plus every auxiliary loss
        the layers recorded in this forward (in training mode only)."""
        if self.cfg.diffusion.enabled:
            assert router_noise is None, "router_noise is not supported with diffusion"
            loss = self.tidar_losses(tokens, targets)[0]
        else:
            loss = F.cross_entropy(self(tokens, router_noise=router_noise).flatten(0, 1), targets.flatten())
        aux = sum(m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None)
        return loss + aux

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
