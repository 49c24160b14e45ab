"""Serving benchmark: `jaxllm serve`'s HTTP server in this process (uvicorn on a free port of
127.0.0.1, --slots sequence slots) answering --requests streamed completions from 1, 4, 16 (--clients)
concurrent clients, against the same requests decoded one after another by `generate`.

Every request is a --prompt-tokens random-token prompt (token ids, so no tokenizer limits the
text) and asks for exactly --new tokens (greedy, ignore_eos). Reported per client count:
throughput (generated tokens of all requests / wall time from the first request to the last
answer), request latency p50/p90/p99 and time to first token p50/p90 (streamed). The baseline is
the sum of --requests sequential `generate` calls (batch 1, compiled once, prefill included).
Weights are random (seed 0) unless --run names a training run; the tokenizer is the run's, or one
character per token id. Compilation is excluded (a warm-up request per prompt bucket first).
"""
from __future__ import annotations

import json
import platform
import queue
import socket
import threading
import time

import numpy as np

from jaxllm.cli import ArgumentParser, positive_int, positive_ints


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="bench.py serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny-llama.yaml", help="preset YAML (default: configs/tiny-llama.yaml)")
    p.add_argument("--run", default=None, help="a training run directory: its latest checkpoint and tokenizer")
    p.add_argument("--slots", type=positive_int, default=4, help="server sequence slots (default: 4)")
    p.add_argument("--clients", type=positive_ints, default=[1, 4, 16], help="concurrent clients (default: 1,4,16)")
    p.add_argument("--requests", type=positive_int, default=16, help="requests per client count (default: 16)")
    p.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length (default: 32)")
    p.add_argument("--new", type=positive_int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--steps-per-call", type=positive_ints, default=[1, 4],
                   help="decode steps per engine call, each measured (default: 1,4)")
    p.add_argument("--platform", choices=["cpu", "cuda", "tpu", "metal"], default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def _model(args):
    if args.run is not None:
        from pathlib import Path

        from jaxllm.checkpoint import load_model
        from jaxllm.train.tokenizer import load_tokenizer

        model = load_model(Path(args.run))[0]
        return model, load_tokenizer(Path(args.run) / "tokenizer.json")
    from flax import nnx

    from jaxllm.config import load_config
    from jaxllm.model import Transformer
    from jaxllm.train.tokenizer import CharTokenizer

    cfg = load_config(args.config, args.overrides).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    # one character per id (the CharTokenizer adds its own unknown character as the last id)
    return model, CharTokenizer(chr(0x100 + i) for i in range(cfg.vocab_size - 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _client_run(base: str, prompts: list[list[int]], new: int, clients: int):
    """Send every prompt (streamed), `clients` at a time: (wall seconds, latencies, first-token times, tokens)."""
    import httpx

    work: queue.Queue = queue.Queue()
    for p in prompts:
        work.put(p)
    latencies, firsts, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                try:
                    prompt = work.get_nowait()
                except queue.Empty:
                    return
                body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}}
                start = time.perf_counter()
                first, used = None, 0
                try:
                    with http.stream("POST", f"{base}/v1/completions", json=body) as response:
                        for line in response.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"]["message"])
                            if chunk["choices"] and first is None:
                                first = time.perf_counter() - start
                            if chunk.get("usage"):
                                used = chunk["usage"]["completion_tokens"]
                except Exception as e:  # noqa: BLE001  (reported after the run)
                    errors.append(e)
                    return
                with lock:
                    latencies.append(time.perf_counter() - start)
                    firsts.append(first)
                    tokens[0] += used

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a benchmark request failed: {errors[0]}")
    return time.perf_counter() - start, latencies, firsts, tokens[0]


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from jaxllm.platform import select_platform

    select_platform(args.platform)
    import jax

    from jaxllm.decode import GREEDY, generate

    model, tokenizer = _model(args)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (args.requests, args.prompt_tokens)).tolist()

    # the baseline: one generate call per request, one after another
    generate(model, [prompts[0]], max_new_tokens=args.new, sampling=GREEDY)  # compile
    start = time.perf_counter()
    for p in prompts:
        generate(model, [p], max_new_tokens=args.new, sampling=GREEDY)
    sequential = time.perf_counter() - start

    print(f"# serve benchmark: {cfg.n_layer} layers, width {cfg.d_model}, vocab {cfg.vocab_size}, "
          f"{args.slots} slots, {args.requests} requests x ({args.prompt_tokens} prompt + {args.new} new tokens), "
          f"greedy, streamed; {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}")
    total = args.requests * args.new
    print("| clients | steps per call | tokens/s | vs sequential generate | latency p50 / p90 / p99 (s) "
          "| first token p50 / p90 (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| sequential `generate` | - | {total / sequential:.1f} | 1.00x | {sequential / args.requests:.2f} (each) | - |")
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # the server in its own process: no GIL shared with the clients
    for steps in args.steps_per_call:
        port = _free_port()
        ready = context.Event()
        child = context.Process(target=_serve, args=(argv, port, steps, ready), daemon=True)
        child.start()
        if not ready.wait(600):
            child.kill()
            raise RuntimeError("the benchmark server did not start")
        base = f"http://127.0.0.1:{port}"
        try:
            _client_run(base, prompts[:1], args.new, 1)  # warm-up: the prompt bucket's prefill
            for clients in args.clients:
                wall, lat, first, tokens = _client_run(base, prompts, args.new, clients)
                if tokens != total:
                    raise RuntimeError(f"expected {total} generated tokens, the server reported {tokens}")
                print(f"| {clients} | {steps} | {tokens / wall:.1f} | {sequential / wall:.2f}x | "
                      f"{_percentile(lat, 50):.2f} / {_percentile(lat, 90):.2f} / {_percentile(lat, 99):.2f} | "
                      f"{_percentile(first, 50):.3f} / {_percentile(first, 90):.3f} |", flush=True)
        finally:
            child.terminate()
            child.join(timeout=30)
    return 0


def _serve(argv: list[str], port: int, steps: int, ready) -> None:
    """The benchmark's server process: the same model (random weights are seeded) behind uvicorn."""
    import uvicorn

    from jaxllm.platform import select_platform
    from jaxllm.serve.app import make_app
    from jaxllm.serve.engine import Engine

    args = parser().parse_args(argv)
    select_platform(args.platform)
    model, tokenizer = _model(args)
    engine = Engine(model, tokenizer, slots=args.slots, max_waiting=max(256, args.requests), steps_per_call=steps)
    engine.warm_up()
    engine.start()
    server = uvicorn.Server(uvicorn.Config(make_app(engine, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    ready.set()
    thread.join()
