"""The paths issue 13 added for speed, each checked against the plain computation it replaces:
`project` (merged leading dims), erf GELU, the attention kernel choice, the chunked cross-entropy,
bfloat16 training against float32, and the Trainer's step under each of them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import config_from_dict
from jaxllm.model import Transformer, lm_loss
from jaxllm.model.attention import AttentionMask, attend, implementation
from jaxllm.model.losses import DEFAULT_CHUNK, chunked_cross_entropy, cross_entropy, next_token_loss
from jaxllm.model.mlp import gelu
from jaxllm.model.params import project


def small(**model):
    base = dict(vocab_size=300, d_model=32, n_layer=2, max_seq_len=64, attention=dict(n_head=4))
    base.update(model)
    return config_from_dict({"model": base}).model


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("BTD,DNH->BTNH", (2, 5, 8), (8, 3, 4)),
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 8)),
    ("BTD,VD->BTV", (3, 7, 8), (11, 8)),
    ("XD,DE->XE", (6, 8), (8, 5)),  # one leading letter: left to einsum
])
def test_project_equals_einsum_in_value_and_gradient(spec, x_shape, w_shape):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    np.testing.assert_allclose(project(spec, x, w), jnp.einsum(spec, x, w), rtol=1e-6, atol=1e-6)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(spec, x, w)))  # noqa: E731
    for got, want in zip(jax.grad(loss(project), (0, 1))(x, w), jax.grad(loss(jnp.einsum), (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_erf_gelu_equals_the_exact_gelu_and_torch():
    import torch

    x = jnp.linspace(-12.0, 12.0, 4001)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: gelu(x).sum())(x),
                               jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gelu(x), torch.nn.functional.gelu(torch.from_numpy(np.array(x))).numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, dtype, head_dim, masked, expected", [
    ("cpu", jnp.float32, 64, False, "einsum"),
    ("cpu", jnp.bfloat16, 64, True, "einsum"),
    ("gpu", jnp.bfloat16, 64, False, "cudnn"),
    ("gpu", jnp.float16, 128, False, "cudnn"),
    ("gpu", jnp.float32, 64, False, "einsum"),  # cuDNN's kernel takes 16-bit inputs only
    ("gpu", jnp.bfloat16, 256, False, "einsum"),  # head_dim past its limit
    ("gpu", jnp.bfloat16, 60, False, "einsum"),  # not a multiple of 8
    ("gpu", jnp.bfloat16, 64, True, "einsum"),  # an explicit mask (decoding, TiDAR)
    ("tpu", jnp.bfloat16, 128, False, "einsum"),
])
def test_auto_attention_kernel_is_chosen_by_backend(backend, dtype, head_dim, masked, expected):
    assert implementation("auto", dtype, head_dim, masked, backend) == expected
    assert implementation("xla", dtype, head_dim, masked, backend) == "xla"  # an explicit choice is kept


def test_auto_attention_kernel_on_this_machine_and_its_numbers():
    """On the CPU, 'auto' runs the einsum kernel; its output and gradient equal the fused 'xla' one,
    with keys and values slots-first or heads-major (a decode cache's layout)."""
    assert jax.default_backend() != "cpu" or implementation("auto", jnp.float32, 8, False) == "einsum"
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 12, 4, 8))
    k, v = jax.random.normal(kk, (2, 12, 2, 8)), jax.random.normal(kv, (2, 12, 2, 8))
    for window in (None, 3):
        f = lambda kernel: lambda q, k, v: jnp.sum(jnp.tanh(attend(q, k, v, AttentionMask(None, window), kernel=kernel)))  # noqa: E731,E501
        for got, want in zip(jax.grad(f("einsum"), (0, 1, 2))(q, k, v), jax.grad(f("xla"), (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for kernel in ("einsum", "xla"):
            major = attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), AttentionMask(None, window), kernel=kernel,
                           heads_major=True)
            np.testing.assert_allclose(major, attend(q, k, v, AttentionMask(None, window), kernel="xla"),
                                       rtol=1e-5, atol=1e-5)


def test_attention_implementation_setting_is_validated():
    from jaxllm.errors import ConfigError

    with pytest.raises(ConfigError, match="implementation"):
        config_from_dict({"model": {"attention": {"implementation": "flash"}}})


@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 1000])
def test_chunked_cross_entropy_has_the_same_value_and_gradient(chunk):
    """Chunks that divide the 48 tokens, that do not (padding), one token and more than all of them."""
    cfg = small(tie_embeddings=False, lm_head_bias=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (3, 17), 0, cfg.vocab_size)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def whole(model):
        return cross_entropy(model(x), y)

    def chunked(model):
        return chunked_cross_entropy(model.head, model(x, head=False), y, chunk)

    (a, ga), (b, gb) = nnx.value_and_grad(whole)(model), nnx.value_and_grad(chunked)(model)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_tidar_losses_chunked_equal_the_whole_ones():
    """TiDAR's AR and diffusion cross-entropies, chunked (7 tokens a chunk over 2 x 16) or not:
    the same three losses and the same gradient."""
    from jaxllm.model.losses import tidar_losses

    cfg = small(position=dict(kind="rope"), diffusion=dict(enabled=True, block_size=4))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 17), 0, cfg.vocab_size - 1)
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = [nnx.value_and_grad(lambda m: tidar_losses(m, x, y, chunk)[0])(model) for chunk in (0, 7)]
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tidar_losses(model, x, y, 7), tidar_losses(model, x, y, 0), rtol=1e-6)


def test_chunked_cross_entropy_never_holds_the_whole_logits():
    """The compiled forward+backward's temporaries: chunked, well under the [B*T, V] float32 logits
    (of which the unchunked loss holds at least two: logits and their gradient)."""
    cfg = small(vocab_size=20000, d_model=16, n_layer=1)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((64, 65), jnp.int32)  # 4096 tokens: two of the default chunks
    logits_bytes = 64 * 64 * cfg.vocab_size * 4
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def temp_bytes(chunk):
        def loss(params):
            return next_token_loss(nnx.merge(graphdef, params, rest), tokens[:, :-1], tokens[:, 1:], chunk=chunk)
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(0)
    assert whole >= 2 * logits_bytes
    assert temp_bytes(64) < logits_bytes / 8
    assert temp_bytes(None) == temp_bytes(DEFAULT_CHUNK) < whole  # the default chunks this vocabulary


def test_bfloat16_training_is_finite_and_close_to_float32():
    """Eight AdamW steps of the same model in float32 and with bfloat16 compute (float32 params):
    every loss finite, each within 2% of float32's, and both learn."""
    import optax

    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small(vocab_size=61, dtype=dtype, position=dict(kind="rope"), mlp=dict(kind="swiglu"))
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        model.train()
        opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
        tokens = jax.random.randint(jax.random.key(3), (4, 33), 0, 61)

        @nnx.jit
        def step(model, opt):
            loss, grads = nnx.value_and_grad(lm_loss)(model, tokens[:, :-1], tokens[:, 1:])
            opt.update(model, grads)
            return loss

        losses[dtype] = np.array([float(step(model, opt)) for _ in range(8)])
        assert model.layers[0].mlp.up_proj.weight[...].dtype == jnp.float32
    assert np.all(np.isfinite(losses["bfloat16"]))
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.02)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.1


@pytest.mark.parametrize("extra", [dict(), dict(remat=True), dict(position=dict(kind="rope"), mlp=dict(kind="swiglu"),
                                                                   attention=dict(n_head=4, n_kv_head=2, window=5))])
def test_scanned_layers_give_the_loops_numbers(extra):
    """The same weights with model.scan_layers on and off: logits and every gradient agree."""
    results = []
    for scan in (False, True):
        cfg = small(n_layer=3, scan_layers=scan, **extra)
        assert cfg.scan_layers is scan
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        model.train()
        tokens = jax.random.randint(jax.random.key(4), (2, 21), 0, cfg.vocab_size)
        loss, grads = nnx.value_and_grad(lm_loss)(model, tokens[:, :-1], tokens[:, 1:])
        results.append((model(tokens), loss, grads))
    (la, a, ga), (lb, b, gb) = results
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_scan_layers_refuses_blocks_that_draw_randomness_or_record():
    from jaxllm.errors import ConfigError

    assert small(n_layer=24).scan_layers is False  # off unless asked (docs/perf.md: compile time)
    for blocker, extra in (("dropout", dict(mlp=dict(dropout=0.1))), ("layerdrop", dict(layerdrop=0.1)),
                           ("moe", dict(moe=dict(n_routed_experts=4)))):
        with pytest.raises(ConfigError, match=f"scan_layers=True is invalid with {blocker}"):
            small(n_layer=4, scan_layers=True, **extra)
