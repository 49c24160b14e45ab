"""Fine-tuning from existing weights (`train.py --init-from PATH`, `train.init_from`).

PATH is anything `jaxllm convert` reads: a Hugging Face directory, a GGUF file, torch_ref
safetensors (with its config in the metadata), a jaxllm model directory, or a jaxllm run directory
(its latest checkpoint). The model config comes from the weights; model.* overrides may change
how the model runs (dropout, dtype, remat, attention kernel, ...) but not any parameter's shape,
and train.* comes from --config and the overrides as usual. The tokenizer defaults to the one that
came with the weights (a tokenizer.json beside them).
"""
from __future__ import annotations

from pathlib import Path

from jaxllm.config import Config, config_from_dict, load_config, to_dict
from jaxllm.errors import ConfigError


def read_weights(path: str):
    """(jaxllm model, the directory its tokenizer files are in or None); a missing or unreadable
    path is a one-line ConversionError."""
    from jaxllm.convert.cli import read_source

    return read_source(Path(path), None)


def param_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    from flax import nnx

    from jaxllm.model.transformer import abstract_model

    state = nnx.state(abstract_model(model_cfg), nnx.Param)
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def first_shape_change(source_cfg, model_cfg) -> str | None:
    """The first parameter whose shape differs (LoRA adapters the weights lack are new, not changed)."""
    a, b = param_shapes(source_cfg), param_shapes(model_cfg)
    for key in sorted(a.keys() | b.keys()):
        if key not in a and key.endswith((".lora_a", ".lora_b")):
            continue
        if a.get(key) != b.get(key):
            return f"parameter {key} {a.get(key) or 'absent'} in the weights, {b.get(key) or 'absent'} with the overrides"
    return None


def config_from_weights(config_path: str | None, overrides: list[str], init_from: str):
    """(the run's Config, the loaded source model): the model section from the weights with the
    model.* overrides applied (a shape-changing one is a one-line ConfigError), train.* from the
    preset and the overrides, train.init_from set, and train.tokenizer the weights' own
    tokenizer.json when the preset asks for a new char / BPE one."""
    source, tokenizer_dir = read_weights(init_from)
    model_overrides = [o for o in overrides if o.startswith("model.")]
    base = load_config(config_path, [o for o in overrides if not o.startswith("model.")]
                       + [f"train.init_from={init_from}"])
    train = to_dict(base.train)
    given = tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file()
    if train["tokenizer"] in ("char", "bpe") and given:
        train["tokenizer"] = str(Path(tokenizer_dir) / "tokenizer.json")
    cfg = config_from_dict({"model": to_dict(source.cfg), "train": train}, model_overrides)
    if (change := first_shape_change(source.cfg, cfg.model)) is not None:
        raise ConfigError(f"{' '.join(model_overrides)}: changes a shape of the weights of {init_from!r} ({change}); "
                          f"with --init-from the model comes from the weights, and only overrides that keep "
                          f"every shape (dropout, dtype, remat, LoRA adapters, ...) are allowed")
    return cfg, source


def load_weights(cfg: Config):
    """The model of cfg.train.init_from, checked to have cfg.model's shapes."""
    source, _ = read_weights(cfg.train.init_from)
    if (change := first_shape_change(source.cfg, cfg.model)) is not None:
        raise ConfigError(f"train.init_from={cfg.train.init_from!r} does not fit model: {change}")
    return source
