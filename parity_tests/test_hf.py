"""jaxllm vs Hugging Face transformers on the same weights, for every family of `jaxllm.convert.hf`.

Per family: (1) a random jaxllm model exported with `save_hf` loads in transformers with nothing
missing, unexpected or mismatched, and gives the same logits; importing the export back gives the
same weights bit for bit; (2) a random model built by transformers' own config class and
`from_config`, saved with `save_pretrained`, imports into jaxllm with the same logits.
float32, eager attention, weights std 0.1-0.3, 256 tokens (Mistral's window is 64).
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxllm.config import to_dict
from jaxllm.convert import hf, to_state_dict
from jaxllm.model import Transformer
from jaxllm.model.params import Buffer
from parity_tests.harness import LOGITS_TOL, SEQ, randomize, tiny_config

ROPE = dict(position=dict(kind="rope"), norm=dict(kind="rmsnorm", eps=1e-6), mlp=dict(kind="swiglu", d_ff=96),
            tie_embeddings=False)
GQA = dict(n_head=4, n_kv_head=2)
JAXLLM = {  # family -> tiny_config fields
    "gpt2": dict(mlp=dict(kind="gelu_tanh", bias=True), attention=dict(n_head=4, qkv_bias=True, out_bias=True)),
    "llama": dict(ROPE, attention=GQA, position=dict(kind="rope", rope_theta=50000.0)),
    "mistral": dict(ROPE, attention=dict(GQA, window=64)),
    "mixtral": dict(ROPE, attention=GQA, moe=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "qwen2_moe": dict(ROPE, attention=dict(GQA, qkv_bias=True), moe=dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        shared_intermediate_size=48, shared_expert_gate=True, norm_topk_prob=False, first_k_dense=1)),
    "deepseek_v3": dict(ROPE, attention=dict(kind="mla", n_head=4, mla=dict(
        q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, yarn_factor=4.0,
        yarn_original_max_position=80, yarn_mscale=0.707, yarn_mscale_all_dim=0.707)), moe=dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, router="sigmoid",
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense=1)),
}
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=320, bos_token_id=0, eos_token_id=1, pad_token_id=None)
HF_NATIVE = {  # family -> (config class, fields): models built by transformers itself
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=320,
                                bos_token_id=0, eos_token_id=1)),
    "llama": ("LlamaConfig", dict(SMALL, rope_theta=20000.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(SMALL, sliding_window=48)),
    "mixtral": ("MixtralConfig", dict(SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=40, mlp_only_layers=[0], norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", dict(SMALL, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                                             num_experts_per_tok=3, moe_intermediate_size=16, n_group=2, topk_group=1,
                                             first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=24,
                                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                             rope_interleave=False)),
}
UNUSED = {  # config fields the family does not store because the model never reads them
    "mixtral": {"mlp.d_ff"},  # every layer is MoE
    "deepseek_v3": {"attention.head_dim"},  # MLA has its own head dims
}


def load_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    return model.eval(), info


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.double().numpy()


def jax_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens)), np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_jaxllm(cfg, seed: int = 0) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    randomize(model, seed)
    rng = np.random.default_rng(seed + 7)
    for _, var in nnx.to_flat_state(nnx.state(model, Buffer)):  # the V3 router bias: steer the selection
        var[...] = jnp.asarray(0.2 * rng.standard_normal(var.shape), jnp.float32)
    return model


def flat(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def config_differences(a, b, prefix="") -> set[str]:
    out = set()
    for key in a:
        if isinstance(a[key], dict):
            out |= config_differences(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b[key]:
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("family", list(JAXLLM))
def test_export_matches_transformers_and_imports_back_exactly(family, tmp_path):
    cfg = tiny_config(**JAXLLM[family]).model
    assert hf.infer_family(cfg) == family
    model = random_jaxllm(cfg)
    assert hf.save_hf(tmp_path / "hf", model) == family
    hf_model, info = load_transformers(tmp_path / "hf")
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, SEQ))
    expected = hf_logits(hf_model, tokens)
    assert rel(jax_logits(model, tokens), expected) <= LOGITS_TOL

    back, back_family = hf.load_hf(tmp_path / "hf")
    assert back_family == family
    assert config_differences(to_dict(back.cfg), to_dict(cfg)) <= UNUSED.get(family, set())
    a, b = flat(model), flat(back)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("family", list(HF_NATIVE))
def test_import_of_a_transformers_saved_model(family, tmp_path):
    cls_name, fields = HF_NATIVE[family]
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in list(source.named_parameters()) + list(source.named_buffers()):
            if name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.is_floating_point() and "inv_freq" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    source.save_pretrained(tmp_path / "hf")
    hf_model, info = load_transformers(tmp_path / "hf")
    assert not any(info.values())

    model, got_family = hf.load_hf(tmp_path / "hf")
    assert got_family == family
    tokens = np.random.default_rng(2).integers(0, 128, (1, SEQ))
    assert rel(jax_logits(model, tokens), hf_logits(hf_model, tokens)) <= LOGITS_TOL


def test_a_bfloat16_checkpoint_imports_as_its_float32_values(tmp_path):
    cls_name, fields = HF_NATIVE["llama"]
    source = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**fields), dtype=torch.bfloat16)
    source.save_pretrained(tmp_path / "hf")
    model, _ = hf.load_hf(tmp_path / "hf")
    got = hf.to_hf_tensors(to_state_dict(model), "llama")
    for name, value in source.state_dict().items():
        if name != "lm_head.weight":  # tied
            np.testing.assert_array_equal(got[name], value.float().numpy(), err_msg=name)


def test_the_rope_layout_flag_matters(tmp_path):
    """Negative control: the same DeepSeek weights with rope_interleave flipped give other logits,
    so the comparison above would catch a wrong MLA rope layout."""
    cfg = tiny_config(**JAXLLM["deepseek_v3"]).model
    model = random_jaxllm(cfg)
    hf.save_hf(tmp_path / "hf", model)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_interleave"] = not config["rope_interleave"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, SEQ))
    assert rel(jax_logits(model, tokens), hf_logits(load_transformers(tmp_path / "hf")[0], tokens)) > 100 * LOGITS_TOL
