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
