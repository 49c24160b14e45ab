"""Meshes, the logical-axis table, and sharded training equal to one device (8 simulated CPUs)."""
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import load_config
from jaxllm.errors import ConfigError
from jaxllm.sharding import logical_to_spec, make_mesh, parse_mesh_spec
from jaxllm.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "train.max_steps=10", "train.warmup_steps=2", "train.lr=3e-3", "model.max_seq_len=32", "train.seq_len=32"]


def test_mesh_spec_fills_the_free_axis_and_defaults_the_rest_to_one():
    assert parse_mesh_spec("data:2,fsdp:-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    assert parse_mesh_spec("tensor:8", 8) == {"data": 1, "fsdp": 1, "tensor": 8, "expert": 1}


@pytest.mark.parametrize("spec, message", [
    ("data:3", "uses 3 devices but there are 8"), ("data:-1,fsdp:-1", "at most one axis"),
    ("pipeline:2", "bad entry 'pipeline:2'"), ("data:x", "not an integer"), ("data:3,fsdp:-1", "do not divide"),
])
def test_bad_mesh_specs_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_mesh_spec(spec, 8)
    assert "\n" not in str(e.value)


def test_rules_split_dimensions_that_divide_and_replicate_the_rest():
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed"), (65, 64), mesh) == P(None, "fsdp")  # 65 % 2 != 0
    assert logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)  # a mesh axis once
    assert logical_to_spec(("norm",), (64,), mesh) == P(None)
    assert logical_to_spec(None, (), mesh) == P()


def losses_and_params(cfg, mesh, batches):
    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh)
        losses = []
        for batch in batches:
            trainer.state, loss, *_ = trainer.train_step(trainer.state, trainer.put(batch))
            losses.append(float(loss))
    return np.array(losses), trainer


def random_batches(vocab, n=5, batch=8, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32) for _ in range(n)]


STRATEGIES = {  # spec -> (a parameter path, the spec it must get)
    "data:8": (("embed_tokens", "weight"), P(None, None)),
    "fsdp:8": (("layers", 0, "mlp", "up_proj", "weight"), P("fsdp", None)),
    "tensor:4,data:2": (("layers", 0, "attn", "q_proj", "weight"), P(None, "tensor", None)),
    "data:2,fsdp:2,tensor:2": (("layers", 0, "mlp", "down_proj", "weight"), P("tensor", "fsdp")),
}


def _value(state, path):
    node = state
    for key in path:
        node = node[key]
    return node[...]


@pytest.fixture(scope="module")
def one_device_losses():
    cfg = load_config(ROOT / "configs/tiny-gpt.yaml", TINY)
    batches = random_batches(cfg.model.vocab_size)
    return cfg, batches, losses_and_params(cfg, make_mesh("data:1", jax.devices()[:1]), batches)[0]


@pytest.mark.parametrize("spec", list(STRATEGIES))
def test_every_strategy_trains_like_one_device(spec, one_device_losses):
    cfg, batches, expected = one_device_losses
    got, trainer = losses_and_params(cfg, make_mesh(spec), batches)
    path, want_spec = STRATEGIES[spec]
    assert _value(trainer.state[0], path).sharding.spec == want_spec
    assert expected[-1] < expected[0]  # it learns
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_expert_parallel_moe_trains_like_one_device():
    overrides = TINY + ["model.moe.n_routed_experts=4", "model.moe.num_experts_per_tok=2",
                        "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001", "model.mlp.kind=swiglu"]
    cfg = load_config(ROOT / "configs/tiny-gpt.yaml", overrides)
    batches = random_batches(cfg.model.vocab_size)
    expected, _ = losses_and_params(cfg, make_mesh("data:1", jax.devices()[:1]), batches)
    got, trainer = losses_and_params(cfg, make_mesh("expert:4,data:2"), batches)
    experts = _value(trainer.state[0], ("layers", 0, "mlp", "experts", "up_proj"))
    assert experts.sharding.spec[0] == "expert"
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_the_state_built_eagerly_equals_the_jitted_build_in_values_and_layout():
    """Trainer builds its state eagerly when it fits one device (start-up compiles a handful of small
    programs instead of one with ~130 kernels a layer) and jitted with out_shardings otherwise; both
    give the same state laid out the same way, on a mesh that splits it (fsdp x tensor)."""
    from flax import nnx

    from jaxllm.model import Transformer
    from jaxllm.sharding import build_state, fits_one_device, state_shardings

    cfg = load_config(ROOT / "configs/tiny-llama.yaml", ["model.n_layer=2"])
    mesh = make_mesh("fsdp:4,tensor:2")
    create = lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))  # noqa: E731
    with jax.set_mesh(mesh):
        abstract = nnx.state(nnx.eval_shape(create))
        shardings = state_shardings(abstract, mesh)
        eager = build_state(create, abstract, shardings, mesh, eager=True)
        jitted = build_state(create, abstract, shardings, mesh, eager=False)
    assert fits_one_device(abstract, jax.devices()[0])  # a CPU reports no memory limit
    small_gpu = type("Device", (), {"memory_stats": lambda self: {"bytes_limit": 2**20}})()
    assert not fits_one_device(abstract, small_gpu)  # the state (0.5 MiB) is over a quarter of 1 MiB
    flat_eager, flat_jitted = nnx.to_flat_state(eager), nnx.to_flat_state(jitted)
    assert [path for path, _ in flat_eager] == [path for path, _ in flat_jitted]
    split = 0
    for (path, a), (_, b) in zip(flat_eager, flat_jitted):
        a, b = a[...], b[...]
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), path
        split += a.sharding.spec != P(*[None] * a.ndim)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        # the same draws; a fused multiply-add may round the last bit differently
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9, err_msg=str(path))
    assert split >= 4  # the comparison covered arrays actually split over the mesh


def test_an_eagerly_built_state_gives_every_leaf_its_own_buffer():
    """The train step donates its state, so two leaves sharing a buffer (an EMA clone's weights
    share its model's until copied) would be donated twice: XLA crashed (segfault) in TRM training
    before build_state copied them."""
    from flax import nnx

    from jaxllm.model import Transformer
    from jaxllm.sharding import build_state, state_shardings

    cfg = load_config(ROOT / "configs/tiny-llama.yaml", ["model.n_layer=1"])
    mesh = make_mesh("fsdp:4,tensor:2")

    def create():
        model = Transformer(cfg.model, rngs=nnx.Rngs(0))
        return model, nnx.clone(model)

    with jax.set_mesh(mesh):
        abstract = nnx.state(nnx.eval_shape(create))
        state = build_state(create, abstract, state_shardings(abstract, mesh), mesh, eager=True)
    buffers = [shard.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)
               for shard in leaf.addressable_shards]
    assert len(buffers) == len(set(buffers)) > 0
