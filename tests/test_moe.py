"""Unit tests of jaxllm's Mixture-of-Experts layer: losses against closed forms and numpy, the V3
bias update from the popped expert loads, capacity dropping, grouped (ragged_dot) vs dense
dispatch, the router noise, and what a forward records (training) or leaves untouched (eval)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import config_from_dict
from jaxllm.model import Transformer, lm_loss
from jaxllm.model.moe import ExpertLoad, MoE, pop_expert_load, router_losses, update_router_bias
from jaxllm.model.params import AuxLoss, pop_aux_losses


def moe_layer(d_model=8, seed=0, **moe) -> MoE:
    cfg = config_from_dict({"model": dict(d_model=d_model, n_layer=1, attention=dict(n_head=2),
                                          mlp=dict(kind="swiglu", d_ff=16),
                                          moe=dict(moe_intermediate_size=12, **moe))}).model
    return MoE(cfg, rngs=nnx.Rngs(seed))


def moe_model(seed=0, **model) -> Transformer:
    base = dict(vocab_size=64, d_model=16, n_layer=2, attention=dict(n_head=2), mlp=dict(kind="swiglu", d_ff=32))
    return Transformer(config_from_dict({"model": {**base, **model}}).model, rngs=nnx.Rngs(seed))


def aux_losses(layer: MoE) -> dict[str, float]:
    return {path[-1]: float(sum(jax.tree.leaves(v))) for path, v in nnx.to_flat_state(nnx.pop(layer, AuxLoss))}


def losses(layer: MoE, x) -> dict[str, float]:
    """The aux losses of the layer's routing of x [B, T, D], from `router_losses` directly."""
    routing = layer.route(jnp.asarray(x).reshape(-1, x.shape[-1]))
    return {name: float(value) for name, value in router_losses(layer.moe, routing).items()}


def picked_counts(layer: MoE, x) -> np.ndarray:
    idx = np.asarray(layer.route(jnp.asarray(x).reshape(-1, x.shape[-1])).idx)
    return np.bincount(idx.ravel(), minlength=layer.moe.n_routed_experts)


def set_router(layer: MoE, w: np.ndarray) -> None:
    layer.router.weight[...] = jnp.asarray(w, jnp.float32)


def test_balance_loss_is_one_under_uniform_routing_and_e_over_k_when_collapsed():
    E, k, X = 4, 2, 64
    layer = moe_layer(n_routed_experts=E, num_experts_per_tok=k, aux_loss_coef=1.0)
    # token t activates input dims t % 4 and (t + 1) % 4, and the router maps dim i to expert i:
    # each expert is picked by exactly kX/E tokens
    w = np.zeros((8, E))
    w[np.arange(E), np.arange(E)] = 0.5
    set_router(layer, w)
    x = np.zeros((1, X, 8), np.float32)
    t = np.arange(X)
    x[0, t, t % E] = 1.0
    x[0, t, (t + 1) % E] = 1.0
    np.testing.assert_array_equal(picked_counts(layer, x), np.full(E, k * X / E))
    assert losses(layer, x)["balance_loss"] == pytest.approx(1.0, rel=1e-6)
    # collapsed: every token picks experts 0 and 1 -> E/(kX) * sum_{i in {0,1}} X * P_i = E/k * (P_0 + P_1)
    x[0, t, :] = 0.0
    x[0, :, 0] = 6.0
    x[0, :, 1] = 5.0
    logits = x[0] @ w
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = E / k * (p[:, 0].mean() + p[:, 1].mean())
    assert losses(layer, x)["balance_loss"] == pytest.approx(expected, rel=1e-5)
    assert expected > 1.8  # near E/k = 2: the loss punishes collapse


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_z_loss_is_mean_squared_logsumexp_of_router_logits(router):
    layer = moe_layer(n_routed_experts=6, num_experts_per_tok=2, router=router, z_loss_coef=0.01)
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.7, (8, 6))
    set_router(layer, w)
    x = rng.normal(size=(2, 16, 8)).astype(np.float32)
    logits = x.reshape(-1, 8).astype(np.float64) @ w
    m = logits.max(-1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    assert losses(layer, x)["z_loss"] == pytest.approx(0.01 * np.mean(lse ** 2), rel=1e-5)


def test_a_training_forward_records_the_router_losses_and_an_eval_forward_nothing():
    layer = moe_layer(n_routed_experts=6, num_experts_per_tok=2, router="sigmoid", aux_loss_coef=0.1,
                      z_loss_coef=0.01, bias_update_rate=0.01)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 8)).astype(np.float32))
    expected = losses(layer, x)
    assert sorted(expected) == ["balance_loss", "z_loss"]
    eval_out = layer(x)
    assert not nnx.state(layer, nnx.Intermediate)
    layer.train()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(eval_out))  # same routing in training
    np.testing.assert_array_equal(np.asarray(pop_expert_load(layer)["expert_load"][...]), picked_counts(layer, x))
    recorded = aux_losses(layer)
    assert recorded == pytest.approx(expected, rel=1e-6)
    assert not nnx.state(layer, nnx.Intermediate)  # popped


def test_bias_update_follows_the_sign_rule():
    layer = moe_layer(n_routed_experts=4, num_experts_per_tok=1, router="sigmoid", bias_update_rate=0.1)
    update_router_bias(layer, nnx.State({"expert_load": ExpertLoad(jnp.array([10.0, 2.0, 4.0, 4.0]))}))  # mean 5
    np.testing.assert_allclose(np.asarray(layer.expert_bias[...]), [-0.1, 0.1, 0.1, 0.1])
    update_router_bias(layer, nnx.State({}))  # no load recorded (an eval forward, a skipped layer): no step
    np.testing.assert_allclose(np.asarray(layer.expert_bias[...]), [-0.1, 0.1, 0.1, 0.1])


def test_v3_bias_update_moves_a_skewed_router_toward_balance():
    E = 8
    layer = moe_layer(n_routed_experts=E, num_experts_per_tok=2, router="sigmoid", bias_update_rate=0.02)
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.5, (8, E))
    w[0] = 0.0
    w[0, :2] = 2.0  # input 0 is constant 1: every token favours experts 0 and 1 by +2 logits
    set_router(layer, w)
    x = rng.normal(size=(4, 64, 8))
    x[..., 0] = 1.0
    x = jnp.asarray(x.astype(np.float32))
    layer.train()

    @nnx.jit
    def step(layer, x):
        layer(x)
        load = pop_expert_load(layer)
        update_router_bias(layer, load)
        return load["expert_load"][...]

    def imbalance(load):  # max load over mean load: 1 is perfect balance, E/k is total collapse
        return float(load.max() / load.mean())

    loads = [step(layer, x) for _ in range(40)]
    before = imbalance(loads[0])
    after = np.mean([imbalance(load) for load in loads[-10:]])  # the sign rule oscillates around balance
    assert before > 2.5, before
    assert after < 1.3, (before, after)
    bias = np.asarray(layer.expert_bias[...])
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down
    # the bias only steers: the gradient-trained router weights are untouched
    np.testing.assert_array_equal(np.asarray(layer.router.weight[...]), w.astype(np.float32))


def test_capacity_drops_exactly_the_overflow_in_token_order():
    E, X = 4, 16
    layer = moe_layer(n_routed_experts=E, num_experts_per_tok=1, capacity_factor=1.0)
    # token t is routed to expert target[t] by one-hot inputs and a diagonal router
    target = np.array([0, 0, 1, 0, 2, 0, 0, 1, 0, 0, 1, 0, 2, 0, 1, 0])
    counts = np.bincount(target, minlength=E)  # [10, 4, 2, 0]
    capacity = math.ceil(X * 1 / E * 1.0)  # 4
    w = np.zeros((8, E))
    w[np.arange(E), np.arange(E)] = 5.0
    set_router(layer, w)
    x = np.zeros((1, X, 8), np.float32)
    x[0, np.arange(X), target] = 1.0
    x[0, :, 4:] = np.random.default_rng(0).normal(size=(X, 4))  # make the tokens differ in the experts' input
    dropped_out = np.asarray(layer(jnp.asarray(x)))[0]
    np.testing.assert_array_equal(picked_counts(layer, x), counts)  # the load counts dropped assignments too
    dropped = np.all(dropped_out == 0.0, axis=-1)  # top-1, no shared experts: a dropped token gets exactly 0
    assert dropped.sum() == np.maximum(counts - capacity, 0).sum() == 6
    # which ones: each expert's assignments after its first `capacity`, in token order
    expected = np.zeros(X, bool)
    for e in range(E):
        expected[np.flatnonzero(target == e)[capacity:]] = True
    np.testing.assert_array_equal(dropped, expected)
    # the kept tokens are untouched by the capacity limit
    dropless = moe_layer(n_routed_experts=E, num_experts_per_tok=1)
    nnx.update(dropless, nnx.state(layer, nnx.Param))
    full = np.asarray(dropless(jnp.asarray(x)))[0]
    np.testing.assert_array_equal(dropped_out[~expected], full[~expected])
    assert np.all(np.abs(full[expected]).max(-1) > 0)


MOE_VARIANTS = {
    "sigmoid-groups-shared": dict(n_routed_experts=8, num_experts_per_tok=3, router="sigmoid", n_group=4, topk_group=2,
                                  routed_scaling_factor=2.5, n_shared_experts=1),
    "top2-capacity-0.75": dict(n_routed_experts=4, num_experts_per_tok=2, capacity_factor=0.75),
    "top1-capacity-0.5": dict(n_routed_experts=8, num_experts_per_tok=1, capacity_factor=0.5, norm_topk_prob=False),
}


@pytest.mark.parametrize("name", sorted(MOE_VARIANTS))
def test_grouped_ragged_dot_dispatch_equals_dense_reference(name):
    grouped = moe_layer(seed=3, dispatch="grouped", **MOE_VARIANTS[name])
    dense = moe_layer(seed=3, dispatch="dense", **MOE_VARIANTS[name])
    rng = np.random.default_rng(4)
    for layer in (grouped, dense):  # larger weights than the init so the routing is not near-uniform
        for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            seed = sum(map(ord, str(path)))  # the same draw per parameter name in both layers
            var[...] = jnp.asarray(np.random.default_rng(seed).normal(0, 0.3, var.shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 32, 8)).astype(np.float32))
    r = jnp.asarray(rng.normal(size=(2, 32, 8)).astype(np.float32))

    def loss(layer, x):
        return jnp.sum(layer(x) * r)

    (out_g, grads_g), (out_d, grads_d) = [nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)
                                          for layer in (grouped, dense)]
    assert float(out_g) == pytest.approx(float(out_d), rel=1e-5)
    flat_g = dict(nnx.to_flat_state(grads_g[0]))
    flat_d = dict(nnx.to_flat_state(grads_d[0]))
    assert flat_g.keys() == flat_d.keys()
    for key in flat_g:
        g, d = np.asarray(flat_g[key][...]), np.asarray(flat_d[key][...])
        assert np.abs(g - d).max() <= 1e-5 * max(np.abs(d).max(), 1e-30), key
        assert np.abs(d).max() > 0, key  # every parameter gets a gradient
    np.testing.assert_allclose(np.asarray(grads_g[1]), np.asarray(grads_d[1]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grouped(x)), np.asarray(dense(x)), rtol=1e-5, atol=1e-6)


def test_router_noise_is_on_in_training_and_off_in_eval():
    layer = moe_layer(n_routed_experts=4, num_experts_per_tok=1, router="noisy", importance_loss_coef=0.1,
                      load_loss_coef=0.1)
    rng = np.random.default_rng(5)
    layer.router.weight[...] = jnp.asarray(rng.normal(0, 0.3, (8, 4)), jnp.float32)
    layer.noise_proj.weight[...] = jnp.asarray(rng.normal(0, 0.3, (8, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 64, 8)).astype(np.float32))
    eps = jnp.asarray(rng.standard_normal((2, 64, 4)).astype(np.float32))
    assert layer.deterministic  # built in eval mode
    eval_a, eval_b = np.asarray(layer(x)), np.asarray(layer(x))
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(np.asarray(layer(x, router_noise=eps)), eval_a)  # eval: no noise, given or drawn
    eval_losses = losses(layer, x)  # of the clean routing: the load loss counts tokens
    # eval routing is the clean top-1 of x W_g
    picked = np.argmax(np.asarray(x).reshape(-1, 8) @ np.asarray(layer.router.weight[...]), -1)
    np.testing.assert_array_equal(picked_counts(layer, x), np.bincount(picked, minlength=4))
    layer.train()
    assert not layer.deterministic
    train_a, train_b = np.asarray(layer(x)), np.asarray(layer(x))
    assert not np.array_equal(train_a, eval_a) and not np.array_equal(train_a, train_b)
    train_losses = aux_losses(layer)
    assert train_losses["load_loss"] != eval_losses["load_loss"]  # the smooth estimator, not counts
    # given noise replaces the draw: the same noise, the same output; zero noise is the clean router
    noisy = np.asarray(layer(x, router_noise=eps))
    np.testing.assert_array_equal(np.asarray(layer(x, router_noise=eps)), noisy)
    assert not np.array_equal(noisy, eval_a)
    np.testing.assert_array_equal(np.asarray(layer(x, router_noise=jnp.zeros_like(eps))), eval_a)
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), eval_a)


V3 = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, router="sigmoid", bias_update_rate=0.01,
          aux_loss_coef=0.01, z_loss_coef=0.001)


def snapshot(model: nnx.Module):
    """The graph and every variable of every type (parameters, buffers, RNG counters, intermediates)."""
    graphdef, state = nnx.split(model)
    leaves = [np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
              for v in jax.tree.leaves(state)]
    return graphdef, jax.tree.structure(state), leaves


EVAL_CASES = {
    "sigmoid-aux-bias": dict(moe=V3),
    "noisy-layerdrop-dropout": dict(layerdrop=0.5, dropout=0.1, moe=dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, router="noisy", aux_loss_coef=0.01,
        z_loss_coef=0.001, importance_loss_coef=0.1, load_loss_coef=0.1)),
    "recursion-moe-core": dict(n_layer=3, moe=V3, recursion=dict(mode="loop", n_prelude=1, n_core=1, n_loops=3,
                                                                 n_grad_loops=2)),
}


@pytest.mark.parametrize("name", sorted(EVAL_CASES))
def test_an_eval_forward_mutates_nothing(name):
    model = moe_model(**EVAL_CASES[name])  # built in eval mode
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 64)
    graphdef, structure, leaves = snapshot(model)
    model(tokens[:, :-1])
    nnx.jit(lambda m, t: m(t))(model, tokens[:, :-1])
    nnx.jit(lm_loss)(model, tokens[:, :-1], tokens[:, 1:])
    after = snapshot(model)
    assert after[0] == graphdef and after[1] == structure
    for a, b in zip(after[2], leaves):
        np.testing.assert_array_equal(a, b)


def test_the_train_step_pops_the_expert_loads_that_value_and_grad_leaves_in_the_model():
    model = moe_model(moe=V3)
    model.train()
    tokens = jax.random.randint(jax.random.key(2), (4, 17), 0, 64)

    @nnx.jit
    def step(model, tokens):  # the Trainer's step without the optimiser
        loss, grads = nnx.value_and_grad(lm_loss)(model, tokens[:, :-1], tokens[:, 1:])
        loads = pop_expert_load(model)  # sown inside value_and_grad, out here
        update_router_bias(model, loads)
        return loads

    loads = dict(nnx.to_flat_state(step(model, tokens)))
    assert sorted(loads) == [("layers", i, "mlp", "expert_load") for i in range(2)]
    for i, block in enumerate(model.layers):
        load = np.asarray(loads[("layers", i, "mlp", "expert_load")][...], np.float64)
        assert load.sum() == 4 * 16 * 2  # every token picked 2 experts
        expected = V3["bias_update_rate"] * np.sign(load.mean() - load)  # from a zero bias
        np.testing.assert_allclose(np.asarray(block.mlp.expert_bias[...]), expected, atol=1e-7)
        assert np.any(expected != 0)
    assert not nnx.state(model, nnx.Intermediate)  # lm_loss popped the aux losses, the step the loads


def test_a_recursion_core_sums_its_expert_loads_over_the_loops():
    model = moe_model(n_layer=3, moe=V3, recursion=dict(mode="loop", n_prelude=1, n_core=1, n_loops=3, n_grad_loops=2))
    model.train()
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)
    nnx.jit(lambda m, t: (m(t), pop_aux_losses(m)))(model, tokens)
    loads = {path[1]: float(v[...].sum()) for path, v in nnx.to_flat_state(pop_expert_load(model))}
    per_call = 2 * 16 * 2
    assert loads == {0: per_call, 1: 3 * per_call, 2: per_call}  # prelude, core (3 loops), coda


@pytest.mark.parametrize("remat", [False, True])
def test_layerdrop_keeps_the_aux_losses_and_loads_of_the_layers_that_ran(remat, monkeypatch):
    from jaxllm.model.blocks import LayerDrop

    model = moe_model(remat=remat, layerdrop=0.5, moe=dict(V3, aux_loss_coef=1.0, z_loss_coef=0.1))
    model.train()
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)

    def record(model, tokens, keep):  # a fresh jit each call: `keep` is patched between calls
        monkeypatch.setattr(LayerDrop, "keep", lambda self, n: None if keep is None else jnp.array(keep))

        @nnx.jit
        def forward(model, tokens):
            model(tokens)
            return nnx.pop(model, AuxLoss), pop_expert_load(model)

        aux, loads = forward(model, tokens)
        if keep is None:
            per_layer = [sum(map(float, jax.tree.leaves(aux["layers"][i]))) for i in range(2)]
        else:  # a kept layer's losses come back as a value, one per layer (0 if skipped), sown by the model
            assert list(aux) == ["layerdrop_aux_losses"]
            per_layer = list(map(float, jax.tree.leaves(aux["layerdrop_aux_losses"])))
        return np.array(per_layer), [np.asarray(v[...]) for _, v in nnx.to_flat_state(loads)]

    every_aux, every_load = record(model, tokens, None)  # the plain path: every layer runs
    assert np.all(every_aux > 0.1)
    assert [load.sum() for load in every_load] == [64, 64]
    for keep in ([True, True], [True, False], [False, True], [False, False]):
        aux, loads = record(model, tokens, keep)
        for i, kept in enumerate(keep):
            if not kept:  # a skipped layer records no loss, and its load stays 0
                assert aux[i] == 0.0 and not loads[i].any(), (keep, i)
            elif all(keep[:i]):  # the same input as on the plain path
                assert aux[i] == pytest.approx(every_aux[i], rel=1e-6), (keep, i)
                np.testing.assert_array_equal(loads[i], every_load[i])
            else:
                assert aux[i] > 0.1 and loads[i].sum() == 64, (keep, i)
