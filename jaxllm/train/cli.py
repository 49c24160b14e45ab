"""`jaxllm train` / `python scripts/train.py`: train a model from a preset plus key=value overrides.

    python scripts/train.py --config configs/seed003-char-gpt.yaml train.max_steps=500

The run directory (default runs/<preset name>) receives the resolved config, the tokenizer, the
tokenised corpus, checkpoints, metrics.jsonl and loss.png; running again there resumes. The first
Ctrl-C / SIGTERM stops after the current step with a checkpoint (exit 0); a second exits at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from jaxllm.cli import ArgumentParser
from jaxllm.config import TrainConfig, type_name
from jaxllm.errors import ConfigError


def _train_fields_help() -> str:
    lines = ["train.* fields (set with key=value, e.g. train.max_steps=2000), with their defaults:"]
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        kind = "list of {seq_len, batch_size, until_ppl}" if field.name == "curriculum" else type_name(hints[field.name])
        lines.append(f"  train.{field.name:20s} {field.default!r}  ({kind})")
    lines.append("model.* fields: see configs/*.yaml and jaxllm/config.py (e.g. model.n_layer=4)")
    return "\n".join(lines)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__, epilog=_train_fields_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (default: none)")
    p.add_argument("--config", default=None, help="preset YAML (default: none, the built-in defaults)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in the run directory to continue from (default: off; a run "
                        "directory with checkpoints is resumed anyway)")
    p.add_argument("--init-from", metavar="PATH", default=None,
                   help="fine-tune: start from these weights (a Hugging Face directory, a .gguf file, torch_ref "
                        "safetensors or a jaxllm run); the model config comes from them, model.* overrides may "
                        "not change a shape, the tokenizer defaults to theirs (default: random init)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.add_argument("--sample", metavar="PROMPT", default=None,
                   help="do not train: print a continuation of PROMPT from the run directory's latest "
                        "checkpoint (length and temperature: train.sample_tokens, train.sample_temperature)")
    p.add_argument("--platform", choices=["cpu", "cuda", "tpu", "metal"], default=None,
                   help="JAX backend (default: JAX_PLATFORMS or jax's choice)")
    p.add_argument("--coordinator", default=None,
                   help="multi-host: coordinator host:port for jax.distributed (default: none; SLURM and "
                        "TPU pods are detected)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: process count (default: none)")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process (default: none)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (default: off)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)  # key=value overrides may come before or after options
    from jaxllm.config import load_config
    from jaxllm.platform import select_platform, split_cpu
    from jaxllm.sharding import maybe_initialize_distributed

    cfg = load_config(args.config, args.overrides)  # config mistakes fail before jax starts
    # before backends start
    if not maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id):
        split_cpu(cfg, args.platform)
    select_platform(args.platform)
    init_model = None
    if args.init_from is not None:
        from jaxllm.train.weights import config_from_weights

        if cfg.model.trm.enabled:
            raise ConfigError("--init-from: a TRM (model.trm.enabled) cannot start from imported weights")
        cfg, init_model = config_from_weights(args.config, args.overrides, args.init_from)

    from jaxllm.train.loop import sample_from_run, train

    run_dir = Path(args.run_dir or Path("runs") / (Path(args.config).stem if args.config else "default"))
    if args.sample is not None and cfg.model.trm.enabled:
        raise ConfigError("--sample: a TRM (model.trm.enabled) solves puzzles and has no text to sample; "
                          "evaluate it with `jaxllm bench trm --run-dir DIR`")
    if args.sample is not None:
        t = cfg.train
        step, text = sample_from_run(run_dir, args.sample, t.sample_tokens, t.sample_temperature, t.seed)
        print(f"--- sample from {run_dir} at step {step} ---\n{text}")
        return 0
    run_class = None
    if cfg.model.trm.enabled:
        from jaxllm.train.trm import TRMRun as run_class
    last = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress, run_class=run_class,
                 init_model=init_model)
    if last.get("stopped_by"):
        print(f"stopped by {last['stopped_by']} at step {last['step']}: checkpoint "
              f"{str(run_dir / 'checkpoints' / str(last['step']))!r} saved; run the same command to continue")
        return 0
    summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "val_loss") if last.get(k) is not None)
    print(f"done: step {last['step']}{', ' + summary if summary else ''}; run directory {run_dir}")
    return 0
