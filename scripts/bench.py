#!/usr/bin/env python
"""Benchmarks: `python scripts/bench.py train|moe|recursion|decode|trm [options]`. See `--help` of each section."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("bench", sys.argv[1:]))
