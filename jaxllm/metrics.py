"""Training FLOPs and MFU, as DESIGN.md defines them (shared by the training loop and `bench`).

MFU = (6 * active non-embedding params + 12 * layers * width * seq) * tokens/s / peak, with
peak = 989e12 (H100 bf16 dense, not the 1979 sparsity figure). Embedding tables that are only
looked up (positions; tokens when the head is untied) are excluded; a tied table counts once, as
the LM head matmul. Active MoE params count top-k routed + shared experts.
"""
from __future__ import annotations

import math

PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def peak_flops(device) -> float | None:
    """bf16 dense peak of a device, or None where MFU is not meaningful (CPU)."""
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def flops_per_token(model_cfg, seq: int) -> float:
    """Training FLOPs per token: 6 * active non-embedding params + 12 * L * D * seq.

    A recursive model counts its core layers once per core call (n_loops, times n_latent_steps + 1
    for TRM) in both terms; TiDAR trains on a doubled sequence, so each clean token costs two
    positions of a 2 * seq sequence.
    """
    from flax import nnx

    from jaxllm.model.transformer import abstract_model

    abstract = abstract_model(model_cfg)
    moe, rec = model_cfg.moe, model_cfg.recursion
    core_calls = 1
    core_layers = range(0)
    if rec.mode != "none":
        core_calls = rec.n_loops * (rec.n_latent_steps + 1 if rec.mode == "trm" else 1)
        core_layers = range(rec.n_prelude, rec.n_prelude + rec.n_core)
    active = 0.0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = ".".join(map(str, path))
        n = math.prod(var.shape)
        if name.startswith("embed_positions") or (name.startswith("embed_tokens") and not model_cfg.tie_embeddings):
            continue
        if ".experts." in name and moe.n_routed_experts:
            n *= moe.num_experts_per_tok / moe.n_routed_experts
        if (name.startswith("layers.") and int(name.split(".")[1]) in core_layers) or name.startswith("recursion."):
            n *= core_calls
        active += n
    depth = model_cfg.n_layer + (core_calls - 1) * len(core_layers)
    if model_cfg.diffusion.enabled:
        return 2 * (6 * active + 12 * depth * model_cfg.d_model * 2 * seq)
    return 6 * active + 12 * depth * model_cfg.d_model * seq
