"""`jaxllm distill` / `python scripts/distill.py`: a self-distillation corpus for a TiDAR drafter.

    python scripts/distill.py --run runs/tidar-ar --data data/tinyshakespeare.txt --out runs/tidar-mix.txt

Draws --rows prompts of --prompt-tokens tokens from the *training* split of --data (the first
1 - train.val_fraction of its token stream, as `jaxllm train` splits it), continues each greedily
for --new tokens with the run's model, and writes the documents (prompt + continuation, separated
by blank lines) followed by --data itself to --out. Training a TiDAR model on --out (`train.data`,
with the `train.val_fraction` this prints, which keeps --data's own validation split as the
validation split) teaches the diffusion drafter the AR model's greedy continuations, the tokens
greedy verification (beta 1) accepts, while the AR half keeps learning the text: the
self-distillation of Medusa-2 and CLLMs (consistency LLMs), applied to TiDAR's drafter. The
paper itself trains on data only (papers.md §1.2); docs/sampling.md has the recipe and why.
The same arguments always write the same file. An existing --out is kept unless --force is given.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jaxllm.cli import ArgumentParser, nonnegative_int, positive_int
from jaxllm.errors import ConfigError, DataError

SEPARATOR = "\n\n"  # between documents


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="distill.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="the training run whose model continues the prompts")
    p.add_argument("--step", type=nonnegative_int, default=None, help="the checkpoint step (default: the latest)")
    p.add_argument("--data", required=True, metavar="FILE", help="the text corpus (UTF-8) the run was trained on")
    p.add_argument("--out", required=True, metavar="FILE", help="the text file to write")
    p.add_argument("--rows", type=positive_int, default=2048, help="prompts to continue (default: 2048)")
    p.add_argument("--prompt-tokens", type=positive_int, default=128, help="tokens per prompt (default: 128)")
    p.add_argument("--new", type=positive_int, default=256, help="greedy tokens per prompt (default: 256)")
    p.add_argument("--batch", type=positive_int, default=64, help="prompts decoded at once (default: 64)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="picks the prompts (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (default: refuse)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (default: off)")
    return p


def prompt_starts(n_train: int, rows: int, prompt_tokens: int, seed: int) -> np.ndarray:
    """Where each prompt starts in the training split (n_train tokens): uniform, seeded."""
    if n_train < prompt_tokens:
        raise DataError(f"the training split is {n_train} tokens; --prompt-tokens {prompt_tokens} needs at least that many")
    return np.random.default_rng(seed).integers(0, n_train - prompt_tokens + 1, rows)


def greedy_documents(model, tokenizer, train_ids: np.ndarray, *, rows: int, prompt_tokens: int, new: int,
                     batch: int, seed: int) -> list[str]:
    """The texts of `rows` prompts drawn from train_ids, each followed by the model's greedy
    continuation (`jaxllm.decode.generate`, no EOS: every row runs `new` tokens)."""
    from jaxllm.decode import generate

    starts = prompt_starts(len(train_ids), rows, prompt_tokens, seed)
    docs = []
    for i in range(0, rows, batch):
        prompts = [train_ids[s:s + prompt_tokens].tolist() for s in starts[i:i + batch]]
        for prompt, cont in zip(prompts, generate(model, prompts, max_new_tokens=new)):
            docs.append(tokenizer.decode(prompt + cont))
    return docs


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from jaxllm.checkpoint import load_model
    from jaxllm.config import load_config
    from jaxllm.files import atomic_write, read_text
    from jaxllm.train.data import split
    from jaxllm.train.tokenizer import load_tokenizer

    run, out = Path(args.run), Path(args.out)
    if out.is_dir():
        raise DataError(f"--out {str(out)!r} is a directory; allowed: a file path")
    if out.exists() and not args.force:
        raise DataError(f"--out {str(out)!r} already exists; give --force to overwrite it, or another --out")
    if not (run / "config.yaml").is_file() or not (run / "tokenizer.json").is_file():
        raise DataError(f"--run {str(run)!r} is not a run directory (config.yaml and tokenizer.json); "
                        f"give a directory written by `jaxllm train`")
    cfg = load_config(run / "config.yaml")
    if args.prompt_tokens + args.new > cfg.model.max_seq_len:
        raise ConfigError(f"--prompt-tokens + --new is {args.prompt_tokens + args.new}; the run's context holds "
                          f"{cfg.model.max_seq_len} (model.max_seq_len)")
    text = read_text(args.data, "--data")
    tokenizer = load_tokenizer(run / "tokenizer.json")
    ids = np.asarray(tokenizer.encode(text))
    train_ids, val_ids = split(ids, cfg.train.val_fraction)  # as `jaxllm train` splits the stream
    n_val = len(val_ids)
    started = time.perf_counter()
    model, _ = load_model(run, args.step)
    docs = greedy_documents(model, tokenizer, train_ids, rows=args.rows, prompt_tokens=args.prompt_tokens,
                            new=args.new, batch=args.batch, seed=args.seed)
    corpus = SEPARATOR.join(docs + [text])
    total = len(tokenizer.encode(corpus))
    # train.data.split cuts at int(total * (1 - f)) = total - n_val: exact for a char tokenizer; a BPE
    # one may move the cut by a few tokens (the data pipeline encodes the file in 1 MiB chunks)
    val_fraction = (n_val - 0.5) / total
    atomic_write(out, corpus)
    print(f"wrote {args.rows} greedy continuations ({args.prompt_tokens} + {args.new} tokens each) and "
          f"{str(args.data)!r} to {str(out)!r} ({total:,} tokens) in {time.perf_counter() - started:.1f} s; "
          f"train on it with train.data={out} train.val_fraction={val_fraction:.12g} "
          f"(--data's own {n_val:,} validation tokens)")
    return 0
