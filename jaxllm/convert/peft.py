"""LoRA adapters alone, in Hugging Face PEFT's layout: a directory with `adapter_config.json` and
`adapter_model.safetensors` whose keys are `base_model.model.<HF module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] (the torch_ref layout of jaxllm's `lora_a` / `lora_b`), so that
`peft.PeftModel.from_pretrained(hf_base, DIR)` applies them to the exported base model, and
`load_peft` applies PEFT adapters (trained by either side) to a jaxllm model.

Families whose attention is one fused tensor in Hugging Face (GPT-2's c_attn) have no per-projection
module for q/k/v adapters: refused by name.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxllm.errors import ConversionError
from jaxllm.files import atomic_dir

PREFIX = "base_model.model."
SUFFIX = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}


def _hf_module(key: str, family: str) -> str:
    """The HF module of a torch_ref adapter key ('layers.0.attn.q_proj.lora_a' -> 'model.layers.0.self_attn.q_proj')."""
    from jaxllm.convert.hf import _family

    spec = _family(family)
    stem = key.rsplit(".", 1)[0]
    if spec.fused_qkv:
        raise ConversionError(f"{family} stores attention as one fused tensor: PEFT adapters on {stem} have no module")
    return spec.hf_name(stem + ".weight").removesuffix(".weight")


def save_peft(path: str | Path, model, family: str | None = None) -> None:
    """Write `model`'s LoRA adapters (model.lora.rank > 0) as a PEFT adapter directory."""
    from safetensors.numpy import save_file

    from jaxllm.convert.hf import check_exportable, infer_family
    from jaxllm.convert.state_dict import to_state_dict

    lora = model.cfg.lora
    if not lora.rank:
        raise ConversionError("the model has no LoRA adapters (model.lora.rank is 0): nothing to write as PEFT")
    base_cfg = dataclasses.replace(model.cfg, lora=dataclasses.replace(lora, rank=0))
    family = family or infer_family(base_cfg)
    check_exportable(base_cfg, family)
    tensors, modules = {}, set()
    for key, value in to_state_dict(model).items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in SUFFIX:
            module = _hf_module(key, family)
            modules.add(module.rsplit(".", 1)[-1])
            tensors[f"{PREFIX}{module}.{SUFFIX[leaf]}"] = np.ascontiguousarray(value, np.float32)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": None, "modules_to_save": None,
              "use_rslora": False, "init_lora_weights": True}
    if Path(path).exists():
        raise ConversionError(f"output {str(path)!r} already exists; choose a new path")
    with atomic_dir(path) as tmp:  # built under a temporary name, renamed into place
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_peft(path: str | Path, base, family: str | None = None):
    """`base` (a jaxllm model without adapters) with the PEFT adapters of directory `path` applied:
    a new model whose model.lora has the adapters' rank, alpha and target modules."""
    from flax import nnx
    from safetensors.numpy import load_file

    from jaxllm.config import LoRAConfig
    from jaxllm.convert.hf import infer_family
    from jaxllm.convert.state_dict import model_from_state_dict, to_state_dict

    path = Path(path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{str(path)!r} is not a PEFT adapter directory (adapter_config.json + "
                              f"adapter_model.safetensors): {e}") from None
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ConversionError(f"{str(path)!r}: only plain LoRA adapters load (peft_type LORA, no rsLoRA / DoRA)")
    family = family or infer_family(base.cfg)
    modules = config["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    lora = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      targets=tuple(f"layers.*.{m}" for m in modules))
    cfg = dataclasses.replace(base.cfg, lora=lora)
    from jaxllm.model.transformer import abstract_model

    expected = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))]
    state_dict = to_state_dict(base)
    for key in expected:
        leaf = key.rsplit(".", 1)[-1]
        if leaf not in SUFFIX:
            continue
        name = f"{PREFIX}{_hf_module(key, family)}.{SUFFIX[leaf]}"
        if name not in tensors:
            raise ConversionError(f"{str(path)!r} lacks the adapter tensor {name!r}")
        state_dict[key] = tensors.pop(name)
    if tensors:
        raise ConversionError(f"{str(path)!r} has adapters for modules this model lacks, e.g. {next(iter(tensors))!r}")
    return model_from_state_dict(state_dict, cfg)
