#!/usr/bin/env python
"""Parameter count of every preset, and a forward/backward check of the small ones. See `--help`."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("verify", sys.argv[1:]))
