#!/usr/bin/env python
"""Make a puzzle dataset: --task maze --size 6 --out FILE. See `--help`."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("puzzles", sys.argv[1:]))
