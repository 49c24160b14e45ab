#!/usr/bin/env python
"""Generate text: --run DIR | --checkpoint PATH, --prompt / --prompt-file / --interactive. See `--help`."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("sample", sys.argv[1:]))
