"""`jaxllm bench <section>` / `python scripts/bench.py <section>`: benchmarks that print a table.

Sections: `train` (the training loop's own step, `Trainer.train_step`, beside torch_ref on the same
config and machine), `moe` (grouped vs dense expert dispatch), `recursion` (peak memory of the
looped core against the loop count, with and without remat) and `decode` (KV-cache generation:
jaxllm, torch_ref and Hugging Face generate, ms/token and tokens/s) and `trm` (a trained TRM run's exact-puzzle accuracy on its held-out
puzzles against test-time depth and with the halting head, beside a baseline run) and `serve` (the
HTTP server's throughput and latency at 1, 4 and 16 concurrent clients against sequential `generate`). Each takes `--config` and
key=value overrides, before or after the options. Record results in BENCHMARKS.md with device,
versions, date and the exact command. Timing lives here, never in a test's assertion.

MFU is `jaxllm.metrics` (DESIGN.md's definition), the same count the training loop logs.
"""
from __future__ import annotations

import importlib
import sys

SECTIONS = {"train": "jaxllm.benchmarks.train", "moe": "jaxllm.benchmarks.moe",
            "recursion": "jaxllm.benchmarks.recursion", "decode": "jaxllm.benchmarks.decode",
            "trm": "jaxllm.benchmarks.trm", "serve": "jaxllm.benchmarks.serve"}


def failure(e: Exception) -> str:
    """A peer's failure as a table row's text: its type and the first line of its message."""
    first = str(e).splitlines()[0][:80] if str(e) else ""
    return f"failed: {type(e).__name__}: {first}"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SECTIONS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        from jaxllm.errors import ConfigError

        got = repr(argv[0]) if argv else "nothing"
        raise ConfigError(f"unknown benchmark section {got}; allowed: {', '.join(SECTIONS)}")
    return importlib.import_module(SECTIONS[argv[0]]).run(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
