"""Backend choice: cpu, cuda, tpu or metal, through JAX's platform setting.

`select_platform(name)` must run before JAX initialises its backends (the CLIs call it first).
`None` leaves the choice to `JAX_PLATFORMS` or JAX's own default.

`split_cpu(cfg, name)`, also before JAX starts, makes training on the CPU data-parallel over its
cores: XLA:CPU runs a small model's many small ops on one or two threads each, so one device per
core running its share of the batch beats one device running the whole batch (docs/perf.md,
"One device per core").
"""
from __future__ import annotations

import importlib.metadata
import math
import os

from jaxllm.errors import PlatformError

# What provides each backend, for the error message when it is missing.
PROVIDERS = {
    "cpu": "jax (already a dependency)",
    "cuda": "jax[cuda12] or jax[cuda13]: pip install -U 'jax[cuda12]'",
    "tpu": "jax[tpu]: pip install -U 'jax[tpu]'",
    "metal": "jax-metal: pip install jax-metal (Apple silicon)",
}


def select_platform(name: str | None) -> str:
    """Make `name` JAX's backend and return the backend JAX reports."""
    import jax

    if name is None:
        name = os.environ.get("JAX_PLATFORMS") or None
    if name is not None:
        name = name.lower()
        if name not in PROVIDERS:
            raise PlatformError(f"unknown platform {name!r}; allowed: {', '.join(PROVIDERS)}")
        os.environ["JAX_PLATFORMS"] = name
        jax.config.update("jax_platforms", name)
    try:
        backend = jax.default_backend().lower()
    except Exception:  # jax raises AssertionError or RuntimeError, often without a message
        raise PlatformError(f"platform {name!r} is not available here; it is provided by {PROVIDERS[name]}") from None
    if name is not None and backend != name:
        raise PlatformError(f"platform {name!r} was asked for, but JAX already runs on {backend!r}; "
                            "choose it before JAX starts (--platform or JAX_PLATFORMS)")
    return backend


# Most devices the automatic split makes: it was measured on 2 cores only (docs/perf.md).
MAX_AUTO_CPU_DEVICES = 8
# Bytes per parameter of one replica of the float32 AdamW state: parameter, gradient, two moments.
STATE_BYTES_PER_PARAM = 16
# Distributions that give JAX an accelerator backend: with one installed, JAX's default is not the CPU.
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jax-metal")


def choose_cpu_devices(requested: int | None, micro_batches: list[int], mesh_spec: str, cores: int,
                       state_bytes, memory_bytes: int, per_core: bool = True) -> int:
    """How many CPU devices a training run gets. `requested` (train.cpu_devices) wins when set. A
    mesh spec with fixed sizes above 1 (data:2,fsdp:-1) gets their product, so that it fits.
    Otherwise (data:-1): one per core, at most MAX_AUTO_CPU_DEVICES, and only as many as divide
    every micro-batch and leave every replica of the state (`state_bytes()`, called only when
    needed) within a quarter of `memory_bytes`; `per_core=False` (a TRM run) keeps one device there."""
    if requested is not None:
        return requested
    from jaxllm.config import mesh_axes

    fixed = math.prod(size for size in mesh_axes(mesh_spec).values() if size > 1)
    if fixed > 1 or not per_core:
        return fixed
    common = math.gcd(*micro_batches)
    counts = [d for d in range(1, min(cores, MAX_AUTO_CPU_DEVICES) + 1) if common % d == 0]
    if counts[-1] == 1:
        return 1
    replica = state_bytes()
    return max(d for d in counts if d == 1 or d * replica <= memory_bytes // 4)


def _runs_on_cpu(name: str | None) -> bool:
    """Whether JAX will pick the CPU: asked for, or the default with no accelerator plugin installed."""
    name = name or os.environ.get("JAX_PLATFORMS")
    if name:
        return name.split(",")[0].strip().lower() == "cpu"
    installed = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().startswith(ACCELERATOR_PLUGINS) for n in installed)


def split_cpu(cfg, name: str | None = None, micro_batches: list[int] | None = None) -> int:
    """Before JAX starts: when the run will be on the CPU, make JAX's CPU backend as many devices as
    `choose_cpu_devices` says (`train.mesh` 'data:-1' then spreads the batch over them). Returns
    that count; 1 when nothing changed: another platform, several processes, or a CPU device count
    already fixed by XLA_FLAGS (--xla_force_host_platform_device_count) or JAX_NUM_CPU_DEVICES."""
    import jax

    fixed = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if fixed or "JAX_NUM_CPU_DEVICES" in os.environ or not _runs_on_cpu(name):
        return 1
    t = cfg.train
    if micro_batches is None:
        micro_batches = [s.batch_size // t.grad_accum for s in t.curriculum] or [t.batch_size // t.grad_accum]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def state_bytes() -> int:
        from jaxllm.model.transformer import count_params

        return STATE_BYTES_PER_PARAM * count_params(cfg.model)

    # TRM's step keeps XLA's partitioning, whose all-reduce made it slower on 2 devices (docs/perf.md)
    n = choose_cpu_devices(t.cpu_devices, micro_batches, t.mesh, cores, state_bytes, memory,
                           per_core=not cfg.model.trm.enabled)
    if n > 1:
        jax.config.update("jax_num_cpu_devices", n)
    return n
