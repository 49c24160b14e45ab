"""jaxllm vs torch_ref on the RecursiveBlock: looped cores (add / concat injection; zeros,
embedding or random initial state; prelude and coda) and the TRM pattern, with fixed loop
counts and truncated gradients; and the proof that the no-gradient loops carry no gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxllm.model import lm_loss
from jaxllm.model.params import Buffer
from parity_tests.harness import compare, make_pair, tiny_config

ROPE = dict(position=dict(kind="rope"), norm=dict(kind="rmsnorm", eps=1e-6), mlp=dict(kind="swiglu", d_ff=96))
CASES = {
    "loop-add-zeros": dict(n_layer=1, recursion=dict(mode="loop", n_core=1, n_loops=4)),
    "loop-concat-embedding-truncated": dict(n_layer=3, recursion=dict(mode="loop", n_prelude=1, n_core=1, n_loops=4,
                                                                      n_grad_loops=2, inject="concat", init="embedding")),
    "loop-random-init-two-core-layers-remat": dict(n_layer=3, remat=True, recursion=dict(
        mode="loop", n_core=2, n_loops=3, n_grad_loops=1, init="random")),
    "trm-add-random": dict(n_layer=2, recursion=dict(mode="trm", n_core=1, n_loops=3, n_grad_loops=1, n_latent_steps=2,
                                                     init="random")),
    "trm-concat-zeros-all-grad": dict(n_layer=2, recursion=dict(mode="trm", n_prelude=1, n_core=1, n_loops=2,
                                                                n_latent_steps=2, inject="concat")),
    "loop-moe-core": dict(n_layer=2, moe=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              aux_loss_coef=0.01, z_loss_coef=0.001),
                          recursion=dict(mode="loop", n_prelude=1, n_core=1, n_loops=3, n_grad_loops=2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recursive_block_matches_torch_ref(name):
    report = compare(make_pair(tiny_config(**ROPE, **CASES[name]), seed=7))
    assert report.ok(), f"{name}: {report}"


@pytest.mark.parametrize("mode", ["loop", "trm"])
@pytest.mark.parametrize("n_grad_loops", [1, 3])
def test_loops_without_gradient_carry_none(mode, n_grad_loops):
    """The random initial state enters only the first loop: its gradient is exactly zero when that
    loop runs without gradient (n_grad_loops < n_loops) and nonzero when every loop has one."""
    recursion = dict(mode=mode, n_core=1, n_loops=3, n_grad_loops=n_grad_loops, n_latent_steps=2, init="random")
    pair = make_pair(tiny_config(**ROPE, n_layer=1, recursion=recursion), seed=3, seq=256)
    inputs, targets = jnp.asarray(pair.tokens[:, :-1]), jnp.asarray(pair.tokens[:, 1:])
    grads = nnx.jit(nnx.grad(lm_loss, argnums=nnx.DiffState(0, Buffer)))(pair.jax_model, inputs, targets)
    g_jax = np.asarray(grads["recursion"]["init_state"][...])

    init_state = pair.torch_model.recursion.init_state.requires_grad_(True)
    pair.torch_model.loss(torch.from_numpy(pair.tokens[:, :-1]), torch.from_numpy(pair.tokens[:, 1:])).backward()
    g_torch = np.zeros_like(g_jax) if init_state.grad is None else init_state.grad.numpy()
    if n_grad_loops < 3:
        assert np.all(g_jax == 0) and np.all(g_torch == 0)
    else:
        assert np.abs(g_jax).max() > 1e-6 and np.abs(g_torch).max() > 1e-6
        np.testing.assert_allclose(g_jax, g_torch, atol=1e-4 * np.abs(g_torch).max())
