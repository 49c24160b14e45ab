#!/usr/bin/env python
"""Train a model: --config configs/X.yaml key=value ... See `--help`."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("train", sys.argv[1:]))
