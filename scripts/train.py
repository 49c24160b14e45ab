#!/usr/bin/env python
"""Train a model: --config configs/X.yaml key=value ... See `--help`."""
import sys

from jaxllm.cli import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:]))
