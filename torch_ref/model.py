"""The jaxllm model family in plain PyTorch: small, readable, the numerical reference.

`Transformer(cfg)` takes the *model* section of a resolved jaxllm config as a nested dict (or
namespace): the YAML presets in configs/, with every derived field filled in. Parameter names and
the module tree are jaxllm's; only the layout differs: nn.Linear stores [out, in] where jaxllm
stores [in..., out...] (e.g. q_proj [D, N, H] there, [N*H, D] here).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torch_ref.layers import MLP, Attention, causal_mask, make_norm, namespace
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

    def forward(self, x, positions, mask=None, router_noise=None, cache=None):
        """router_noise [B, T, E]: the noisy router's N(0, 1) draw in training, for an MoE layer.
        cache: this layer's attention cache (decoding)."""
        x = self.residual(x, self.attn(x if self.attn_norm is None else self.attn_norm(x), positions, mask, cache))
        h = x if self.mlp_norm is None else self.mlp_norm(x)
        return self.residual(x, self.mlp(h, router_noise) if self.is_moe else self.mlp(h))


class RecursiveBlock(nn.Module):
    """Loops the core layers (shared weights) on a state with input injection: `loop` runs
    s = core(inject(s, e)) n_loops times; `trm` runs n_loops cycles of n_latent_steps updates
    z = core(inject(y + z, e)) then y = core(y + z), and returns y. The first n_loops - n_grad_loops
    loops run under torch.no_grad(). It owns the concat adapter and the fixed random initial states;
    the core layers are the model's and are passed in."""

    def __init__(self, cfg):
        super().__init__()
        self.r = r = cfg.recursion
        self.n_grad_loops = r.n_loops if r.n_grad_loops is None else r.n_grad_loops
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False) if r.inject == "concat" else None
        if r.init == "random":
            self.register_buffer("init_state", cfg.init_std * torch.randn(2 if r.mode == "trm" else 1, cfg.d_model))
        self.aux_loss = None

    def inject(self, s, e):
        return s + e if self.adapter is None else self.adapter(torch.cat([s, e], dim=-1))

    def forward(self, core, e, positions, mask):
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
        self.aux_loss, loads = 0.0, {}

        def run(x):  # the core once; its MoE aux losses and expert loads add up over the loops
            for block in core:
                x = block(x, positions, mask)
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


def tidar_mask(s, block_size, window=None):
    """[2S, 2S] booleans for TiDAR's doubled sequence [x_0..x_{S-1} | M x S] (papers.md §1.2).
    Clean query q: clean keys k <= q. Mask query for position j, block b = j // block_size: clean
    keys k < b * block_size and the mask tokens of block b. A window limits clean keys to j - k < W."""
    mask = torch.zeros(2 * s, 2 * s, dtype=torch.bool)
    mask[:s, :s] = causal_mask(s, window)
    for j in range(s):
        start = j // block_size * block_size
        mask[s + j, s + start:s + min(start + block_size, s)] = True
        first = 0 if window is None else max(0, j - window + 1)
        mask[s + j, first:start] = True
    return mask


class Cache:
    """A decoding cache for the whole model, updated in place by each forward that is given it: one
    LayerCache per layer (keys and values, or MLA's latents) and `positions` [B, S], the token
    position held in each slot (-1: empty or padding), which the caller keeps to build its masks."""

    def __init__(self, model, batch, size, dtype=torch.float32):
        if model.recursion is not None:
            raise ValueError(f"the KV cache does not support model.recursion.mode={model.cfg.recursion.mode!r} yet")
        device = model.embed_tokens.weight.device
        self.positions = torch.full((batch, size), -1, dtype=torch.long, device=device)
        self.layers = [block.attn.init_cache(batch, size, dtype, device) for block in model.layers]

    @property
    def step(self):
        """Time steps written so far; the next one goes to slot step % S."""
        return self.layers[0].step


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

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, tokens, positions=None, mask=None, router_noise=None, cache=None):
        """tokens [B, T] -> logits [B, T, V]; mask [B or 1, T, S] replaces the causal pattern;
        router_noise [B, T, E]: in training, the noisy router's draw in every MoE layer (parity
        tests; not with recursion). cache: a Cache, read and updated in place (decoding: the prefill,
        then each step with its mask over the cache's slots; not with recursion)."""
        cfg = self.cfg
        for moe in self.moe_layers():  # what this forward records: a layer LayerDrop skips has none
            moe.aux_loss = moe.expert_load = None
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        x = self.dropout(x)
        if self.recursion is None:
            x = self.run_layers(self.layers, x, positions, mask, router_noise, cache)
        else:  # prelude, the looped core, coda
            assert router_noise is None, "router_noise is not supported with recursion"
            p, c = cfg.recursion.n_prelude, cfg.recursion.n_core
            e = self.run_layers(self.layers[:p], x, positions, mask)
            x = self.recursion(self.layers[p:p + c], e, positions, mask)
            x = self.run_layers(self.layers[p + c:], x, positions, mask)
        x = self.final_norm(x)
        logits = x @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(x)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        return logits

    def layerdrop_keep(self, n):
        """LayerDrop: which of n layers run in this training forward (each skipped with probability model.layerdrop)."""
        return (torch.rand(n) >= self.cfg.layerdrop).tolist()

    def run_layers(self, layers, x, positions, mask, router_noise=None, cache=None):
        keep = self.layerdrop_keep(len(layers)) if self.training and self.cfg.layerdrop > 0 else [True] * len(layers)
        caches = [None] * len(layers) if cache is None else cache.layers
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
        positions = torch.arange(S, device=tokens.device).repeat(2).expand(B, 2 * S)
        mask = tidar_mask(S, d.block_size, self.cfg.attention.window).to(tokens.device)
        logits = self(doubled, positions, mask[None])
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
