"""The TRM's gradient walls (papers.md §2.1): the carried (y, z) takes no gradient, the T - 1
no-gradient cycles contribute none, nothing flows back across supervision steps, `solve` is the
steps one by one, and mode 'plain' ignores the carry. Each wall is checked against a control that
shows the quantity it zeroes would not be zero without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import config_from_dict
from jaxllm.model.losses import trm_loss
from jaxllm.model.trm import TRM, TRUNCATED_NORMAL_STD, solve

B, L, V = 2, 9, 12
H_CYCLES, L_CYCLES = 3, 2


def model_config(mode="recursive", mixer="attention", d_model=32):
    return config_from_dict({"model": dict(
        vocab_size=V, d_model=d_model, n_layer=2, max_seq_len=L, position=dict(kind="rope"),
        norm=dict(kind="rmsnorm", eps=1e-5), attention=dict(n_head=2), mlp=dict(kind="swiglu", d_ff=64),
        init_std=0.1, trm=dict(enabled=True, mode=mode, mixer=mixer, h_cycles=H_CYCLES, l_cycles=L_CYCLES,
                               n_sup=1 if mode == "plain" else 4))}).model


def make_model(mode="recursive", mixer="attention", seed=0) -> TRM:
    model = TRM(model_config(mode, mixer), rngs=nnx.Rngs(seed))
    # a live halting head (it starts at weight 0), so q_halt depends on y
    model.q_head.weight[...] = 0.3 * jax.random.normal(jax.random.key(seed + 10), model.q_head.weight.shape)
    return model


def puzzle(seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, V, (B, L))), jnp.asarray(rng.integers(0, V, (B, L)))


def step_loss(model, tokens, y, z, labels, h_cycles=None):
    out = model(tokens, y, z, h_cycles=h_cycles)
    return trm_loss(out.logits, out.q_halt, labels)[0]


# compiled once per model structure, shared by the tests
forward = nnx.jit(lambda model, tokens, y, z, h_cycles=None: model(tokens, y, z, h_cycles=h_cycles),
                  static_argnames="h_cycles")
loss_of_step = nnx.jit(step_loss, static_argnames="h_cycles")
grad_of_params = nnx.jit(nnx.grad(step_loss), static_argnames="h_cycles")
grad_of_carry = nnx.jit(nnx.grad(step_loss, argnums=(2, 3)), static_argnames="h_cycles")


def carried_state(model, tokens):
    """A non-trivial carry: (y, z) after one supervision step from the initial state."""
    out = forward(model, tokens, *model.initial_state(B))
    return out.y, out.z


def max_rel(a, b) -> float:
    """The largest difference of two gradient states relative to the largest entry of b."""
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return diff / max(float(jnp.abs(y).max()) for y in jax.tree.leaves(b))


@pytest.mark.parametrize("h_cycles", [1, H_CYCLES])
def test_the_carried_state_takes_no_gradient(h_cycles):
    model = make_model()
    tokens, labels = puzzle()
    y, z = carried_state(model, tokens)
    gy, gz = grad_of_carry(model, tokens, y, z, labels, h_cycles=h_cycles)
    assert np.all(np.asarray(gy) == 0) and np.all(np.asarray(gz) == 0)
    # control: the step's loss does depend on the carry, and without the stop-gradient (one latent
    # recursion from the carry, by hand) its gradient is far from zero
    assert abs(float(loss_of_step(model, tokens, y, z, labels, h_cycles=h_cycles))
               - float(loss_of_step(model, tokens, y[::-1], z[::-1], labels, h_cycles=h_cycles))) > 1e-3

    def unguarded(y, z):
        y_new, _ = model.latent_recursion(model.embed(tokens), y, z, L_CYCLES)
        return jnp.sum(model.lm_head("BLD,DV->BLV", y_new[:, 1:]) ** 2)

    gy_free, gz_free = jax.jit(jax.grad(unguarded, argnums=(0, 1)))(y, z)
    assert float(jnp.abs(gy_free).max()) > 1e-4 and float(jnp.abs(gz_free).max()) > 1e-4


def test_the_no_gradient_cycles_contribute_no_gradient():
    """The gradient of a step of T cycles is that of a one-cycle step started from the (y, z) the
    first T - 1 cycles reach; the full backpropagation through all T cycles differs from it."""
    model = make_model()
    tokens, labels = puzzle()
    y, z = carried_state(model, tokens)
    g_full_step = grad_of_params(model, tokens, y, z, labels, h_cycles=H_CYCLES)
    warm = forward(model, tokens, y, z, h_cycles=H_CYCLES - 1)
    g_last_cycle = grad_of_params(model, tokens, warm.y, warm.z, labels, h_cycles=1)
    assert max_rel(g_full_step, g_last_cycle) <= 1e-5

    def bptt_loss(model):  # every cycle with gradient (what the no-grad cycles must not do)
        x, yy, zz = model.embed(tokens), y, z
        for _ in range(H_CYCLES):
            yy, zz = model.latent_recursion(x, yy, zz, L_CYCLES)
        logits = model.lm_head("BLD,DV->BLV", yy[:, 1:]).astype(jnp.float32)
        return trm_loss(logits, model.q_head("BD,DQ->BQ", yy[:, 0])[:, 0], labels)[0]

    g_bptt = nnx.jit(nnx.grad(bptt_loss))(model)
    assert max_rel(g_bptt, g_last_cycle) > 1e-2


def test_solve_is_the_steps_one_by_one():
    model = make_model()
    tokens, _ = puzzle()
    n_sup = 4
    predictions, q_halt = nnx.jit(solve, static_argnames="n_sup")(model, tokens, n_sup=n_sup)
    assert predictions.shape == (n_sup, B, L) and predictions.dtype == jnp.int32
    assert q_halt.shape == (n_sup, B) and q_halt.dtype == jnp.float32
    y, z = model.initial_state(B)
    for i in range(n_sup):
        out = forward(model, tokens, y, z)
        y, z = out.y, out.z
        np.testing.assert_array_equal(predictions[i], jnp.argmax(out.logits, -1))
        np.testing.assert_allclose(q_halt[i], out.q_halt, rtol=1e-5, atol=1e-6)
    # the steps are not all alike: the carry moves the answer state on
    assert not np.allclose(q_halt[0], q_halt[-1], atol=1e-4)


def test_no_gradient_flows_back_across_supervision_steps():
    """Step 2's loss has exactly zero gradient on the parameters step 1 used (a second copy of
    the model runs step 1), although step 1's parameters change step 2's loss; differentiating
    two steps through one model equals differentiating the second step alone."""
    model = make_model()
    first = nnx.clone(model)
    tokens, labels = puzzle()
    init = model.initial_state(B)

    def two_steps(first, second, tokens, labels):
        out = first(tokens, *init)
        return step_loss(second, tokens, out.y, out.z, labels)

    g_first = nnx.jit(nnx.grad(two_steps))(first, model, tokens, labels)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_first))
    # control: step 1's parameters do reach step 2's value
    moved = nnx.clone(model)
    moved.layers[0].mlp.up_proj.weight[...] *= 1.5
    loss2 = nnx.jit(two_steps)
    assert abs(float(loss2(first, model, tokens, labels)) - float(loss2(moved, model, tokens, labels))) > 1e-4

    g_two = nnx.jit(nnx.grad(lambda m, t, lab: two_steps(m, m, t, lab)))(model, tokens, labels)
    y1, z1 = carried_state(model, tokens)
    g_second = grad_of_params(model, tokens, y1, z1, labels)
    assert max_rel(g_two, g_second) <= 1e-5


def test_plain_mode_ignores_the_carry():
    tokens, labels = puzzle()
    plain = make_model("plain")
    y, z = plain.initial_state(B)
    y2, z2 = jax.random.normal(jax.random.key(5), y.shape), jax.random.normal(jax.random.key(6), z.shape)
    a, b = forward(plain, tokens, y, z), forward(plain, tokens, y2, z2)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.q_halt, b.q_halt)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_allclose(a.y, nnx.jit(lambda m, t: m.core(m.embed(t)))(plain, tokens), rtol=1e-6, atol=1e-6)
    gy, gz = grad_of_carry(plain, tokens, y2, z2, labels)
    assert np.all(np.asarray(gy) == 0) and np.all(np.asarray(gz) == 0)
    # control: the same weights in recursive mode do read the carry
    recursive = make_model("recursive")
    c, d = forward(recursive, tokens, y, z), forward(recursive, tokens, y2, z2)
    assert float(jnp.abs(c.logits - d.logits).max()) > 1e-3


def test_the_initial_state_is_the_official_truncated_normal_of_std_1():
    """H_init, L_init as the official trunc_normal_init_(std=1): std 1, cut at 2 / 0.8796 = 2.27
    (not jax.random.truncated_normal's std 0.88, cut at 2)."""
    model = TRM(model_config(d_model=512), rngs=nnx.Rngs(0))
    state = np.asarray(model.init_state[...])
    assert state.shape == (2, 512)
    assert 0.93 < state.std() < 1.07
    assert 2.0 < np.abs(state).max() <= 2.0 / TRUNCATED_NORMAL_STD
    y, z = model.initial_state(B)
    assert y.shape == z.shape == (B, 1 + L, 512)
    np.testing.assert_array_equal(y, np.broadcast_to(state[0], y.shape))
    np.testing.assert_array_equal(z, np.broadcast_to(state[1], z.shape))
