"""GGUF export (`jaxllm.convert.gguf`) checked with gguf's own reader, transformers' GGUF loader and,
when installed, llama.cpp itself (float32 KV cache). 256 tokens, weights std 0.1-0.3."""
from __future__ import annotations

import importlib.util

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from jaxllm.config import to_dict
from jaxllm.convert import to_state_dict
from jaxllm.convert.hf import infer_family
from jaxllm.convert.gguf import load_gguf, save_gguf
from parity_tests.harness import LOGITS_TOL, SEQ, tiny_config
from parity_tests.test_hf import JAXLLM, UNUSED, config_differences, hf_logits, jax_logits, random_jaxllm, rel

LLAMA = tiny_config(**JAXLLM["llama"]).model
MIXTRAL = tiny_config(**JAXLLM["mixtral"]).model
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers needs accelerate to load GGUF files: pip install accelerate")


def tokens(cfg) -> np.ndarray:
    return np.random.default_rng(1).integers(0, cfg.vocab_size, (1, SEQ))


def hf_reverse_permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """transformers' own undo of llama.cpp's Q/K permutation (an oracle independent of ours)."""
    return LlamaTensorProcessor()._reverse_permute_weights(w, n_head, n_kv)


def params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("cfg", [LLAMA, MIXTRAL], ids=["llama", "mixtral"])
def test_names_shapes_metadata_and_values_read_back(cfg, tmp_path):
    model = random_jaxllm(cfg)
    save_gguf(tmp_path / "m.gguf", model)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    a, moe = cfg.attention, cfg.moe
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert (meta["llama.embedding_length"], meta["llama.block_count"], meta["llama.context_length"]) == (
        cfg.d_model, cfg.n_layer, cfg.max_seq_len)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (a.n_head, a.n_kv_head)
    assert meta["llama.rope.dimension_count"] == a.head_dim
    assert meta["llama.rope.freq_base"] == cfg.position.rope_theta
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm.eps)
    assert meta.get("llama.expert_count", 0) == moe.n_routed_experts
    tensors = {t.name: np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    sd = to_state_dict(model)  # nn.Linear layout [out, in]
    assert tensors["token_embd.weight"].shape == (cfg.vocab_size, cfg.d_model)
    np.testing.assert_array_equal(tensors["output.weight"], sd["lm_head.weight"])
    for i in range(cfg.n_layer):
        q, k = tensors[f"blk.{i}.attn_q.weight"], tensors[f"blk.{i}.attn_k.weight"]
        np.testing.assert_array_equal(hf_reverse_permute(q, a.n_head, a.n_head), sd[f"layers.{i}.attn.q_proj.weight"])
        np.testing.assert_array_equal(hf_reverse_permute(k, a.n_head, a.n_kv_head), sd[f"layers.{i}.attn.k_proj.weight"])
        assert not np.array_equal(q, sd[f"layers.{i}.attn.q_proj.weight"])  # permuted indeed
        if moe.n_routed_experts:
            for ours, theirs in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
                np.testing.assert_array_equal(tensors[f"blk.{i}.{theirs}.weight"], sd[f"layers.{i}.mlp.experts.{ours}"])
            np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_gate_inp.weight"], sd[f"layers.{i}.mlp.router.weight"])
    # and jaxllm reads its own file back bit for bit
    back = load_gguf(tmp_path / "m.gguf")
    assert config_differences(to_dict(back.cfg), to_dict(cfg)) <= UNUSED.get(infer_family(cfg), set())
    for key, value in params(model).items():
        np.testing.assert_array_equal(params(back)[key], value, err_msg=key)


@needs_accelerate
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_transformers_gguf_loader_gives_the_same_logits(dtype, tmp_path):
    model = random_jaxllm(LLAMA)
    save_gguf(tmp_path / "m.gguf", model, dtype=dtype)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values())
    if dtype == "float16":  # the file holds float16 matrices: compare with jaxllm on those weights
        rounded = load_gguf(tmp_path / "m.gguf")
        for key, value in params(model).items():
            expected = value.astype(np.float16).astype(np.float32) if value.ndim >= 2 else value
            np.testing.assert_array_equal(params(rounded)[key], expected, err_msg=key)
        model = rounded
    ids = tokens(LLAMA)
    assert rel(jax_logits(model, ids), hf_logits(hf_model.eval(), ids)) <= LOGITS_TOL


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama_cpp is not installed (pip install llama-cpp-python; builds in 4-8 minutes)")
@pytest.mark.parametrize("cfg", [LLAMA, MIXTRAL], ids=["llama", "mixtral"])
def test_llama_cpp_gives_the_same_logits(cfg, tmp_path):
    import llama_cpp

    model = random_jaxllm(cfg)
    save_gguf(tmp_path / "m.gguf", model)
    ids = tokens(cfg)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=SEQ, n_batch=SEQ, logits_all=True, type_k=0, type_v=0,
                          verbose=False)
    llm.eval(ids[0].tolist())
    got = np.asarray(llm.scores[:SEQ], np.float64)[None]
    assert rel(jax_logits(model, ids), got) <= LOGITS_TOL
