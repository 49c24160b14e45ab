"""Train-step benchmark: jaxllm (jax.jit, AdamW, donated state) beside torch_ref (eager, and
torch.compile with --compile) on the same config, batch and machine."""
from __future__ import annotations

import platform
import time

import numpy as np

from jaxllm.cli import ArgumentParser


def _time(step, n_warmup: int, n_steps: int, sync) -> float:
    """Median seconds per step."""
    for _ in range(n_warmup):
        sync(step())
    times = []
    for _ in range(n_steps):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def jax_step_time(cfg, tokens, n_warmup: int, n_steps: int) -> float:
    import jax
    import optax
    from flax import nnx

    from jaxllm.model import Transformer, lm_loss

    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    model.train()  # dropout / LayerDrop as configured, like torch_ref's .train()
    optimizer = nnx.Optimizer(model, optax.adamw(3e-4, weight_decay=0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lm_loss)(model, tokens[:, :-1], tokens[:, 1:])
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    train_step = jax.jit(train_step, donate_argnums=0)
    tokens = jax.numpy.asarray(tokens)
    box = [state]

    def step():
        box[0], loss = train_step(box[0], tokens)
        return loss

    return _time(step, n_warmup, n_steps, lambda loss: loss.block_until_ready())


def torch_step_time(cfg, tokens, n_warmup: int, n_steps: int, compile_: bool) -> float:
    import torch

    from jaxllm.config import to_dict
    from torch_ref.model import Transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(to_dict(cfg.model)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    tokens = torch.from_numpy(tokens).long().to(device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.dtype)
    loss_fn = torch.compile(model.loss) if compile_ else model.loss

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda loss: loss.item())
    return _time(step, n_warmup, n_steps, sync)


def run(argv: list[str]) -> int:
    parser = ArgumentParser(prog="bench.py train", description=__doc__)
    parser.add_argument("--config", default="configs/tiny-gpt.yaml", help="preset YAML (default: configs/tiny-gpt.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=4")
    parser.add_argument("--batch", type=int, default=12, help="sequences per step (default: 12)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, incl. compilation (default: 3)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch_ref")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_intermixed_args(argv)

    import jax

    from jaxllm.metrics import flops_per_token, peak_flops
    from jaxllm.config import load_config

    cfg = load_config(args.config, args.overrides)
    tokens_per_step = args.batch * args.seq
    device = jax.devices()[0]
    peak = peak_flops(device)
    flops = flops_per_token(cfg.model, args.seq)
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, python {platform.python_version()}")
    print(f"config: {args.config} {' '.join(args.overrides)}; batch {args.batch} x seq {args.seq}; "
          f"{flops / 6e6:.2f}M active params-equivalent; MFU peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'n/a (CPU)'}")
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    rows = [("jaxllm (jax.jit)", jax_step_time(cfg, tokens, args.warmup, args.steps))]  # the same batch for all
    if not args.no_torch:
        import torch

        rows.append((f"torch_ref eager (torch {torch.__version__})",
                     torch_step_time(cfg, tokens, args.warmup, args.steps, False)))
        if args.compile:
            rows.append(("torch_ref torch.compile", torch_step_time(cfg, tokens, args.warmup, args.steps, True)))
    print(f"{'implementation':36s} {'ms/step':>9s} {'tokens/s':>11s} {'MFU':>7s}")
    for name, seconds in rows:
        tps = tokens_per_step / seconds
        mfu = f"{100 * flops * tps / peak:6.1f}%" if peak else "    n/a"
        print(f"{name:36s} {1000 * seconds:9.2f} {tps:11,.0f} {mfu}")
    return 0
