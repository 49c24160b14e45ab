"""`jaxllm puzzles` / `python scripts/puzzles.py`: write a generated puzzle dataset to an .npz.

    python scripts/puzzles.py --task maze --size 6 --n-train 200000 --n-test 1000 --seed 0 \\
        --out puzzles/maze6.npz

The file holds train_inputs, train_labels, test_inputs, test_labels (int32 [N, size*size]) and a
JSON `meta`; jaxllm.tasks.maze documents the encoding and `load_puzzles` reads it back, checked.
The same arguments always write the same puzzles, and no test puzzle appears in the training set.
An existing --out is kept unless --force is given.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from jaxllm.cli import ArgumentParser, nonnegative_int, positive_int
from jaxllm.errors import ConfigError, DataError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="puzzles.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["maze"], default="maze", help="the puzzle task (default: maze)")
    p.add_argument("--size", type=int, default=6, help="grid side, 2..16 (default: 6)")
    p.add_argument("--n-train", type=positive_int, default=200_000, help="training puzzles (default: 200000)")
    p.add_argument("--n-test", type=positive_int, default=1000, help="test puzzles, all distinct (default: 1000)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="the same seed writes the same file (default: 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .npz to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (default: refuse)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (default: off)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from jaxllm.tasks import maze

    maze.check_size(args.size)  # every check before the (up to a minute of) generation
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out {str(out)!r} is not an .npz file; allowed: a path ending in .npz")
    if out.is_dir():
        raise DataError(f"--out {str(out)!r} is a directory; allowed: a file path ending in .npz")
    if out.exists() and not args.force:
        raise DataError(f"--out {str(out)!r} already exists; give --force to overwrite it, or another --out")
    started = time.perf_counter()
    data = maze.make_dataset(args.size, args.n_train, args.n_test, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    maze.save_puzzles(out, data)
    seconds = time.perf_counter() - started
    print(f"wrote {args.n_train} train + {args.n_test} test {args.size}x{args.size} {args.task} puzzles "
          f"(seq_len {args.size ** 2}, vocab {maze.VOCAB_SIZE}, seed {args.seed}) to {str(out)!r} in {seconds:.1f} s")
    return 0
