#!/usr/bin/env python
"""Write a TiDAR self-distillation corpus: --run DIR --data TEXT --out FILE. See `--help`."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("distill", sys.argv[1:]))
