"""The RecursiveBlock: drawn loop counts in training only, remat changing nothing but memory,
and one-line config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import config_from_dict
from jaxllm.errors import ConfigError
from jaxllm.model import Transformer, lm_loss


def model_config(remat=False, **recursion):
    return config_from_dict({"model": dict(
        vocab_size=64, d_model=32, n_layer=3, max_seq_len=64, attention=dict(n_head=2), position=dict(kind="rope"),
        norm=dict(kind="rmsnorm"), init_std=0.2, remat=remat,
        recursion={"mode": "loop", "n_prelude": 1, "n_core": 1, **recursion})}).model


def test_drawn_loop_counts_follow_poisson_lognormal_in_training_only():
    model = Transformer(model_config(n_loops=6, n_grad_loops=2, random_loops=True), rngs=nnx.Rngs(0))
    recursion = model.recursion
    assert recursion.loop_counts() == (4, None)  # eval: always n_loops, the last 2 with gradient
    model.train()
    draws = [tuple(int(v) for v in recursion.loop_counts()) for _ in range(3000)]
    no_grad, with_grad = np.array(draws).T
    total = no_grad + with_grad
    # Poisson(LogNormal(ln 6 - 1/8, 1/2)) + 1 has mean 6 + 1 and variance 6 + 36 (e^(1/4) - 1)
    assert total.mean() == pytest.approx(7.0, abs=0.25)
    assert total.var() == pytest.approx(6 + 36 * (np.exp(0.25) - 1), rel=0.2)
    assert total.min() >= 1 and np.all(with_grad == np.minimum(total, 2))


def test_training_with_drawn_loop_counts_differs_per_step_and_is_deterministic_in_eval():
    model = Transformer(model_config(n_loops=3, n_grad_loops=2, random_loops=True), rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    loss = nnx.jit(lambda m, t: lm_loss(m, t[:, :-1], t[:, 1:]))
    evals = {float(loss(model, tokens)) for _ in range(3)}
    model.train()
    trains = {float(loss(model, tokens)) for _ in range(6)}
    assert len(evals) == 1 and len(trains) > 1


@pytest.mark.parametrize("mode", ["loop", "trm"])
def test_remat_changes_neither_loss_nor_gradients(mode):
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
    results = []
    for remat in (False, True):
        cfg = model_config(remat, mode=mode, n_loops=3, n_grad_loops=2, n_latent_steps=2, inject="concat")
        model = Transformer(cfg, rngs=nnx.Rngs(3))
        loss, grads = nnx.jit(nnx.value_and_grad(lm_loss))(model, tokens[:, :-1], tokens[:, 1:])
        results.append((loss, grads))
    (l0, g0), (l1, g1) = results
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fields,needle", [
    (dict(n_core=3), "model.recursion.n_core=3"),
    (dict(n_loops=2, n_grad_loops=3), "model.recursion.n_grad_loops=3"),
    (dict(n_loops=0), "model.recursion.n_loops=0"),
    (dict(mode="spiral"), "model.recursion.mode"),
    (dict(inject="multiply"), "model.recursion.inject"),
])
def test_bad_recursion_settings_are_one_line_errors(fields, needle):
    with pytest.raises(ConfigError) as e:
        model_config(**fields)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_layerdrop_with_recursion_is_refused():
    with pytest.raises(ConfigError, match="model.layerdrop"):
        config_from_dict({"model": dict(layerdrop=0.1, recursion=dict(mode="loop"))})
