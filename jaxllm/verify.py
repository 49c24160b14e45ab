"""`jaxllm verify`: every preset's parameter count (via jax.eval_shape, so multi-billion presets
cost no memory) and a real forward and backward pass on a dummy batch: of the preset itself when
it is small enough, else of a small variant with the same switches."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from jaxllm.cli import ArgumentParser, positive_float

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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


def small_variant(cfg):
    """The same architecture (every switch as in the preset) at a size that runs in seconds on a
    CPU: width 64, 4 heads, 2 layers past the leading dense ones, small vocab, ranks and widths."""
    from jaxllm.config import Config, resolve

    m = cfg.model
    a, mla, moe = m.attention, m.attention.mla, m.moe
    n_kv_head = 4 if a.n_kv_head == a.n_head else (1 if a.n_kv_head == 1 else 2)
    attention = dataclasses.replace(
        a, n_head=4, n_kv_head=n_kv_head, head_dim=16, window=None if a.window is None else min(a.window, 16),
        mla=dataclasses.replace(mla, q_lora_rank=None if mla.q_lora_rank is None else 32, kv_lora_rank=32,
                                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16))
    first_k_dense = min(moe.first_k_dense, 1)
    moe = dataclasses.replace(moe, first_k_dense=first_k_dense, moe_intermediate_size=32 if moe.n_routed_experts else None,
                              shared_intermediate_size=32 if moe.n_routed_experts else None)
    n_layer = min(m.n_layer, first_k_dense + 2)
    recursion = m.recursion
    if recursion.mode != "none":  # prelude, core and coda of at most one layer each, two loops
        n_prelude, n_core = min(recursion.n_prelude, 1), 1
        n_layer = n_prelude + n_core + min(m.n_layer - recursion.n_prelude - recursion.n_core, 1)
        n_loops = min(recursion.n_loops, 2)
        recursion = dataclasses.replace(
            recursion, n_prelude=n_prelude, n_core=n_core, n_loops=n_loops, n_latent_steps=min(recursion.n_latent_steps, 2),
            n_grad_loops=None if recursion.n_grad_loops is None else min(recursion.n_grad_loops, n_loops))
    vocab_size = min(m.vocab_size, 256)
    diffusion = dataclasses.replace(m.diffusion, mask_token_id=None if m.diffusion.mask_token_id is None else
                                    min(m.diffusion.mask_token_id, vocab_size - 1))
    model = dataclasses.replace(
        m, vocab_size=vocab_size, d_model=64, n_layer=n_layer, max_seq_len=min(m.max_seq_len, 128),
        attention=attention, moe=moe, mlp=dataclasses.replace(m.mlp, d_ff=128), recursion=recursion, diffusion=diffusion)
    return resolve(Config(model=model, train=dataclasses.replace(cfg.train, seq_len=None)))


def presets(paths: list[str]) -> list[Path]:
    """The preset files named (default: every file in configs/). A name that is neither a file nor
    a YAML file name (`model.d_model`: an override without its `=`) is a one-line ConfigError."""
    from jaxllm.errors import ConfigError

    for p in paths:
        if not Path(p).exists() and Path(p).suffix.lower() not in (".yaml", ".yml"):
            raise ConfigError(f"{p!r} is neither a file nor a key=value override; verify takes preset YAML files "
                              f"(default: every file in configs/) and key=value overrides applied to each, "
                              f"e.g. model.d_model=128")
    if paths:
        return [Path(p) for p in paths]
    return sorted(CONFIG_DIR.glob("*.yaml"))


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="jaxllm verify", description=__doc__)
    parser.add_argument("configs", nargs="*", help="preset YAML files (default: every file in configs/) "
                        "and key=value overrides applied to each, e.g. model.n_layer=2")
    parser.add_argument("--max-params", type=positive_float, default=100.0,
                        help="presets above this many million parameters run forward/backward on a small "
                             "variant of the same architecture (default: 100)")
    parser.add_argument("--platform", choices=["cpu", "cuda", "tpu", "metal"], default=None,
                        help="JAX backend (default: JAX_PLATFORMS or JAX's choice)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_intermixed_args(argv)

    from jaxllm.config import load_config
    from jaxllm.model.transformer import count_params
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
        small = n > args.max_params * 1e6
        run_cfg = small_variant(cfg) if small else cfg
        start = time.perf_counter()
        loss, grad_norm = forward_backward(run_cfg)
        ok = math.isfinite(loss) and math.isfinite(grad_norm)
        failed |= not ok
        check = (f"{'ok' if ok else 'FAILED'}{' (small variant, width 64)' if small else ''}: loss {loss:.4f} "
                 f"(ln V = {math.log(run_cfg.model.vocab_size):.4f}), grad norm {grad_norm:.4f}, "
                 f"{time.perf_counter() - start:.1f}s")
        print(f"{name:28s} {n / 1e6:9.2f}M  {check}", flush=True)
    return 1 if failed else 0
