#!/usr/bin/env python
"""Convert weights between jaxllm, torch_ref, Hugging Face and GGUF: SRC DST --to FORMAT. See `--help`."""
import sys

from jaxllm.cli import run

if __name__ == "__main__":
    sys.exit(run("convert", sys.argv[1:]))
