"""Backend choice: cpu, cuda, tpu or metal, through JAX's platform setting.

`select_platform(name)` must run before JAX initialises its backends (the CLIs call it first).
`None` leaves the choice to `JAX_PLATFORMS` or JAX's own default.
"""
from __future__ import annotations

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
