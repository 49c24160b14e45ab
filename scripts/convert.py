#!/usr/bin/env python
"""Convert weights between jaxllm, torch_ref, Hugging Face and GGUF: SRC DST --to FORMAT. See `--help`."""
import sys

from jaxllm.cli import exit_with, run

if __name__ == "__main__":
    exit_with(run("convert", sys.argv[1:]))
