"""`jaxllm convert` / `python scripts/convert.py SRC DST --to jaxllm|torch|hf|gguf`.

    python scripts/convert.py runs/tiny-llama out/tiny-llama-hf --to hf
    python scripts/convert.py out/tiny-llama-hf tiny-llama.gguf --to gguf --dtype float16
    python scripts/convert.py weights.pt model.safetensors --to jaxllm --config configs/tiny-llama.yaml

Sources (found by what SRC is):
  a jaxllm run directory (config.yaml + checkpoints/): its latest checkpoint;
  a jaxllm model directory (config.yaml + model.safetensors), as written by --to jaxllm;
  a .safetensors file: jaxllm's own (config in its metadata) or a torch_ref state_dict (needs --config);
  a .pt / .pth file: a torch_ref state_dict saved with torch.save (needs --config);
  a Hugging Face directory (config.json + model.safetensors): gpt2, llama, mistral, mixtral, qwen2_moe, deepseek_v3;
  a .gguf file (architecture llama, F32/F16): Llama- and Mixtral-shaped models.
Targets:
  jaxllm  DST.safetensors (torch_ref state_dict + the config as metadata), or a directory DST with
          model.safetensors, config.yaml and the source's tokenizer.json;
  torch   DST.pt (torch.save of torch_ref's state_dict) or DST.safetensors (the same file as jaxllm's);
  hf      a directory for transformers.AutoModelForCausalLM.from_pretrained (--family, default: inferred);
  gguf    a llama.cpp file (--dtype float32 | float16);
  peft    a fine-tuned model's LoRA adapters alone, as a PEFT adapter directory (adapter_config.json +
          adapter_model.safetensors) for peft.PeftModel.from_pretrained on the --to hf export of its base.
Nothing is overwritten: DST must not exist; it is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path

from jaxllm.cli import ArgumentParser
from jaxllm.errors import ConversionError

TARGETS = ("jaxllm", "torch", "hf", "gguf", "peft")


def parser() -> ArgumentParser:
    from jaxllm.convert.hf import FAMILIES

    p = ArgumentParser(prog="convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source: run dir, model dir, .safetensors, .pt, Hugging Face dir or .gguf")
    p.add_argument("dst", help="destination path (must not exist)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target format")
    p.add_argument("--family", choices=FAMILIES, default=None,
                   help="--to hf / peft: the Hugging Face family (default: inferred from the config)")
    p.add_argument("--dtype", choices=("float32", "float16"), default=None, help="--to gguf: tensor type (default: float32)")
    p.add_argument("--config", default=None,
                   help="a jaxllm YAML config for sources without one (torch_ref .pt / .safetensors; default: none)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold a fine-tuned model's LoRA adapters into its weights (W + alpha/r B A); needed for "
                        "--to hf and --to gguf, which have no place for adapters (default: keep them)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (default: off)")
    return p


# ---------------------------------------------------------------------------------------------
# Sources


def _config_from(path: str | None, embedded: dict | None, src: Path):
    from jaxllm.config import config_from_dict, load_config

    if path is not None:
        return load_config(path).model
    if embedded is None:
        raise ConversionError(f"{str(src)!r} holds no jaxllm config: pass --config with the model's YAML")
    return config_from_dict({"model": embedded}).model


def _torch_state_dict(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a corrupt file
        raise ConversionError(f"{str(path)!r} is not a readable torch state_dict: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{str(path)!r} holds a {type(state).__name__}, expected a state_dict")
    return state


def read_source(src: Path, config: str | None):
    """(jaxllm model, directory holding the source's tokenizer files or None)."""
    from jaxllm.convert.gguf import load_gguf
    from jaxllm.convert.hf import load_hf
    from jaxllm.convert.state_dict import load_safetensors, model_from_state_dict

    if src.is_dir():
        if (src / "config.json").is_file():
            return load_hf(src)[0], src
        if (src / "config.yaml").is_file() and (src / "checkpoints").is_dir():
            from jaxllm.checkpoint import load_model

            return load_model(src)[0], src  # the parameters only, no optimizer state
        if (src / "config.yaml").is_file() and (src / "model.safetensors").is_file():
            from jaxllm.config import load_config

            state_dict, _ = load_safetensors(src / "model.safetensors")
            return model_from_state_dict(state_dict, load_config(config or src / "config.yaml").model), src
        raise ConversionError(f"directory {str(src)!r} is neither a jaxllm run or model directory (config.yaml with "
                              "checkpoints/ or model.safetensors) nor a Hugging Face directory (config.json)")
    if not src.exists():
        raise ConversionError(f"source {str(src)!r} does not exist")
    suffix = src.suffix.lower()
    if suffix == ".gguf":
        return load_gguf(src), None
    if suffix == ".safetensors":
        state_dict, embedded = load_safetensors(src)
        return model_from_state_dict(state_dict, _config_from(config, embedded, src)), None
    if suffix in (".pt", ".pth", ".bin"):
        state_dict = _torch_state_dict(src)
        return model_from_state_dict(state_dict, _config_from(config, None, src)), None
    raise ConversionError(f"source {str(src)!r}: unknown kind; expected a directory, .safetensors, .pt/.pth or .gguf")


# ---------------------------------------------------------------------------------------------
# Targets


def write_jaxllm(dst: Path, model, tokenizer_dir: Path | None) -> None:
    import shutil

    from jaxllm.config import Config, to_dict, to_yaml
    from jaxllm.convert.state_dict import save_safetensors
    from jaxllm.files import atomic_dir

    config = to_dict(model.cfg)
    if dst.suffix == ".safetensors":
        save_safetensors(dst, model, config=config)
        return
    with atomic_dir(dst) as tmp:
        save_safetensors(tmp / "model.safetensors", model, config=config)
        (tmp / "config.yaml").write_text(to_yaml(Config(model=model.cfg)))
        if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
            shutil.copyfile(tokenizer_dir / "tokenizer.json", tmp / "tokenizer.json")


def write_torch(dst: Path, model) -> None:
    from jaxllm.config import to_dict
    from jaxllm.convert.state_dict import save_safetensors, to_state_dict
    from jaxllm.files import atomic_path

    if dst.suffix == ".safetensors":
        save_safetensors(dst, model, config=to_dict(model.cfg))
    else:  # .pt / .pth (main refuses other suffixes before the source is read)
        import torch

        state_dict = {k: torch.from_numpy(v) for k, v in to_state_dict(model).items()}
        with atomic_path(dst) as tmp:
            try:
                torch.save(state_dict, tmp)
            except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) so
                raise OSError(f"torch.save failed: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# The destination


def check_destination(dst: Path) -> None:
    """One-line ConversionErrors for a destination that cannot be written: one that exists, one
    under a regular file, one whose nearest existing directory is not writable."""
    if dst.exists() or dst.is_symlink():
        raise ConversionError(f"destination {str(dst)!r} already exists; choose a new path")
    parent = dst.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"destination {str(dst)!r}: {str(parent)!r} is a file, not a directory; choose a "
                              f"path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"destination {str(dst)!r}: directory {str(parent)!r} is not writable")


def _reason(e: BaseException) -> str:
    """The OS's reason in an OSError or a safetensors I/O error ('No space left on device')."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?(?: at path .*)?$", str(e).splitlines()[0])
    return match[1] if match else str(e).splitlines()[0]


@contextlib.contextmanager
def writing(dst: Path):
    """Create dst's missing parent directories; if the write fails, remove them again (the writers
    themselves leave no temporary behind) and turn an OS error into one line naming dst."""
    from safetensors import SafetensorError

    missing = []
    parent = dst.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        for directory in reversed(missing):
            directory.mkdir()
        yield
    except BaseException as e:
        for directory in missing:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(e, (OSError, SafetensorError)):
            raise ConversionError(f"cannot write destination {str(dst)!r}: {_reason(e)}; nothing was written") from None
        raise


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if args.family is not None and args.to not in ("hf", "peft"):
        raise ConversionError(f"--family applies to --to hf and --to peft only (got --to {args.to})")
    if args.to == "peft" and args.merge_lora:
        raise ConversionError("--to peft writes the adapters themselves; drop --merge-lora")
    if args.dtype is not None and args.to != "gguf":
        raise ConversionError(f"--dtype applies to --to gguf only (got --to {args.to})")
    if args.to == "gguf" and dst.suffix.lower() != ".gguf":
        raise ConversionError(f"--to gguf: destination {str(dst)!r} must end in .gguf")
    if args.to == "torch" and dst.suffix not in (".pt", ".pth", ".safetensors"):
        raise ConversionError(f"--to torch: destination {str(dst)!r} must end in .pt, .pth or .safetensors")
    check_destination(dst)  # before the source is read
    model, tokenizer_dir = read_source(src, args.config)
    if args.merge_lora:
        if not model.cfg.lora.rank:
            raise ConversionError(f"--merge-lora: {str(src)!r} has no LoRA adapters (model.lora.rank is 0)")
        from jaxllm.convert.state_dict import merge_lora

        model = merge_lora(model)
    elif model.cfg.lora.rank and args.to in ("hf", "gguf"):
        raise ConversionError(f"{str(src)!r} has LoRA adapters (model.lora.rank {model.cfg.lora.rank}); add "
                              f"--merge-lora to fold them into the weights (--to {args.to} has no place for them)")
    family = None
    if args.to == "hf":
        from jaxllm.convert.hf import check_exportable, infer_family

        family = args.family or infer_family(model.cfg)
        check_exportable(model.cfg, family)  # before anything is written
    with writing(dst):
        if args.to == "jaxllm":
            write_jaxllm(dst, model, tokenizer_dir)
        elif args.to == "torch":
            write_torch(dst, model)
        elif args.to == "hf":
            from jaxllm.convert.hf import save_hf

            save_hf(dst, model, family=family, tokenizer_dir=tokenizer_dir)
        elif args.to == "peft":
            from jaxllm.convert.peft import save_peft

            save_peft(dst, model, family=args.family)
        else:
            from jaxllm.convert.gguf import save_gguf

            save_gguf(dst, model, dtype=args.dtype or "float32")
    print(f"wrote {dst}" + (f" (Hugging Face {family})" if family else ""))
    return 0

