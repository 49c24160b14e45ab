"""`jaxllm <command>`: the command-line entry point; scripts/*.py are thin wrappers over it.

User mistakes (bad config, value, file or platform) print one line `error: ...` and exit 2, with
no traceback unless `--debug` is given.
"""
from __future__ import annotations

import argparse
import sys

from jaxllm.errors import USER_ERRORS, ConfigError

COMMANDS = {
    "verify": ("jaxllm.verify", "parameter counts and a forward/backward check of every preset"),
    "train": ("jaxllm.train.cli", "train a model: --config configs/X.yaml key=value ..."),
    "convert": ("jaxllm.convert.cli", "convert weights: SRC DST --to jaxllm|torch|hf|gguf"),
    "bench": ("jaxllm.benchmarks", "benchmarks: train, moe, recursion, decode"),
    "sample": ("jaxllm.sample", "generate text: --run DIR | --checkpoint PATH, --prompt/--prompt-file/--interactive"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command-line value is one line (`error: prog: message`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: jaxllm {" + ",".join(sorted(COMMANDS)) + "} [options]\n" + "\n".join(
        f"  {name:8s} {help_}" for name, (_, help_) in sorted(COMMANDS.items()))
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        print(f"error: unknown command {got}; allowed: {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    return run(argv[0], argv[1:])


def run(command: str, argv: list[str]) -> int:
    """Run one command's `main(argv)`, turning user errors into one line and exit code 2."""
    import importlib

    debug = "--debug" in argv
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(argv) or 0
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
