"""`jaxllm serve` / `python scripts/serve.py`: an OpenAI-compatible HTTP server (docs/serving.md).

    python scripts/serve.py --run runs/first-run                     # http://127.0.0.1:8000/v1
    python scripts/serve.py --checkpoint model.safetensors --tokenizer tokenizer.json --slots 8
    python scripts/serve.py --hf path/to/hf-llama --port 8001

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. Requests
are decoded with continuous batching over --slots sequence slots (one jitted decode step for all
of them); up to --max-waiting sequences queue for a slot, more get a 429. The model is served
under --model-name (default: the run, file or directory name); a request naming another model is
a 400. Ctrl-C or SIGTERM stops the server after the requests in flight.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from jaxllm.cli import ArgumentParser, nonnegative_int, positive_int, signal_handler
from jaxllm.errors import DataError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0],
                       epilog="\n".join(__doc__.split("\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="DIR", help="a training run directory (config.yaml, tokenizer.json, checkpoints/)")
    source.add_argument("--checkpoint", metavar="PATH",
                        help="a safetensors weights file (torch_ref layout) or a run's checkpoint step, RUN/checkpoints/N")
    source.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--step", type=nonnegative_int, default=None, help="with --run: the checkpoint step (default: the latest)")
    p.add_argument("--config", default=None, help="with --checkpoint: preset YAML when the file has no config")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's, or the one beside the weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--slots", type=positive_int, default=4,
                   help="sequences decoded together, one KV-cache row each (default: 4)")
    p.add_argument("--steps-per-call", type=positive_int, default=4,
                   help="decode steps per device call: more is less host overhead per token, and new requests "
                        "join at most this many steps later (default: 4)")
    p.add_argument("--speculative", choices=["tidar"], default=None,
                   help="self-speculative decoding with a TiDAR model's diffusion drafts (default: off)")
    p.add_argument("--block", type=positive_int, default=None,
                   help="with --speculative: tokens drafted per forward (default: the model's diffusion.block_size)")
    p.add_argument("--beta", type=float, default=None,
                   help="with --speculative: trust in the AR logits over the drafts' (default: 1, the AR model's tokens)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="sequences that may wait for a slot; more get 429 (default: 256)")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the source's name)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="end of text token id (default: the tokenizer's <|endoftext|>, or config.json's eos_token_id)")
    p.add_argument("--platform", choices=["cpu", "cuda", "tpu", "metal"], default=None,
                   help="JAX backend (default: JAX_PLATFORMS or jax's choice)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (default: off)")
    return p


def load(args):
    """(model, tokenizer, eos_id, default name) from --run / --checkpoint / --hf."""
    from jaxllm.sample import _tokenizer, eos_of

    if args.hf is not None:
        from jaxllm.convert.hf import load_hf

        path = Path(args.hf)
        model, _ = load_hf(path)
        model.eval()
        tokenizer = _tokenizer(Path(args.tokenizer) if args.tokenizer else path / "tokenizer.json")
        eos = args.eos_id
        if eos is None:
            eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
        return model, tokenizer, eos_of(tokenizer, eos), path.resolve().name
    from jaxllm.sample import load as load_weights

    args.engine = "jax"
    loaded = load_weights(args)
    source = Path(args.run) if args.run is not None else Path(args.checkpoint)
    name = source.resolve().name if args.run is not None else source.stem
    return loaded.model, loaded.tokenizer, eos_of(loaded.tokenizer, args.eos_id), name


def check_address(host: str, port: int) -> None:
    """A one-line error when the server could not listen on host:port (taken, or not an address here)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise DataError(f"cannot listen on {host}:{port}: {e.strerror or e}; give a free --port or another --host") from None


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from jaxllm.platform import select_platform

    check_address(args.host, args.port)  # before the model is loaded: a taken port fails at once
    select_platform(args.platform)
    model, tokenizer, eos_id, name = load(args)
    if eos_id is not None and not 0 <= eos_id < model.cfg.vocab_size:
        raise DataError(f"--eos-id is {eos_id}; allowed: 0..{model.cfg.vocab_size - 1}")
    from jaxllm.sample import speculative_settings

    args.no_cache = False
    block, beta = speculative_settings(args, model.cfg)  # one-line errors for misuse
    import uvicorn

    from jaxllm.decode import TiDAR
    from jaxllm.serve.app import make_app
    from jaxllm.serve.engine import Engine

    engine = Engine(model, tokenizer, slots=args.slots, eos_id=eos_id, max_waiting=args.max_waiting,
                    steps_per_call=args.steps_per_call, speculative=None if block is None else TiDAR(block, beta))
    engine.warm_up()
    engine.start()
    model_name = args.model_name or name
    template = None
    if args.hf is not None:
        from jaxllm.serve.api import ChatTemplate

        template = ChatTemplate(args.hf) if ChatTemplate.found(args.hf) else None
    spec = "" if block is None else f", TiDAR self-speculation (block {block}, beta {beta})"
    spec += ", the model's chat template" if template is not None else ""
    print(f"jaxllm serve: {model_name!r} ({model.cfg.n_layer} layers, width {model.cfg.d_model}, context "
          f"{model.cfg.max_seq_len}), {args.slots} slots{spec}, on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    stopped_by: list[str] = []
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again for the
    # handler it found: this one records it, and the server exits 0 (jaxllm.cli's would exit 128 + n)
    with signal_handler(lambda signum, frame: stopped_by.append(signal.Signals(signum).name)):
        try:
            uvicorn.run(make_app(engine, model_name, template), host=args.host, port=args.port, log_level="warning",
                        timeout_graceful_shutdown=10)
        finally:
            engine.stop()
    if stopped_by:
        print(f"jaxllm serve: stopped by {stopped_by[0]}", file=sys.stderr)
    return 0
