#!/usr/bin/env python
"""An OpenAI-compatible HTTP server: --run DIR | --checkpoint PATH | --hf DIR. See `--help`."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("serve", sys.argv[1:]))
