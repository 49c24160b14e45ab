#!/usr/bin/env python
"""Parameter count of every preset, and a forward/backward check of the small ones. See `--help`."""
import sys

from jaxllm.cli import run

if __name__ == "__main__":
    sys.exit(run("verify", sys.argv[1:]))
