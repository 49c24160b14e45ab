"""jaxllm <-> torch_ref state_dict and safetensors: exact round trips, one-line errors."""
import numpy as np
import pytest
import torch
from flax import nnx

from jaxllm.config import config_from_dict, to_dict
from jaxllm.convert import from_state_dict, load_safetensors, save_safetensors, to_state_dict
from jaxllm.errors import ConversionError
from jaxllm.model import Transformer
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
