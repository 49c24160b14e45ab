#!/usr/bin/env python
"""Generate text: --run DIR | --checkpoint PATH, --prompt / --prompt-file / --interactive. See `--help`."""
import sys

from jaxllm.cli import run

if __name__ == "__main__":
    sys.exit(run("sample", sys.argv[1:]))
