"""Test environment, set before jax or torch is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "disabled")

try:  # grain workers read absl flags (google/grain#1355); harmless when absl is absent
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except ImportError:
    pass


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drop every compiled XLA executable after each test file.

    Each XLA:CPU executable keeps its JIT-compiled code in several memory mappings, and jax's
    jit caches keep every executable alive. A long-lived xdist worker ran ~1,000 tests and
    reached Linux's `vm.max_map_count` (65,530 mappings) at 80-98% of the suite; the next
    compile then segfaulted or aborted inside `backend_compile_and_load`, or a thread hung
    (measured 2026-12-05: one worker at 64,996 mappings seconds before its segfault). Clearing
    after each file keeps a worker near 700 mappings and costs no measurable time, because test
    files rarely share compiled functions. docs/status.md has the investigation.
    """
    yield
    import jax

    jax.clear_caches()
    gc.collect()
