"""Training on the CPU is data-parallel over its cores: `jaxllm.platform.split_cpu` picks the
device count (train.cpu_devices, or one per core that the batch and memory allow) before JAX starts."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import load_config
from jaxllm.errors import ConfigError
from jaxllm.platform import MAX_AUTO_CPU_DEVICES, choose_cpu_devices, split_cpu
from tests.test_train import ROOT, corpus  # noqa: F401 (a fixture: about 40k characters of varied text)

GiB = 2**30


def never():  # the state's size, where the choice must not need it
    raise AssertionError("state_bytes was called")


@pytest.mark.parametrize("requested, batches, mesh, cores, expected", [
    (None, [12], "data:-1", 2, 2),                 # nanogpt-cpu on the 2-core machines here
    (None, [12], "data:-1", 1, 1),                 # one core: nothing to split
    (None, [7], "data:-1", 2, 1),                  # an odd batch cannot be halved
    (None, [12], "data:-1", 8, 6),                 # the largest divisor of the batch within the cores
    (None, [64], "data:-1", 32, MAX_AUTO_CPU_DEVICES),  # capped: measured on 2 cores only
    (None, [8, 6], "data:-1", 8, 2),               # every curriculum stage's micro-batch divides
    (None, [12], "fsdp:-1", 2, 2),                 # any axis of size -1 takes the devices
    (None, [12], "data:4", 8, 4),                  # an explicit mesh gets the devices it names
    (None, [12], "data:2,fsdp:-1,tensor:2", 2, 4),  # (the fixed sizes' product; the -1 axis gets 1)
    (3, [12], "data:4", 8, 3),                     # train.cpu_devices wins
])
def test_device_count_follows_cores_batch_and_mesh(requested, batches, mesh, cores, expected):
    state = (lambda: 1) if expected > 1 and requested is None else never
    assert choose_cpu_devices(requested, batches, mesh, cores, state, 64 * GiB) == expected


def test_a_run_that_does_not_split_per_core_keeps_one_device_unless_told():
    assert choose_cpu_devices(None, [32], "data:-1", 8, never, 64 * GiB, per_core=False) == 1
    assert choose_cpu_devices(None, [32], "data:2", 8, never, 64 * GiB, per_core=False) == 2
    assert choose_cpu_devices(4, [32], "data:-1", 8, never, 64 * GiB, per_core=False) == 4


def test_replicas_must_fit_a_quarter_of_memory():
    # 12 sequences, 8 cores: 6 replicas of a 1 GiB state need 6 GiB; 16 GiB allows 4 GiB of state
    assert choose_cpu_devices(None, [12], "data:-1", 8, lambda: GiB, 16 * GiB) == 4
    assert choose_cpu_devices(None, [12], "data:-1", 8, lambda: 3 * GiB, 16 * GiB) == 1
    assert choose_cpu_devices(None, [12], "data:-1", 8, lambda: GiB, 64 * GiB) == 6


def test_a_device_count_fixed_by_the_environment_is_kept():
    # conftest fixes 8 host devices through XLA_FLAGS, and JAX has started: split_cpu must not touch it
    assert "xla_force_host_platform_device_count" in os.environ["XLA_FLAGS"]
    cfg = load_config(ROOT / "configs/nanogpt-cpu.yaml", ["train.cpu_devices=2"])
    assert split_cpu(cfg, "cpu") == 1
    assert len(jax.devices("cpu")) == 8


def test_cpu_devices_setting_is_validated():
    with pytest.raises(ConfigError, match=r"train.cpu_devices=0 is invalid: must be an integer >= 1"):
        load_config(ROOT / "configs/nanogpt-cpu.yaml", ["train.cpu_devices=0"])


@pytest.mark.parametrize("devices", [1, 2])
def test_train_py_runs_data_parallel_over_the_cpu_devices(devices, corpus, tmp_path):  # noqa: F811
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "WANDB_MODE": "disabled"}
    argv = ["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--run-dir", str(tmp_path / "run"), "--no-progress",
            "model.n_layer=1", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
            "train.max_steps=3", "train.warmup_steps=1", "train.eval_batches=1", "train.eval_every=3",
            "train.sample_every=0", f"train.data={corpus}", f"train.cpu_devices={devices}"]
    result = subprocess.run([sys.executable, "scripts/train.py", *argv], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"mesh {{'data': {devices}, 'fsdp': 1, 'tensor': 1, 'expert': 1}}" in result.stdout, result.stdout
    assert "done: step 3" in result.stdout


# --- the train step's per-device gradients (jaxllm.train.parallel) ---------------------------

def small_trainers(*overrides, mesh_spec="data:4"):
    """Two Trainers of one tiny config on a CPU data mesh: the per-device step and XLA's own
    partitioning of the same step."""
    from jaxllm.sharding import make_mesh
    from jaxllm.train.loop import Trainer

    cfg = load_config(ROOT / "configs/nanogpt-cpu.yaml", ["model.n_layer=2", "model.d_model=64", "train.batch_size=8",
                                                          "train.seq_len=16", f"train.mesh={mesh_spec}", *overrides])
    mesh = make_mesh(cfg.train.mesh, jax.devices()[:4])
    with jax.set_mesh(mesh):
        by_hand, by_xla = Trainer(cfg, mesh), Trainer(cfg, mesh)
    by_xla.per_device = False  # read when the step is traced, at its first call
    return cfg, mesh, by_hand, by_xla


def test_per_device_gradients_are_chosen_for_cpu_data_meshes_without_experts():
    from jaxllm.sharding import make_mesh
    from jaxllm.train.parallel import per_device_gradients

    cfg = load_config(ROOT / "configs/nanogpt-cpu.yaml")
    four = jax.devices()[:4]
    assert per_device_gradients(make_mesh("data:4", four), cfg.model)
    assert not per_device_gradients(make_mesh("data:1", four[:1]), cfg.model)  # nothing to average
    assert not per_device_gradients(make_mesh("fsdp:4", four), cfg.model)  # sharded parameters: XLA's job
    assert not per_device_gradients(make_mesh("data:2,tensor:2", four), cfg.model)
    moe = load_config(ROOT / "configs/tiny-llama.yaml", ["model.moe.n_routed_experts=4",
                                                         "model.moe.num_experts_per_tok=2"])
    assert not per_device_gradients(make_mesh("data:4", four), moe.model)


def test_per_device_step_equals_xlas_partitioned_step():
    cfg, mesh, by_hand, by_xla = small_trainers()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.model.vocab_size, (8, 17), dtype=np.int32) for _ in range(3)]
    with jax.set_mesh(mesh):
        for batch in batches:
            by_hand.state, loss_hand, norm_hand, _ = by_hand.train_step(by_hand.state, by_hand.put(batch))
            by_xla.state, loss_xla, norm_xla, _ = by_xla.train_step(by_xla.state, by_xla.put(batch))
            assert abs(float(loss_hand) - float(loss_xla)) < 1e-5
            assert abs(float(norm_hand) - float(norm_xla)) < 1e-5 * float(norm_xla)
    hand, xla = jax.tree.leaves(by_hand.state), jax.tree.leaves(by_xla.state)
    assert len(hand) == len(xla)
    for a, b in zip(hand, xla):  # parameters, moments, step counters and RNG counters alike
        if jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
            assert float(jax.numpy.max(jax.numpy.abs(a - b))) < 1e-5
        elif not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert (np.asarray(a) == np.asarray(b)).all()
    assert {str(a.sharding.spec) for a in hand} == {str(b.sharding.spec) for b in xla}


def test_each_device_draws_its_own_randomness():
    """With dropout, the devices' masks must differ (their keys are folded with the device index):
    four devices with one identical row each and p = 0.5 give per-feature gradients averaging four
    masks, so values strictly between 0 and 2 appear; identical masks would give only 0 or 2."""
    import jax.numpy as jnp

    from jaxllm.sharding import make_mesh
    from jaxllm.train.parallel import value_and_grad_per_device

    class Probe(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((1000,)))
            self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))

        def __call__(self, rows):
            return jnp.mean(jnp.sum(self.dropout(jnp.ones((rows.shape[0], 1000))) * self.w[...], axis=1))

    mesh = make_mesh("data:4", jax.devices()[:4])
    probe, rows = Probe(), jnp.zeros((4, 1))
    with jax.set_mesh(mesh):
        step = nnx.jit(lambda m, r: value_and_grad_per_device(lambda m, b: m(b), m, nnx.Param, r, mesh))
        _, first = step(probe, rows)
        _, second = step(probe, rows)
    values = np.asarray(first["w"][...])
    assert set(np.unique(values)) <= {0.0, 0.5, 1.0, 1.5, 2.0}
    assert np.mean((values > 0) & (values < 2)) > 0.5  # independent masks: 7/8 of features in expectation
    assert not np.array_equal(values, np.asarray(second["w"][...]))  # the RNG counter moved on


def test_per_device_step_with_dropout_advances_the_rng_counters_as_xlas_step_does():
    cfg, mesh, by_hand, by_xla = small_trainers("model.dropout=0.1", "model.mlp.dropout=0.1")
    batch = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, 17), dtype=np.int32)
    with jax.set_mesh(mesh):
        for _ in range(2):
            by_hand.state, loss_hand, *_ = by_hand.train_step(by_hand.state, by_hand.put(batch))
            by_xla.state, loss_xla, *_ = by_xla.train_step(by_xla.state, by_xla.put(batch))
    assert np.isfinite(float(loss_hand)) and abs(float(loss_hand) - float(loss_xla)) < 0.1 * float(loss_xla)
    counts = lambda state: [int(c) for c in jax.tree.leaves(nnx.state(nnx.merge(by_hand.graphdef, state)[0],  # noqa: E731
                                                                        nnx.RngCount))]
    assert counts(by_hand.state) == counts(by_xla.state) and max(counts(by_hand.state)) >= 2  # two steps drew
