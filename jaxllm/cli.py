"""`jaxllm <command>`: the command-line entry point; scripts/*.py are thin wrappers over it.

User mistakes (bad config, value, file or platform) print one line `error: ...` and exit 2, with
no traceback unless `--debug` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from jaxllm.errors import USER_ERRORS, ConfigError

COMMANDS = {
    "verify": ("jaxllm.verify", "parameter counts and a forward/backward check of every preset"),
    "train": ("jaxllm.train.cli", "train a model: --config configs/X.yaml key=value ..."),
    "convert": ("jaxllm.convert.cli", "convert weights: SRC DST --to jaxllm|torch|hf|gguf"),
    "bench": ("jaxllm.benchmarks", "benchmarks: train, moe, recursion, decode, trm"),
    "sample": ("jaxllm.sample", "generate text: --run DIR | --checkpoint PATH, --prompt/--prompt-file/--interactive"),
    "serve": ("jaxllm.serve.cli", "an OpenAI-compatible HTTP server: --run DIR | --checkpoint FILE | --hf DIR"),
    "distill": ("jaxllm.tasks.distill", "a TiDAR self-distillation corpus: --run DIR --data TEXT --out FILE"),
    "puzzles": ("jaxllm.tasks.cli", "make a puzzle dataset: --task maze --size 6 --out FILE"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command-line value is one line (`error: prog: message`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= {low}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: an integer >= {low}")
    return value


def positive_int(text: str) -> int:
    """argparse `type=`: an integer >= 1 (a bad value is argparse's one-line error, exit 2)."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse `type=`: an integer >= 0."""
    return _integer(text, 0)


def positive_ints(text: str) -> list[int]:
    """argparse `type=`: comma-separated integers >= 1, e.g. `1,32`."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: comma-separated integers >= 1, e.g. 1,32") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]} in {text!r} is invalid; allowed: comma-separated integers >= 1")
    return values


def positive_float(text: str) -> float:
    """argparse `type=`: a finite number > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a number > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is invalid; allowed: a finite number > 0")
    return value


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


def entry() -> None:
    """The `jaxllm` console script: `main()`, then `exit_with` its code."""
    exit_with(main())


def exit_with(code: int) -> None:
    """sys.exit(code); after a failure, os._exit instead: a failed orbax read leaves tensorstore
    reads in flight whose callbacks print "Event loop is closed" tracebacks during the interpreter's
    teardown, and after a one-line error nothing is left to clean up (every file is already
    written or removed)."""
    if code == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


CONFIG_SECTIONS = ("model.", "train.")


def config_overrides(argv: list[str]) -> list[str]:
    """argv with `--train.batch_size=32`-style overrides (seed 000's configurator) written as the
    `train.batch_size=32` every command takes: an option naming a config field, `--section.key=value`,
    becomes the plain override. No command has an option that starts with a config section."""
    return [arg[2:] if arg.startswith("--") and arg[2:].startswith(CONFIG_SECTIONS) and "=" in arg else arg
            for arg in argv]


def run(command: str, argv: list[str]) -> int:
    """Run one command's `main(argv)`, turning user errors and OS errors (a path under a file, a
    read-only directory, a full disk) into one line and exit code 2, and Ctrl-C / SIGTERM into one
    line and exit 130 / 143 (training stops gracefully instead: jaxllm.train.loop.graceful_stop)."""
    import importlib

    debug = "--debug" in argv
    if not debug:  # orbax logs a failed write's traceback through absl; it is reported here in one line
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        with signal_handler(exit_now):
            return importlib.import_module(COMMANDS[command][0]).main(config_overrides(argv)) or 0
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        print(f"error: {os_error(e)}", file=sys.stderr)
        return 2


def os_error(e: OSError) -> str:
    """'cannot write '/etc/passwd/x': Not a directory' for an OSError with a file name."""
    paths = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
    return f"{paths}: {e.strerror or e}" if paths else str(e.strerror or e)


@contextlib.contextmanager
def signal_handler(handler, signums=(signal.SIGINT, signal.SIGTERM)):
    """`handler` for SIGINT and SIGTERM inside the block (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_now(signum, frame=None) -> None:
    """A signal handler: one line, exit 128 + signum at once. Letting KeyboardInterrupt unwind out of
    an XLA compile and then tearing the interpreter down crashed with SIGSEGV (7 of 7 Ctrl-Cs during
    `sample`'s compile); os._exit skips that teardown. Files are written atomically (jaxllm.files,
    orbax's temporary step directories), so exiting at any point leaves no half-written file."""
    sys.stdout.flush()
    print(f"\ninterrupted ({signal.Signals(signum).name}): exiting", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    entry()
