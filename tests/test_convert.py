"""jaxllm <-> torch_ref state_dict and safetensors: exact round trips, one-line errors; loaders that
build the model abstractly (no random init drawn) and give a model that runs, trains and decodes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxllm.config import config_from_dict, to_dict
from jaxllm.convert import from_state_dict, load_safetensors, model_from_state_dict, save_safetensors, to_state_dict
from jaxllm.errors import ConversionError
from jaxllm.model import Transformer
from jaxllm.model.params import Buffer
from torch_ref.model import Transformer as TorchTransformer

CFG = config_from_dict({"model": dict(
    vocab_size=50, d_model=32, n_layer=2, max_seq_len=64, position=dict(kind="rope"), norm=dict(kind="rmsnorm"),
    attention=dict(n_head=4, n_kv_head=2, qkv_bias=True, out_bias=True), mlp=dict(kind="swiglu", bias=True),
    tie_embeddings=False, lm_head_bias=True, rezero=True)}).model


def params(model):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_state_dict_keys_and_shapes_are_torch_refs():
    sd = to_state_dict(Transformer(CFG, rngs=nnx.Rngs(0)))
    reference = TorchTransformer(to_dict(CFG)).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert sd["layers.0.attn.q_proj.weight"].shape == (4 * 8, 32)  # nn.Linear [out, in]
    assert sd["layers.0.attn.o_proj.weight"].shape == (32, 4 * 8)


def assert_jax_torch_jax_round_trip_is_exact(cfg, source):
    """source -> torch_ref state_dict (matching torch_ref's own keys and shapes) -> a fresh model: equal bits."""
    state_dict = to_state_dict(source)
    torch_model = TorchTransformer(to_dict(cfg))
    assert {k: v.shape for k, v in state_dict.items()} == {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()})
    target = Transformer(cfg, rngs=nnx.Rngs(1))
    from_state_dict(target, torch_model.state_dict())
    a, b = params(source), params(target)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_jax_torch_jax_round_trip_is_exact():
    assert_jax_torch_jax_round_trip_is_exact(CFG, Transformer(CFG, rngs=nnx.Rngs(0)))


def test_torch_jax_torch_round_trip_is_exact():
    torch_model = TorchTransformer(to_dict(CFG))
    with torch.no_grad():
        for p in torch_model.parameters():
            p.normal_()
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    from_state_dict(model, torch_model.state_dict())
    back = to_state_dict(model)
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_safetensors_round_trip_is_exact_and_keeps_the_config(tmp_path):
    source = Transformer(CFG, rngs=nnx.Rngs(0))
    path = tmp_path / "model.safetensors"
    save_safetensors(path, source, config=to_dict(CFG))
    state_dict, config = load_safetensors(path)
    assert config == to_dict(CFG)
    target = Transformer(config_from_dict({"model": config}).model, rngs=nnx.Rngs(1))
    from_state_dict(target, state_dict)
    for key, value in params(source).items():
        np.testing.assert_array_equal(value, params(target)[key], err_msg=key)
    # and torch_ref reads the same file with safetensors' own torch loader
    from safetensors.torch import load_file
    TorchTransformer(to_dict(CFG)).load_state_dict(load_file(path))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind


def test_missing_extra_and_misshaped_tensors_are_one_line_errors():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    before = params(model)
    good = to_state_dict(model)
    cases = [
        ({k: v for k, v in good.items() if k != "layers.1.mlp.up_proj.bias"}, "missing tensor 'layers.1.mlp.up_proj.bias'"),
        ({**good, "layers.0.attn.extra.weight": np.zeros(3)}, "unexpected tensor 'layers.0.attn.extra.weight'"),
        ({**good, "layers.0.attn.k_proj.weight": np.zeros((8, 32))},
         "tensor 'layers.0.attn.k_proj.weight' has shape (8, 32), expected (16, 32)"),
    ]
    for state_dict, message in cases:
        with pytest.raises(ConversionError) as err:
            from_state_dict(model, state_dict)
        assert message in str(err.value) and "\n" not in str(err.value)
    for key, value in params(model).items():  # a failed load changes nothing
        np.testing.assert_array_equal(value, before[key])


def test_corrupt_or_missing_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        load_safetensors(bad)
    with pytest.raises(ConversionError, match="does not exist"):
        load_safetensors(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# Loaders build the model abstractly: no random init is drawn and thrown away


def weights(model) -> dict[str, np.ndarray]:
    """Params and Buffers (what a state_dict holds) by key."""
    state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def forbid_concrete_draws(monkeypatch):
    """Make every concrete random draw raise. A real init draws concrete numbers; `nnx.eval_shape`
    traces its draws (their keys are tracers), so an abstract build still runs."""
    for name in ("normal", "uniform", "truncated_normal", "bernoulli"):
        def guarded(key, *args, _draw=getattr(jax.random, name), _name=name, **kwargs):
            if not isinstance(key, jax.core.Tracer):
                raise AssertionError(f"jax.random.{_name} drew concrete random numbers")
            return _draw(key, *args, **kwargs)
        monkeypatch.setattr(jax.random, name, guarded)


def model_config(**model):
    base = dict(vocab_size=64, d_model=32, n_layer=2, max_seq_len=64, position=dict(kind="rope"),
                norm=dict(kind="rmsnorm", eps=1e-6), attention=dict(n_head=4, n_kv_head=2),
                mlp=dict(kind="swiglu", d_ff=48), tie_embeddings=False)
    return config_from_dict({"model": {**base, **model}}).model


DEEPSEEK = model_config(  # MLA + sigmoid router: the expert_bias Buffer travels too
    attention=dict(kind="mla", n_head=4, mla=dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                                  qk_rope_head_dim=4, v_head_dim=8, latent_norm_eps=1e-6)),
    moe=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
             shared_intermediate_size=16, router="sigmoid", first_k_dense=1))
MIXTRAL = model_config(moe=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))


def source_model(cfg) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for _, var in nnx.to_flat_state(nnx.state(model, Buffer)):  # not the zeros a fresh init has
        var[...] = jnp.asarray(np.random.default_rng(1).standard_normal(var.shape), var.dtype)
    return model


@pytest.mark.parametrize("fmt,cfg", [("hf", DEEPSEEK), ("hf", MIXTRAL), ("gguf", model_config()), ("gguf", MIXTRAL)],
                         ids=["hf-deepseek_v3", "hf-mixtral", "gguf-llama", "gguf-mixtral"])
def test_loaders_draw_no_random_init_and_give_the_source_weights(fmt, cfg, tmp_path, monkeypatch):
    if fmt == "gguf":
        pytest.importorskip("gguf")
    from jaxllm.convert.gguf import load_gguf, save_gguf
    from jaxllm.convert.hf import load_hf, save_hf

    source = source_model(cfg)
    path = tmp_path / ("model.gguf" if fmt == "gguf" else "hf")
    (save_gguf if fmt == "gguf" else save_hf)(path, source)
    forbid_concrete_draws(monkeypatch)
    with pytest.raises(AssertionError, match="drew concrete random numbers"):  # the guard has teeth
        Transformer(cfg, rngs=nnx.Rngs(0))
    loaded = load_gguf(path) if fmt == "gguf" else load_hf(path)[0]
    a, b = weights(source), weights(loaded)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


RUNNABLE = {  # every kind of non-Param state: RNG streams, Buffers, ExpertLoad
    "recursion": model_config(n_layer=3, recursion=dict(mode="loop", n_prelude=1, n_core=1, n_loops=3, n_grad_loops=2,
                                                        inject="concat", init="random", random_loops=True)),
    "noisy-moe-dropout": model_config(dropout=0.1, layerdrop=0.2, attention=dict(n_head=4, n_kv_head=2, dropout=0.1),
                                      mlp=dict(kind="swiglu", d_ff=48, dropout=0.1),
                                      moe=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                               router="noisy", first_k_dense=1)),
    "deepseek": DEEPSEEK,
}


@pytest.mark.parametrize("name", list(RUNNABLE))
def test_model_from_state_dict_is_concrete_and_runs_trains_and_decodes(name, monkeypatch):
    import optax

    from jaxllm.decode import generate
    from jaxllm.model.losses import lm_loss

    cfg = RUNNABLE[name]
    source = source_model(cfg)
    state_dict = to_state_dict(source)
    forbid_concrete_draws(monkeypatch)
    model = model_from_state_dict(state_dict, cfg)
    monkeypatch.undo()  # training draws dropout masks

    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)  # nothing abstract left
    not_rng = nnx.Not(nnx.RngState)
    expected = dict(nnx.to_flat_state(nnx.state(source, not_rng)))
    got = dict(nnx.to_flat_state(nnx.state(model, not_rng)))
    assert got.keys() == expected.keys()
    for path in got:  # Params, Buffers and running statistics, as a fresh init + from_state_dict gives
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(expected[path][...]), err_msg=str(path))
    keys = [jax.random.key_data(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.RngKey))]
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == len(keys) > 0  # one stream, one key
    assert all(int(v[...]) == 0 for _, v in nnx.to_flat_state(nnx.state(model, nnx.RngCount)))

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17)))
    np.testing.assert_array_equal(np.asarray(model(tokens[:, :-1])), np.asarray(source(tokens[:, :-1])))
    prompts = [[1, 2, 3], [4, 5, 6]]
    assert generate(model, prompts, max_new_tokens=4) == generate(source, prompts, max_new_tokens=4)
    model.train()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    losses = []
    for _ in range(2):
        loss, grads = nnx.value_and_grad(lambda m: lm_loss(m, tokens[:, :-1], tokens[:, 1:]))(model)
        optimizer.update(model, grads)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[1] != losses[0]
