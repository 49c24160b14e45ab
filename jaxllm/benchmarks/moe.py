"""`bench moe`: step time of the MoE model (jitted forward + backward of the full loss) with the
grouped (sorted, jax.lax.ragged_dot) dispatch against the dense reference (every expert on every
token), on the seed-002 shape. On CPU the default is a reduced depth (model.n_layer=2, before any
override) and a small batch so that it runs in about a minute; pass model.n_layer=8 --batch N --seq T
for the full shape on an accelerator.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

from jaxllm.cli import ArgumentParser, positive_int

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "seed002-customllm.yaml"
CPU_SIZED = ["model.n_layer=2"]  # applied before the command line's overrides


def step_time(cfg, batch: int, seq: int, steps: int) -> float:
    """Median seconds per jitted forward+backward step (after one compile-and-run step)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxllm.model import Transformer, lm_loss

    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    model.train()
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.model.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    @nnx.jit
    def step(model, inputs, targets):
        return nnx.value_and_grad(lm_loss)(model, inputs, targets)

    jax.block_until_ready(step(model, inputs, targets))  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step(model, inputs, targets))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench.py moe", description=__doc__)
    parser.add_argument("--config", default=str(CONFIG), help="MoE preset (default: seed002-customllm)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, e.g. model.n_layer=8 (default: model.n_layer=2)")
    parser.add_argument("--batch", type=positive_int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq", type=positive_int, default=256,
                        help="tokens per sequence, at most model.max_seq_len (default: 256)")
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="timed steps after the compile step; the median is reported (default: 5)")
    parser.add_argument("--dispatch", default="grouped,dense", help="comma-separated: grouped, dense (default: both)")
    args = parser.parse_intermixed_args(argv)

    import jax

    from jaxllm.config import load_config
    from jaxllm.errors import ConfigError

    def config(dispatch: str):
        return load_config(args.config, [*CPU_SIZED, "train.seq_len=null", *args.overrides,
                                         f"model.moe.dispatch={dispatch}"])

    configs = {dispatch: config(dispatch) for dispatch in args.dispatch.split(",")}  # mistakes fail before timing
    n_layer, max_seq_len = next(iter(configs.values())).model.n_layer, next(iter(configs.values())).model.max_seq_len
    if args.seq > max_seq_len:
        raise ConfigError(f"--seq {args.seq} is longer than model.max_seq_len ({max_seq_len}); lower --seq or "
                          f"raise model.max_seq_len")
    device = jax.devices()[0]
    print(f"bench moe: {Path(args.config).stem} {' '.join(args.overrides)}, n_layer={n_layer}, batch "
          f"{args.batch} x {args.seq} tokens, float32 params, forward+backward of CE + aux losses, median of "
          f"{args.steps} steps")
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}")
    print(f"{'dispatch':10s} {'experts':>8s} {'top-k':>6s} {'ms/step':>10s} {'tokens/s':>10s}")
    for dispatch, cfg in configs.items():
        seconds = step_time(cfg, args.batch, args.seq, args.steps)
        moe = cfg.model.moe
        print(f"{dispatch:10s} {moe.n_routed_experts:8d} {moe.num_experts_per_tok:6d} {seconds * 1e3:10.1f} "
              f"{args.batch * args.seq / seconds:10.0f}", flush=True)
    return 0
