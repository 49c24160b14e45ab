"""`bench recursion`: peak activation memory of a training step (jitted forward + backward) of the
RecursiveBlock against the loop count r, with and without remat per loop.

The number is XLA's own accounting of the compiled step (`memory_analysis().temp_size_in_bytes`:
every intermediate buffer live at once at the peak, parameters and inputs excluded), so it is
exact for the compiled program and costs no run. Without remat the backward keeps every loop's
activations (linear in r); with remat it keeps one state per loop and recomputes the rest. Loops
beyond n_grad_loops run without gradient and keep nothing: the `k=2` column is flat in r.
"""
from __future__ import annotations

import datetime
from pathlib import Path

from jaxllm.cli import ArgumentParser, positive_int, positive_ints

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-recursive.yaml"


def step_temp_bytes(model_cfg, batch: int, seq: int) -> int:
    import jax
    from flax import nnx

    from jaxllm.model import lm_loss
    from jaxllm.model.transformer import abstract_model

    abstract = abstract_model(model_cfg)
    graphdef, state = nnx.split(abstract)
    tokens = jax.ShapeDtypeStruct((batch, seq), jax.numpy.int32)

    def step(state, inputs, targets):
        model = nnx.merge(graphdef, state)
        return nnx.value_and_grad(lm_loss)(model, inputs, targets)

    compiled = jax.jit(step).lower(state, tokens, tokens).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def run(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench.py recursion", description=__doc__)
    parser.add_argument("--config", default=str(CONFIG),
                        help="a preset with model.recursion on (default: tiny-recursive)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.d_model=256 (default: none)")
    parser.add_argument("--loops", type=positive_ints, default=[2, 8, 32],
                        help="comma-separated loop counts r (default: 2,8,32)")
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq", type=positive_int, default=256,
                        help="tokens per sequence, at most model.max_seq_len (default: 256)")
    args = parser.parse_intermixed_args(argv)

    import jax

    from jaxllm.config import load_config
    from jaxllm.errors import ConfigError

    def config(*column: str):
        return load_config(args.config, ["train.seq_len=null", "model.recursion.random_loops=false", *args.overrides,
                                         *column])

    base = config()
    if args.seq > base.model.max_seq_len:
        raise ConfigError(f"--seq {args.seq} is longer than model.max_seq_len ({base.model.max_seq_len}); lower "
                          f"--seq or raise model.max_seq_len")
    if base.model.recursion.mode == "none":
        raise ConfigError(f"bench recursion: {args.config} has model.recursion.mode='none'; pick a recursive preset")
    device = jax.devices()[0]
    r = base.model.recursion
    print(f"bench recursion: {Path(args.config).stem} {' '.join(args.overrides)} ({r.mode}, prelude {r.n_prelude}, "
          f"core {r.n_core}, coda {base.model.n_layer - r.n_prelude - r.n_core} layers, width {base.model.d_model}), "
          f"batch {args.batch} x {args.seq}, float32; peak temporary bytes of the compiled train step")
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, {datetime.date.today().isoformat()}")
    columns = [("no remat, grad all", False, None), ("remat, grad all", True, None), ("remat, grad k=2", True, 2)]
    print(f"{'r':>4s} " + " ".join(f"{name:>20s}" for name, _, _ in columns))
    for n_loops in args.loops:
        row = []
        for _, remat, k in columns:
            cfg = config(f"model.remat={str(remat).lower()}", f"model.recursion.n_loops={n_loops}",
                         f"model.recursion.n_grad_loops={'null' if k is None else min(k, n_loops)}")
            row.append(step_temp_bytes(cfg.model, args.batch, args.seq))
        print(f"{n_loops:4d} " + " ".join(f"{b / 2**20:17.1f} MiB" for b in row), flush=True)
    return 0
