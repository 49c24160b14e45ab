"""`jaxllm verify`: every preset's parameter count (via jax.eval_shape, so multi-billion presets
cost no memory) and, for presets small enough, a real forward and backward pass on a dummy batch."""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def count_params(model_cfg) -> int:
    """Number of parameters of the model `model_cfg` describes, without allocating it."""
    import jax
    from flax import nnx

    from jaxllm.model import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def forward_backward(cfg) -> tuple[float, float]:
    """(loss, global gradient norm) of one jitted forward+backward pass on a random batch."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxllm.model import Transformer, lm_loss

    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    seq = min(cfg.train.seq_len or cfg.model.max_seq_len, 128)
    tokens = jax.random.randint(jax.random.key(cfg.train.seed), (2, seq + 1), 0, cfg.model.vocab_size)
    loss, grads = nnx.jit(nnx.value_and_grad(lm_loss))(model, tokens[:, :-1], tokens[:, 1:])
    return float(loss), float(optax.global_norm(jax.tree.leaves(grads)))


def presets(paths: list[str]) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    return sorted(CONFIG_DIR.glob("*.yaml"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm verify", description=__doc__)
    parser.add_argument("configs", nargs="*", help="preset YAML files (default: every file in configs/) "
                        "and key=value overrides applied to each, e.g. model.n_layer=2")
    parser.add_argument("--max-params", type=float, default=100.0,
                        help="run forward/backward only for presets up to this many million parameters (default: 100)")
    parser.add_argument("--platform", choices=["cpu", "cuda", "tpu", "metal"], default=None,
                        help="JAX backend (default: JAX_PLATFORMS or JAX's choice)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    from jaxllm.config import load_config
    from jaxllm.platform import select_platform

    backend = select_platform(args.platform)
    overrides = [a for a in args.configs if "=" in a]
    paths = presets([a for a in args.configs if "=" not in a])
    configs = [(path.stem, load_config(path, overrides)) for path in paths]  # validate all before running
    print(f"backend: {backend}")
    print(f"{'preset':28s} {'params':>10s}  forward+backward")
    failed = False
    for name, cfg in configs:
        n = count_params(cfg.model)
        if n > args.max_params * 1e6:
            check = f"skipped (> {args.max_params:g}M params; raise --max-params)"
        else:
            start = time.perf_counter()
            loss, grad_norm = forward_backward(cfg)
            ok = math.isfinite(loss) and math.isfinite(grad_norm)
            failed |= not ok
            check = (f"{'ok' if ok else 'FAILED'}: loss {loss:.4f} (ln V = {math.log(cfg.model.vocab_size):.4f}), "
                     f"grad norm {grad_norm:.4f}, {time.perf_counter() - start:.1f}s")
        print(f"{name:28s} {n / 1e6:9.2f}M  {check}", flush=True)
    return 1 if failed else 0
