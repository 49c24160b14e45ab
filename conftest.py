"""Test environment, set before jax or torch is imported anywhere."""
import gc
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "disabled")

try:  # grain workers read absl flags (google/grain#1355); harmless when absl is absent
    from absl import flags

    flags.FLAGS.mark_as_parsed()
except ImportError:
    pass


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
    mappings, limit = _memory_mappings()
    if limit and mappings > limit // 2:  # a file that alone nears the limit: say which, before it crashes
        import warnings

        warnings.warn(f"this worker holds {mappings} memory mappings after clearing jax's caches "
                      f"(vm.max_map_count is {limit}): something keeps compiled executables alive")


def _memory_mappings() -> tuple[int, int]:
    """(this process's memory mappings, the kernel's limit); (0, 0) where /proc does not say."""
    try:
        with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in maps), int(limit.read())
    except (OSError, ValueError):
        return 0, 0
