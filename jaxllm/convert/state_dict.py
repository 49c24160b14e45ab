"""jaxllm parameters <-> torch_ref state_dicts (numpy arrays keyed like `model.state_dict()`).

Both sides use the same names and tree, so conversion is a per-key layout change only: a jaxllm
projection weight is [in..., out...] (q_proj [D, N, H], o_proj [N, H, D]), while nn.Linear stores
[out, in] with each side flattened; projection biases are flattened too. Everything else
(embeddings, norms, ReZero scalars, the LM-head bias) has the same layout on both sides.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.errors import ConversionError
from jaxllm.files import atomic_path
from jaxllm.model.params import Buffer
from jaxllm.model.transformer import abstract_model

# Projection name -> how many leading dims of the jaxllm weight are input dims.
LINEAR_IN_DIMS = {
    "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1, "lm_head": 1,
    # Multi-head Latent Attention, DeepSeek names (HF) and the seed-004 names
    "q_a_proj": 1, "q_b_proj": 1, "kv_a_proj_with_mqa": 1, "kv_b_proj": 1,
    "q_proj_d": 1, "q_proj_u": 1, "kv_proj_d": 1, "k_proj_u": 1, "v_proj_u": 1, "rope_q": 1, "rope_k": 1,
    # Mixture-of-Experts
    "router": 1, "noise_proj": 1, "shared_mlp_gate": 1,
    # RecursiveBlock: the concat-injection adapter Linear(2D -> D)
    "adapter": 1,
    # TRM's halting head Linear(D -> 1) (its sequence mixer mlp_t reuses the MLP names)
    "q_head": 1,
}
# Stacked routed-expert weights `...experts.<name>`: jaxllm [E, in, out], torch_ref [E, out, in].
EXPERTS = "experts"


def _linear(key: str) -> tuple[str, str] | None:
    """('q_proj', 'weight') for 'layers.0.attn.q_proj.weight'; None for non-projection tensors."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in LINEAR_IN_DIMS and parts[-1] in ("weight", "bias"):
        return parts[-2], parts[-1]
    return None


def _stacked_expert(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] == EXPERTS


def _lora(key: str) -> str | None:
    """'lora_a' / 'lora_b' for a LoRA adapter ('...q_proj.lora_a'): jaxllm A [in..., r] and
    B [r, out...]; torch_ref (and PEFT) A [r, in] and B [out, r]."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if leaf in ("lora_a", "lora_b") else None


def torch_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch_ref shape of the jaxllm tensor `key` of `shape`."""
    if (lora := _lora(key)) is not None:
        return (shape[-1], math.prod(shape[:-1])) if lora == "lora_a" else (math.prod(shape[1:]), shape[0])
    if _stacked_expert(key):
        return (*shape[:-2], shape[-1], shape[-2])
    linear = _linear(key)
    if linear is None:
        return tuple(shape)
    name, leaf = linear
    if leaf == "bias":
        return (math.prod(shape),)
    n_in = LINEAR_IN_DIMS[name]
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_torch_layout(key: str, a: np.ndarray) -> np.ndarray:
    if _lora(key) is not None:  # A [in..., r] -> [r, in]; B [r, out...] -> [out, r]
        shape = torch_shape(key, a.shape)
        return np.array(a.reshape(shape[1], shape[0]).T, order="C")
    if _stacked_expert(key):
        return np.array(np.swapaxes(a, -1, -2), order="C")
    shape = torch_shape(key, a.shape)
    linear = _linear(key)
    if linear is not None and linear[1] == "weight":
        a = a.reshape(shape[1], shape[0]).T
    return np.array(a.reshape(shape), order="C")  # a C-contiguous copy (ascontiguousarray makes 0-d 1-d)


def from_torch_layout(key: str, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if _lora(key) is not None:
        return np.array(t.T, order="C").reshape(shape)
    if _stacked_expert(key):
        return np.array(np.swapaxes(t, -1, -2), order="C")
    linear = _linear(key)
    if linear is not None and linear[1] == "weight":
        return np.array(t.T, order="C").reshape(shape)
    return t.reshape(shape)


def _params(model_or_state) -> dict[str, nnx.Variable]:
    """Parameters and buffers (persistent non-trained state, e.g. the V3 router bias) by key."""
    state = (model_or_state if isinstance(model_or_state, nnx.State)
             else nnx.state(model_or_state, nnx.Any(nnx.Param, Buffer)))
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def to_state_dict(model_or_state) -> dict[str, np.ndarray]:
    """A jaxllm model (or its Param state, or a gradient state) as a torch_ref state_dict of numpy arrays."""
    return {key: to_torch_layout(key, np.asarray(var[...])) for key, var in _params(model_or_state).items()}


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; jaxllm's core does not import torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _checked_values(params: dict[str, nnx.Variable], state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The values of `state_dict` in jaxllm layout, by key; every key must match `params` in name and shape."""
    missing = [key for key in params if key not in state_dict]
    if missing:
        raise ConversionError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    extra = [key for key in state_dict if key not in params]
    if extra:
        raise ConversionError(f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all); "
                              "the model config does not have it")
    values = {}
    for key, var in params.items():
        t = _as_numpy(state_dict[key])
        expected = torch_shape(key, var.shape)
        if tuple(t.shape) != expected:
            raise ConversionError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {expected}")
        values[key] = from_torch_layout(key, t, var.shape)
    return values


def from_state_dict(model, state_dict: Mapping[str, object]) -> None:
    """Load a torch_ref state_dict into `model` in place; every key must match in name and shape."""
    params = _params(model)
    values = _checked_values(params, state_dict)  # all checked before anything is written
    for key, var in params.items():
        var[...] = jnp.asarray(values[key], dtype=var.dtype)


def state_dict_shapes(model) -> dict[str, tuple[int, ...]]:
    """The torch_ref state_dict keys and shapes of `model` (concrete or `abstract_model`)."""
    return {key: torch_shape(key, var.shape) for key, var in _params(model).items()}


def materialize(abstract, state_dict: Mapping[str, object], seed: int = 0):
    """A concrete model from `abstract_model(...)`: its parameters and buffers from `state_dict`
    (checked as `from_state_dict` does), each RNG stream its own key derived from `seed` with
    count 0, every other variable (running statistics such as ExpertLoad) zero, as a fresh init
    sets it. The variables of `abstract` are filled in place."""
    values = _checked_values(_params(abstract), state_dict)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    root = jax.random.key(seed)
    for i, (path, var) in enumerate(flat):
        key = ".".join(str(p) for p in path)
        if key in values:
            value = jnp.asarray(values[key], dtype=var.dtype)
        elif isinstance(var, nnx.RngKey):
            value = jax.random.fold_in(root, i)
            value = jax.random.split(value, var.shape) if var.shape else value
        else:
            value = jnp.zeros(var.shape, var.dtype)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_from_state_dict(state_dict: Mapping[str, object], model_cfg, seed: int = 0):
    """A jaxllm model of `model_cfg` holding `state_dict`, built abstractly (`abstract_model` +
    `materialize`): no random init is drawn and thrown away. `seed` seeds its RNG streams
    (dropout, LayerDrop, the noisy router, random loop counts)."""
    return materialize(abstract_model(model_cfg, seed), state_dict, seed)


def save_safetensors(path: str | Path, model, config: Mapping | None = None) -> None:
    """Write the torch_ref state_dict of `model` (and its config as JSON metadata) to `path`,
    atomically: a temporary file renamed into place."""
    from safetensors.numpy import save_file

    path = Path(path)
    metadata = {"format": "pt"}
    if config is not None:
        metadata["jaxllm_config"] = json.dumps(config)
    with atomic_path(path) as tmp:
        save_file(to_state_dict(model), str(tmp), metadata=metadata)


def load_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """(state_dict, config or None) from a safetensors file written by `save_safetensors`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"weights file {str(path)!r} is not a readable safetensors file: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    config = json.loads(metadata["jaxllm_config"]) if "jaxllm_config" in metadata else None
    return tensors, config


def merge_lora(model):
    """The same function without adapters: each adapted projection's weight becomes
    W + (alpha / r) B A (torch layout [out, in]), and the config's model.lora is reset. A model
    without adapters is returned as it is."""
    import dataclasses

    from jaxllm.config import LoRAConfig

    lora = model.cfg.lora
    if not lora.rank:
        return model
    sd = to_state_dict(model)
    scale = lora.alpha / lora.rank
    for key in [k for k in sd if k.endswith(".lora_a")]:
        stem = key.removesuffix(".lora_a")
        a, b = sd.pop(key).astype(np.float64), sd.pop(stem + ".lora_b").astype(np.float64)
        weight = sd[stem + ".weight"]
        sd[stem + ".weight"] = (weight.astype(np.float64) + scale * (b @ a)).astype(weight.dtype)
    return model_from_state_dict(sd, dataclasses.replace(model.cfg, lora=LoRAConfig()))
