"""Train-step benchmark: jaxllm's real training step (`Trainer.train_step`: the config's optimizer
from make_optimizer with clipping and its schedule, the router-bias update, the state sharded over
train.mesh and donated) beside torch_ref (eager, and torch.compile with --compile; AdamW with the
config's lr, betas, weight decay on every parameter, and clipping) on the same config, batch and
machine. Each timed step is one call of the step on --batch sequences (with train.grad_accum > 1,
one micro-batch of MultiSteps). MFU divides by the peak of every device of the mesh.
"""
from __future__ import annotations

import platform
import time

import numpy as np

from jaxllm.benchmarks import failure
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


def jax_step_time(trainer, tokens: np.ndarray, n_warmup: int, n_steps: int) -> tuple[float, float]:
    """(median seconds, first call's seconds) of the training loop's own jitted step on one batch,
    fed again each step. The first call compiles the step: it is one of the warm-up calls (or an
    extra one, with no warm-up) and never timed in the median."""
    batch = trainer.put(tokens)

    def step():
        trainer.state, loss, *_ = trainer.train_step(trainer.state, batch)
        return loss

    start = time.perf_counter()
    step().block_until_ready()
    first = time.perf_counter() - start
    return _time(step, max(n_warmup - 1, 0), n_steps, lambda loss: loss.block_until_ready()), first


def torch_step_time(cfg, tokens, n_warmup: int, n_steps: int, compile_: bool) -> float:
    import torch

    from jaxllm.config import to_dict
    from torch_ref.model import Transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = cfg.train
    model = Transformer(to_dict(cfg.model)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    tokens = torch.from_numpy(tokens).long().to(device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.dtype)
    loss_fn = torch.compile(model.loss) if compile_ else model.loss

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
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
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (default: 3); jaxllm's first step, which compiles it, is never timed")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (model.dtype; parameters stay model.param_dtype); torch_ref runs "
                             "under autocast to it")
    parser.add_argument("--no-torch", action="store_true", help="skip torch_ref")
    parser.add_argument("--no-jax", action="store_true",
                        help="skip jaxllm: time torch_ref alone, in a process where JAX computes nothing (the fair "
                             "comparison on a CPU, alternated with a --no-torch run)")
    parser.add_argument("--memory", action="store_true",
                        help="only XLA's memory analysis of the compiled train step (state, optimizer, temporaries); "
                             "no timing (e.g. a LoRA step against a full fine-tune: model.lora.rank=8)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (always on a CUDA GPU, unless --no-torch)")
    args = parser.parse_intermixed_args(argv)

    from jaxllm.config import load_config
    from jaxllm.errors import ConfigError
    from jaxllm.platform import split_cpu

    cfg = load_config(args.config, [*args.overrides, *([f"model.dtype={args.dtype}"] if args.dtype else [])])
    for name, value, low in (("--batch", args.batch, 1), ("--seq", args.seq, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise ConfigError(f"{name} {value} is invalid: must be an integer >= {low}")
    if args.no_jax and args.no_torch:
        raise ConfigError("--no-jax and --no-torch together leave nothing to time; give at most one")
    split_cpu(cfg, micro_batches=[args.batch])  # as train.py does: one CPU device per core

    import jax

    from jaxllm.metrics import flops_per_token, peak_flops
    from jaxllm.sharding import batch_divisor, make_mesh
    from jaxllm.train.loop import Trainer

    if args.seq > cfg.model.max_seq_len:
        raise ConfigError(f"--seq {args.seq} is longer than model.max_seq_len ({cfg.model.max_seq_len})")
    mesh = make_mesh(cfg.train.mesh)
    if args.batch % batch_divisor(mesh):
        raise ConfigError(f"--batch {args.batch} must divide by the data x fsdp size ({batch_divisor(mesh)}) of "
                          f"train.mesh={cfg.train.mesh!r}; change --batch or train.mesh")
    tokens_per_step = args.batch * args.seq
    device = jax.devices()[0]
    peak = peak_flops(device)
    flops = flops_per_token(cfg.model, args.seq)
    print(f"device: {mesh.size} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"python {platform.python_version()}")
    print(f"config: {args.config} {' '.join(args.overrides)}; {cfg.model.dtype} compute, {cfg.model.param_dtype} "
          f"params; batch {args.batch} x seq {args.seq}; mesh "
          f"{dict(mesh.shape)}; {flops / 6e6:.2f}M active params-equivalent; MFU peak "
          f"{'%.0f TFLOP/s per device' % (peak / 1e12) if peak else 'n/a (CPU)'}")
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    if args.memory:
        return memory_report(cfg, mesh, tokens)
    def row(name, seconds):  # printed as soon as measured, so a later failure loses nothing
        tps = tokens_per_step / seconds
        mfu = f"{100 * flops * tps / (peak * mesh.size):6.1f}%" if peak else "    n/a"
        print(f"{name:36s} {1000 * seconds:9.2f} {tps:11,.0f} {mfu}", flush=True)

    header = f"{'implementation':36s} {'ms/step':>9s} {'tokens/s':>11s} {'MFU':>7s}"
    if args.no_jax:
        print(header, flush=True)
    else:
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            trainer = Trainer(cfg, mesh)
            jax.block_until_ready(trainer.state)
            built = time.perf_counter() - start
            seconds, first = jax_step_time(trainer, tokens, args.warmup, args.steps)
            print(f"start-up: state built in {built:.1f} s, first step (compiles it) {first:.1f} s", flush=True)
            print(header, flush=True)
            row(f"jaxllm (Trainer, {cfg.train.optimizer})", seconds)
        del trainer  # its state's memory, before torch allocates its own
    if not args.no_torch:
        import torch

        peers = [(f"torch_ref eager (torch {torch.__version__})", False)]
        if args.compile or torch.cuda.is_available():
            peers.append(("torch_ref torch.compile", True))
        for name, compiled in peers:
            try:
                row(name, torch_step_time(cfg, tokens, args.warmup, args.steps, compiled))
            except Exception as e:  # a peer's failure is a row, not the end of the benchmark
                print(f"{name:36s} {failure(e)}")
    return 0


def memory_report(cfg, mesh, tokens) -> int:
    """XLA's accounting of the compiled train step (`memory_analysis()`), and the state it carries:
    parameters, optimizer state (what freezing and LoRA shrink), and the step's temporaries."""
    import jax
    from flax import nnx

    from jaxllm.train.loop import Trainer

    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh)
        compiled = trainer.train_step.lower(trainer.state, trainer.put(tokens)).compile()
    stats = compiled.memory_analysis()
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(nnx.merge(trainer.graphdef, trainer.state)[0], nnx.Param)))
    trainable = sum(x.nbytes for x in jax.tree.leaves(nnx.state(nnx.merge(trainer.graphdef, trainer.state)[0],
                                                                 trainer.wrt)))
    optimizer = sum(x.nbytes for x in jax.tree.leaves(trainer.state[1]))
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    print(f"parameters {mib(params)} ({mib(trainable)} trainable); optimizer state {mib(optimizer)}")
    print(f"XLA memory analysis of the step: arguments {mib(stats.argument_size_in_bytes)}, outputs "
          f"{mib(stats.output_size_in_bytes)}, temporaries {mib(stats.temp_size_in_bytes)}, aliased "
          f"{mib(stats.alias_size_in_bytes)}; peak estimate (arguments + outputs + temporaries - aliased) "
          f"{mib(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes)}")
    return 0
