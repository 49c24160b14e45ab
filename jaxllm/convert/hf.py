"""jaxllm <-> Hugging Face transformers directories (config.json + model.safetensors).

Families: gpt2, llama, mistral, mixtral, qwen2_moe, deepseek_v3, each one `HFFamily` spec in
`FAMILIES` (Levanter style): its config.json both ways, the features it refuses, and a tensor name
table over the torch_ref state_dict (`to_state_dict`, nn.Linear layout [out, in], which is already
HF's layout). The generic code below the specs reads only those fields; the special cases are
fields of the spec too:
- GPT-2's Conv1D stores [in, out] (`transposed`), and its q, k, v are one `c_attn` ([q | k | v],
  `fused_qkv`);
- routed experts are one stacked tensor [E, out, in] in jaxllm/torch_ref and E per-expert tensors
  on disk (`experts`: `block_sparse_moe.experts.{e}.w1/w3/w2` for Mixtral, `mlp.experts.{e}.gate_proj/...`
  for Qwen2-MoE and DeepSeek), the names both transformers 4.x and 5.x load;
- the DeepSeek-V3 router bias (a `Buffer`) is `mlp.gate.e_score_correction_bias`.
Layouts need no permutation: jaxllm's RoPE is HF's half-split, and MLA's `rope_layout`
('interleaved' / 'half') is HF's `rope_interleave` (true / false).

A jaxllm config that a family cannot express is refused with a one-line ConversionError naming
the feature (docs/interop.md lists them). Every output is written to a temporary directory and
renamed into place. torch is never imported: tensors are written with safetensors.numpy. Import
builds the model abstractly and fills it with the checkpoint's tensors: no random init is drawn.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from jaxllm.config import ModelConfig, config_from_dict
from jaxllm.errors import ConfigError
from jaxllm.errors import ConversionError
from jaxllm.files import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """One Hugging Face family: everything that differs between families, and nothing else.

    `names` maps torch_ref keys to HF names: (regex matched at the start of the key, replacement),
    the first rule that matches wins. Routed experts (stacked [E, out, in] in torch_ref) are E
    tensors on disk named by `experts` ({layer}, {e}, {proj}: the jaxllm projection name renamed
    through `expert_proj`). `transposed` (a regex over torch_ref keys) marks weights HF stores
    [in, out], and `fused_qkv` names one HF tensor that holds q, k and v ([q | k | v]; {layer},
    {leaf}): both are GPT-2's Conv1D. `config_out(cfg)` is config.json beyond the fields every
    family shares (`_common_config`), `config_in(hf)` the jaxllm `model:` dict of a config.json,
    and `refusals(cfg)` the features of `cfg` the family cannot express, most basic first.
    """

    name: str  # the HF model_type
    architecture: str  # the transformers class written into config.json's `architectures`
    names: tuple[tuple[str, str], ...]
    config_out: Callable[[ModelConfig], dict]
    config_in: Callable[[dict], dict]
    refusals: Callable[[ModelConfig], list[str]]
    experts: str | None = None
    expert_proj: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transposed: str | None = None
    fused_qkv: str | None = None

    def hf_name(self, key: str) -> str:
        """The HF name of a one-to-one torch_ref tensor (everything but stacked experts and fused q/k/v)."""
        for pattern, repl in self.names:
            name, n = re.subn("^" + pattern, repl, key)
            if n:
                return name
        raise ConversionError(f"{self.name} has no tensor for jaxllm's {key!r}")

    def expert_name(self, layer: str, e: int, proj: str) -> str:
        if self.experts is None:
            raise ConversionError(f"{self.name} has no routed experts (jaxllm's layer {layer})")
        return self.experts.format(layer=layer, e=e, proj=self.expert_proj.get(proj, proj))


# ---------------------------------------------------------------------------------------------
# Shared pieces: the fields every family writes, the llama-like layout (every family but GPT-2)


def _refused(*checks: tuple[bool, str]) -> list[str]:
    """The features of (ok, feature) checks that are not ok, in order."""
    return [feature for ok, feature in checks if not ok]


def _common_config(cfg: ModelConfig, family: HFFamily) -> dict:
    return {"architectures": [family.architecture], "model_type": family.name, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
            "pad_token_id": None, "dtype": "float32", "torch_dtype": "float32", "initializer_range": cfg.init_std,
            "use_cache": True}


def _rope_fields(cfg: ModelConfig) -> dict:
    """Both the v5 `rope_parameters` and the legacy top-level `rope_theta` / `rope_scaling`."""
    theta = cfg.position.rope_theta
    mla = cfg.attention.mla
    if cfg.attention.kind == "mla" and mla.yarn_factor is not None:
        scaling = {"rope_type": "yarn", "factor": mla.yarn_factor,
                   "original_max_position_embeddings": mla.yarn_original_max_position,
                   "beta_fast": mla.yarn_beta_fast, "beta_slow": mla.yarn_beta_slow,
                   "mscale": mla.yarn_mscale, "mscale_all_dim": mla.yarn_mscale_all_dim}
        return {"rope_theta": theta, "rope_scaling": {**scaling, "type": "yarn"},
                "rope_parameters": {**scaling, "rope_theta": theta}}
    return {"rope_theta": theta, "rope_scaling": None, "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}


def _rope_from_hf(hf: dict, family: str, default_theta: float, yarn: bool) -> tuple[float, dict]:
    """(rope_theta, MLA yarn fields) from `rope_parameters` (v5) or `rope_theta`/`rope_scaling` (v4);
    YaRN only where the family has it (`yarn`), any other scaling is refused."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    scaling = params if params.get("rope_type", "default") != "default" else legacy
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), {}
    if kind == "yarn" and yarn:
        return float(theta), dict(
            yarn_factor=float(scaling["factor"]),
            yarn_original_max_position=int(scaling.get("original_max_position_embeddings", 4096)),
            yarn_beta_fast=float(scaling.get("beta_fast", 32.0)), yarn_beta_slow=float(scaling.get("beta_slow", 1.0)),
            yarn_mscale=float(scaling.get("mscale", 1.0)), yarn_mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)))
    raise ConversionError(f"{family}: rope scaling {kind!r} is not supported by jaxllm")


def _get(hf: dict, key: str, default=None):
    value = hf.get(key, default)
    return default if value is None else value


def _llama_config(cfg: ModelConfig) -> dict:
    """config.json fields of the llama layout (RoPE, RMSNorm, SwiGLU, GQA) that its descendants share."""
    a = cfg.attention
    return {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": a.n_head,
            "num_key_value_heads": a.n_kv_head, "head_dim": a.head_dim, "intermediate_size": cfg.mlp.d_ff,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm.eps,
            "attention_dropout": 0.0, **_rope_fields(cfg)}


def _llama_model(hf: dict, family: str, *, window: int | None = None, default_theta: float = 10000.0,
                 yarn: bool = False) -> dict:
    """The jaxllm `model:` dict of a llama-layout config.json (the family adds its own fields)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{family}: hidden_act {hf.get('hidden_act')!r} is not supported (silu only)")
    theta, yarn_fields = _rope_from_hf(hf, family, default_theta, yarn)
    d, n_head = hf["hidden_size"], hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    model = dict(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["num_hidden_layers"],
                 max_seq_len=hf.get("max_position_embeddings", 4096),
                 position=dict(kind="rope", rope_theta=theta), norm=dict(kind="rmsnorm", eps=hf.get("rms_norm_eps", 1e-6)),
                 attention=dict(n_head=n_head, n_kv_head=_get(hf, "num_key_value_heads", n_head),
                                head_dim=_get(hf, "head_dim", d // n_head), window=window, qkv_bias=bias, out_bias=bias),
                 mlp=dict(kind="swiglu", d_ff=hf["intermediate_size"], bias=bool(hf.get("mlp_bias", False))),
                 tie_embeddings=hf.get("tie_word_embeddings", False))
    if yarn_fields:  # DeepSeek's YaRN belongs to its MLA
        model["attention"]["mla"] = yarn_fields
    return model


def _llama_tensors(moe: str | None = None, *moe_tensors: tuple[str, str], dense_mlp: bool = True) -> dict:
    """`names` and `experts` of the llama layout. `moe`: the HF module of a MoE layer (its router is
    `{moe}.gate`, its experts `{moe}.experts.{e}`), None in a dense family; `moe_tensors`: the
    family's other MoE tensors as (torch_ref, HF) names within a layer; `dense_mlp`: whether the
    family has dense MLP layers."""
    layer = [("attn_norm.", "input_layernorm."), ("mlp_norm.", "post_attention_layernorm."), ("attn.", "self_attn.")]
    if moe:
        layer += [("mlp.router.weight", f"{moe}.gate.weight"), *moe_tensors]
    if dense_mlp:
        layer += [("mlp.", "mlp.")]
    names = [(r"embed_tokens\.", "model.embed_tokens."), (r"final_norm\.", "model.norm."), (r"lm_head\.", "lm_head."),
             *((r"layers\.(\d+)\." + re.escape(ours), r"model.layers.\1." + theirs) for ours, theirs in layer)]
    experts = f"model.layers.{{layer}}.{moe}.experts.{{e}}.{{proj}}.weight" if moe else None
    return dict(names=tuple(names), experts=experts)


def _llama_checks(cfg: ModelConfig, mlp_bias: bool = False) -> list[tuple[bool, str]]:
    """What every llama-layout family needs: RoPE, RMSNorm, SwiGLU (and no MLP bias unless `mlp_bias`)."""
    checks = [(cfg.position.kind == "rope", f"position.kind={cfg.position.kind!r} (RoPE only)"),
              (cfg.norm.kind == "rmsnorm", f"norm.kind={cfg.norm.kind!r} (RMSNorm only)"),
              (cfg.mlp.kind == "swiglu", f"mlp.kind={cfg.mlp.kind!r} (SwiGLU only)")]
    return checks + ([] if mlp_bias else [(not cfg.mlp.bias, "MLP biases (model.mlp.bias)")])


def _mha_checks(cfg: ModelConfig, qkv_bias: bool = False) -> list[tuple[bool, str]]:
    """Multi-head attention without an output bias, and without q/k/v biases unless `qkv_bias`."""
    a = cfg.attention
    return [(a.kind == "mha", "Multi-head Latent Attention"),
            (not a.qkv_bias or qkv_bias, "q/k/v biases (model.attention.qkv_bias)"),
            (not a.out_bias, "an output-projection bias (model.attention.out_bias)")]


def _dense_check(cfg: ModelConfig) -> tuple[bool, str]:
    return not cfg.moe.n_routed_experts, "Mixture-of-Experts layers"


_ATTENTION_BIAS = "qkv_bias without out_bias (HF attention_bias sets both)"
_NO_WINDOW = "a sliding window (model.attention.window)"


def _softmax_moe_checks(cfg: ModelConfig) -> list[tuple[bool, str]]:
    """Mixtral's and Qwen2-MoE's router: softmax top-k over all experts, unscaled."""
    moe = cfg.moe
    return [(moe.n_routed_experts > 0, "a dense model (no Mixture-of-Experts layers)"),
            (moe.n_group == 1, "group-limited routing (model.moe.n_group)"),
            (moe.routed_scaling_factor == 1.0, "routed_scaling_factor != 1"),
            (moe.router == "softmax", f"router={moe.router!r} (softmax only)")]


def _moe_layers(cfg: ModelConfig) -> list[int]:
    from jaxllm.model.blocks import is_moe_layer

    return [i for i in range(cfg.n_layer) if is_moe_layer(cfg, i)]


# ---------------------------------------------------------------------------------------------
# GPT-2: learned positions, LayerNorm, GELU, biases everywhere; Conv1D weights and a fused c_attn

GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def _gpt2_config(cfg: ModelConfig) -> dict:
    return {"n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
            "n_head": cfg.attention.n_head, "n_inner": cfg.mlp.d_ff, "activation_function": GPT2_ACTIVATIONS[cfg.mlp.kind],
            "layer_norm_epsilon": cfg.norm.eps, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _gpt2_model(hf: dict) -> dict:
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
        hf.get("activation_function", "gelu_new"))
    if act is None:
        raise ConversionError(f"gpt2: activation_function {hf.get('activation_function')!r} is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ConversionError("gpt2: only scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false is supported")
    d = hf["n_embd"]
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["n_layer"], max_seq_len=hf["n_positions"],
                position=dict(kind="learned"), norm=dict(kind="layernorm", eps=hf.get("layer_norm_epsilon", 1e-5)),
                attention=dict(n_head=hf["n_head"], qkv_bias=True, out_bias=True),
                mlp=dict(kind=act, d_ff=_get(hf, "n_inner", 4 * d), bias=True),
                tie_embeddings=hf.get("tie_word_embeddings", True))


def _gpt2_refusals(cfg: ModelConfig) -> list[str]:
    a = cfg.attention
    return _refused((cfg.position.kind == "learned", f"position.kind={cfg.position.kind!r} (GPT-2 has learned positions)"),
                    (cfg.norm.kind == "layernorm" and cfg.norm.bias, "a norm other than LayerNorm with bias"),
                    (a.kind == "mha" and a.n_kv_head == a.n_head, "grouped-query or latent attention"),
                    (a.head_dim * a.n_head == cfg.d_model, "head_dim * n_head != d_model"),
                    (a.window is None, _NO_WINDOW),
                    (a.qkv_bias and a.out_bias and cfg.mlp.bias, "attention or MLP projections without bias"),
                    (cfg.mlp.kind in GPT2_ACTIVATIONS, f"mlp.kind={cfg.mlp.kind!r}"),
                    _dense_check(cfg))


GPT2 = HFFamily(
    "gpt2", "GPT2LMHeadModel", config_out=_gpt2_config, config_in=_gpt2_model, refusals=_gpt2_refusals,
    names=((r"embed_tokens\.weight", "transformer.wte.weight"), (r"embed_positions\.weight", "transformer.wpe.weight"),
           (r"final_norm\.", "transformer.ln_f."), (r"layers\.(\d+)\.attn_norm\.", r"transformer.h.\1.ln_1."),
           (r"layers\.(\d+)\.mlp_norm\.", r"transformer.h.\1.ln_2."),
           (r"layers\.(\d+)\.attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
           (r"layers\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.c_fc."),
           (r"layers\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj."), (r"lm_head\.weight", "lm_head.weight")),
    transposed=r"^layers\.\d+\.(attn\.o_proj|mlp\.up_proj|mlp\.down_proj)\.weight$",
    fused_qkv="transformer.h.{layer}.attn.c_attn.{leaf}")


# ---------------------------------------------------------------------------------------------
# Llama and Mistral: dense llama layout; Llama has biases, Mistral a sliding window

def _llama_refusals(cfg: ModelConfig) -> list[str]:
    a = cfg.attention
    return _refused(*_llama_checks(cfg, mlp_bias=True), (a.kind == "mha", "Multi-head Latent Attention"),
                    (a.window is None, "a sliding window (use family 'mistral')"),
                    (a.qkv_bias == a.out_bias, _ATTENTION_BIAS), _dense_check(cfg),
                    # transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 on load
                    (cfg.d_model % a.n_head == 0,
                     f"model.d_model={cfg.d_model} with model.attention.n_head={a.n_head}: transformers' "
                     f"LlamaConfig needs d_model divisible by n_head (use family 'mistral')"))


LLAMA = HFFamily(
    "llama", "LlamaForCausalLM",
    config_out=lambda cfg: {**_llama_config(cfg), "attention_bias": cfg.attention.qkv_bias,
                            "mlp_bias": cfg.mlp.bias, "pretraining_tp": 1},
    config_in=lambda hf: _llama_model(hf, "llama"),
    refusals=_llama_refusals,
    **_llama_tensors())

MISTRAL = HFFamily(
    "mistral", "MistralForCausalLM",
    config_out=lambda cfg: {**_llama_config(cfg), "sliding_window": cfg.attention.window},
    config_in=lambda hf: _llama_model(hf, "mistral", window=hf.get("sliding_window")),
    refusals=lambda cfg: _refused(*_llama_checks(cfg), *_mha_checks(cfg), _dense_check(cfg)),
    **_llama_tensors())


# ---------------------------------------------------------------------------------------------
# Mixtral: every layer MoE (softmax router, renormalised top-k), experts under block_sparse_moe


def _mixtral_config(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    return {**_llama_config(cfg), "sliding_window": cfg.attention.window,
            "intermediate_size": moe.moe_intermediate_size, "num_local_experts": moe.n_routed_experts,
            "num_experts_per_tok": moe.num_experts_per_tok, "router_aux_loss_coef": moe.aux_loss_coef,
            "router_jitter_noise": 0.0, "output_router_logits": False}


def _mixtral_model(hf: dict) -> dict:
    model = _llama_model(hf, "mixtral", window=hf.get("sliding_window"), default_theta=1e6)
    model["moe"] = dict(n_routed_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                        moe_intermediate_size=hf["intermediate_size"], router="softmax", norm_topk_prob=True,
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.0))
    return model


def _mixtral_refusals(cfg: ModelConfig) -> list[str]:
    moe = cfg.moe
    return _refused(*_llama_checks(cfg), *_mha_checks(cfg), *_softmax_moe_checks(cfg),
                    (moe.norm_topk_prob, "norm_topk_prob=false (Mixtral always renormalises)"),
                    (moe.n_shared_experts == 0, "shared experts"),
                    (moe.first_k_dense == 0 and moe.moe_every == 1, "dense layers (every Mixtral layer is MoE)"))


MIXTRAL = HFFamily(
    "mixtral", "MixtralForCausalLM", config_out=_mixtral_config, config_in=_mixtral_model, refusals=_mixtral_refusals,
    **_llama_tensors("block_sparse_moe", dense_mlp=False),
    expert_proj={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})


# ---------------------------------------------------------------------------------------------
# Qwen2-MoE: softmax router, one gated shared expert, q/k/v biases, dense layers at mlp_only_layers


def _qwen2_moe_config(cfg: ModelConfig) -> dict:
    moe, moe_layers = cfg.moe, _moe_layers(cfg)
    return {**_llama_config(cfg), "qkv_bias": cfg.attention.qkv_bias, "num_experts": moe.n_routed_experts,
            "num_experts_per_tok": moe.num_experts_per_tok, "moe_intermediate_size": moe.moe_intermediate_size,
            "norm_topk_prob": moe.norm_topk_prob,
            "shared_expert_intermediate_size": moe.n_shared_experts * moe.shared_intermediate_size,
            "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(cfg.n_layer) if i not in moe_layers],
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer,
            "layer_types": ["full_attention"] * cfg.n_layer, "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False}


def _qwen2_moe_model(hf: dict) -> dict:
    model = _llama_model(hf, "qwen2_moe")
    if hf.get("use_sliding_window"):
        raise ConversionError("qwen2_moe: use_sliding_window=true is not supported")
    model["attention"].update(qkv_bias=hf.get("qkv_bias", True), out_bias=False)
    step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    moe_layers = [i for i in range(model["n_layer"]) if i not in only and hf["num_experts"] > 0 and (i + 1) % step == 0]
    model["moe"] = dict(n_routed_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                        moe_intermediate_size=hf["moe_intermediate_size"], n_shared_experts=1,
                        shared_intermediate_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True,
                        router="softmax", norm_topk_prob=hf.get("norm_topk_prob", False),
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.0), **_placement(moe_layers, model["n_layer"]))
    return model


def _placement(moe_layers: list[int], n_layer: int) -> dict:
    """first_k_dense / moe_every that give exactly `moe_layers`, or a ConversionError."""
    if not moe_layers:
        raise ConversionError("qwen2_moe: a model without MoE layers is not supported (use llama)")
    first = moe_layers[0]
    every = moe_layers[1] - first if len(moe_layers) > 1 else 1
    if moe_layers != list(range(first, n_layer, every)):
        raise ConversionError(f"qwen2_moe: MoE layers {moe_layers} are not 'every k-th layer from layer f' "
                              "(jaxllm's moe.first_k_dense / moe.moe_every)")
    return dict(first_k_dense=first, moe_every=every)


def _qwen2_moe_refusals(cfg: ModelConfig) -> list[str]:
    return _refused(*_llama_checks(cfg), *_mha_checks(cfg, qkv_bias=True), *_softmax_moe_checks(cfg),
                    (cfg.attention.window is None, _NO_WINDOW),
                    (cfg.moe.n_shared_experts >= 1 and cfg.moe.shared_expert_gate, "MoE without a gated shared expert"))


QWEN2_MOE = HFFamily(
    "qwen2_moe", "Qwen2MoeForCausalLM", config_out=_qwen2_moe_config, config_in=_qwen2_moe_model,
    refusals=_qwen2_moe_refusals,
    **_llama_tensors("mlp", ("mlp.gated_shared_mlp.", "mlp.shared_expert."),
                     ("mlp.shared_mlp_gate.", "mlp.shared_expert_gate.")))


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3: MLA, sigmoid router with a bias Buffer and group-limited top-k, shared experts


def _deepseek_v3_config(cfg: ModelConfig) -> dict:
    a, m, moe = cfg.attention, cfg.attention.mla, cfg.moe
    out = {**_llama_config(cfg), "num_key_value_heads": a.n_head, "head_dim": m.qk_rope_head_dim,
           "attention_bias": a.qkv_bias, "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank,
           "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
           "qk_head_dim": m.qk_nope_head_dim + m.qk_rope_head_dim, "rope_interleave": m.rope_layout == "interleaved",
           "num_nextn_predict_layers": 0}
    if not moe.n_routed_experts:  # a dense MLA model: every layer is dense
        return {**out, "n_routed_experts": 1, "num_experts_per_tok": 1, "moe_intermediate_size": cfg.mlp.d_ff,
                "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": cfg.n_layer,
                "norm_topk_prob": True, "routed_scaling_factor": 1.0}
    return {**out, "n_routed_experts": moe.n_routed_experts, "num_experts_per_tok": moe.num_experts_per_tok,
            "moe_intermediate_size": moe.moe_intermediate_size, "n_shared_experts": moe.n_shared_experts,
            "n_group": moe.n_group, "topk_group": moe.topk_group, "first_k_dense_replace": moe.first_k_dense,
            "norm_topk_prob": moe.norm_topk_prob, "routed_scaling_factor": moe.routed_scaling_factor,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid"}


def _deepseek_v3_model(hf: dict) -> dict:
    model = _llama_model(hf, "deepseek_v3", yarn=True)
    bias = model["attention"]["qkv_bias"]
    mla = dict(variant="deepseek", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
               qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
               v_head_dim=hf["v_head_dim"], rope_layout="interleaved" if hf.get("rope_interleave", True) else "half",
               latent_norm_eps=model["norm"]["eps"], **model["attention"].get("mla", {}))
    model["attention"] = dict(kind="mla", mla=mla, n_head=model["attention"]["n_head"], head_dim=hf["v_head_dim"],
                              qkv_bias=bias, out_bias=bias)
    first = hf.get("first_k_dense_replace", 0)
    if first < model["n_layer"]:
        if not hf.get("n_shared_experts"):
            raise ConversionError("deepseek_v3: n_shared_experts=0 is not supported")
        model["moe"] = dict(n_routed_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                            moe_intermediate_size=hf["moe_intermediate_size"], n_shared_experts=hf["n_shared_experts"],
                            router="sigmoid", norm_topk_prob=hf.get("norm_topk_prob", True),
                            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                            n_group=_get(hf, "n_group", 1), topk_group=_get(hf, "topk_group", 1), first_k_dense=first)
    return model


def _deepseek_v3_refusals(cfg: ModelConfig) -> list[str]:
    a, moe = cfg.attention, cfg.moe
    routed = [(moe.router == "sigmoid", f"router={moe.router!r} (DeepSeek-V3 routes with sigmoid + bias)"),
              (moe.moe_every == 1, "moe.moe_every != 1 (every layer after first_k_dense is MoE)"),
              (moe.n_shared_experts >= 1, "a MoE layer without shared experts"),
              (not moe.shared_expert_gate, "a gated shared expert (Qwen2-MoE's shared_expert_gate)"),
              (moe.shared_intermediate_size == moe.moe_intermediate_size,
               "shared_intermediate_size != moe_intermediate_size")] if moe.n_routed_experts else []
    return _refused(*_llama_checks(cfg),
                    (a.kind == "mla" and a.mla.variant == "deepseek", "attention other than DeepSeek MLA"
                     + (" (the seed004 MLA variant)" if a.kind == "mla" else "")),
                    (a.window is None, _NO_WINDOW), (a.qkv_bias == a.out_bias, _ATTENTION_BIAS),
                    (a.mla.latent_norm_eps == cfg.norm.eps,
                     "mla.latent_norm_eps != norm.eps (HF uses rms_norm_eps for both)"),
                    *routed)


DEEPSEEK_V3 = HFFamily(
    "deepseek_v3", "DeepseekV3ForCausalLM", config_out=_deepseek_v3_config, config_in=_deepseek_v3_model,
    refusals=_deepseek_v3_refusals,
    **_llama_tensors("mlp", ("mlp.expert_bias", "mlp.gate.e_score_correction_bias"),
                     ("mlp.shared_mlp.", "mlp.shared_experts.")))


FAMILIES: dict[str, HFFamily] = {f.name: f for f in (GPT2, LLAMA, MISTRAL, MIXTRAL, QWEN2_MOE, DEEPSEEK_V3)}


# ---------------------------------------------------------------------------------------------
# Which family, what it cannot express, and its config.json (both ways)


def infer_family(cfg: ModelConfig) -> str:
    """The one family that can hold `cfg`, read off its structure; a ConversionError if none can."""
    if cfg.position.kind == "learned" and cfg.norm.kind == "layernorm":
        return "gpt2"
    if cfg.attention.kind == "mla":
        return "deepseek_v3"
    if cfg.moe.n_routed_experts:
        if cfg.moe.shared_expert_gate:
            return "qwen2_moe"
        if cfg.moe.router == "sigmoid":
            return "deepseek_v3"
        return "mixtral"
    if cfg.position.kind == "rope":
        return "mistral" if cfg.attention.window is not None else "llama"
    raise ConversionError(f"no Hugging Face family fits position.kind={cfg.position.kind!r} with "
                          f"norm.kind={cfg.norm.kind!r}; pass family= one of {', '.join(FAMILIES)}")


def _family(name: str) -> HFFamily:
    if name not in FAMILIES:
        raise ConversionError(f"unknown Hugging Face family {name!r}; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def check_exportable(cfg: ModelConfig, family: str) -> None:
    """Raise a one-line ConversionError naming the first feature of `cfg` that `family` lacks."""
    spec = _family(family)
    moe = cfg.moe
    # Features no family has (training-only settings such as dropout and LayerDrop do not matter).
    refused = _refused((not cfg.diffusion.enabled, "a TiDAR diffusion head (model.diffusion.enabled)"),
                       (cfg.recursion.mode == "none", f"recursion (model.recursion.mode={cfg.recursion.mode!r})"),
                       (not cfg.rezero, "ReZero (model.rezero)"),
                       (not cfg.lm_head_bias, "an LM-head bias (model.lm_head_bias)"),
                       (moe.router != "noisy", "a noisy router (model.moe.router='noisy')"),
                       (moe.capacity_factor is None, "token dropping (model.moe.capacity_factor)"))
    refused = refused or spec.refusals(cfg)
    if refused:
        raise ConversionError(f"{family} cannot express {refused[0]}")


def hf_config(cfg: ModelConfig, family: str) -> dict:
    """config.json for `family` (checked with `check_exportable` first)."""
    spec = _family(family)
    return {**_common_config(cfg, spec), **spec.config_out(cfg)}


def model_config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    """(jaxllm ModelConfig, family) from a config.json dict."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConversionError(f"unsupported Hugging Face model_type {family!r}; supported: {', '.join(FAMILIES)}")
    model = FAMILIES[family].config_in(hf)
    try:
        return config_from_dict({"model": model}).model, family
    except ConfigError as e:
        raise ConversionError(f"{family} config.json does not make a valid jaxllm model: {e}") from None


# ---------------------------------------------------------------------------------------------
# Tensors (torch_ref state_dict <-> HF), through the family's name table

_QKV = re.compile(r"^layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")
_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\w+)$")
_IGNORED = r"\.attn\.(masked_)?bias$|\.rotary_emb\.inv_freq$"  # buffers old checkpoints carry


def to_hf_tensors(state_dict: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """A torch_ref state_dict (`to_state_dict`) as HF tensors, every array C-contiguous."""
    spec = _family(family)
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if spec.fused_qkv and (m := _QKV.match(key)):
            if m[2] != "q":
                continue
            parts = [state_dict[f"layers.{m[1]}.attn.{c}_proj.{m[3]}"] for c in "qkv"]
            fused = np.concatenate(parts, axis=0)  # [3D, D] or [3D]
            out[spec.fused_qkv.format(layer=m[1], leaf=m[3])] = fused.T if m[3] == "weight" else fused
        elif m := _EXPERTS.match(key):
            for e in range(value.shape[0]):
                out[spec.expert_name(m[1], e, m[2])] = value[e]
        elif spec.transposed and re.match(spec.transposed, key):
            out[spec.hf_name(key)] = value.T
        else:
            out[spec.hf_name(key)] = value
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}  # safetensors 0.8: contiguous only


def from_hf_tensors(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                    family: str) -> dict[str, np.ndarray]:
    """HF tensors -> the torch_ref state_dict with keys and shapes `expected` (from the jaxllm model
    built from config.json); missing, unexpected or misshaped tensors are one-line errors."""
    spec = _family(family)
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ConversionError(f"missing tensor {name!r} in the Hugging Face checkpoint")
        used.add(name)
        return np.asarray(tensors[name], dtype=np.float32)

    out = {}
    for key, shape in expected.items():
        if spec.fused_qkv and (m := _QKV.match(key)):
            name = spec.fused_qkv.format(layer=m[1], leaf=m[3])
            fused = take(name)
            fused = fused.T if m[3] == "weight" else fused
            if fused.shape[0] % 3:
                raise ConversionError(f"tensor {name!r} has shape {fused.shape}, expected a multiple of 3 fused q/k/v rows")
            value = np.split(fused, 3, axis=0)["qkv".index(m[2])]
        elif m := _EXPERTS.match(key):
            value = np.stack([take(spec.expert_name(m[1], e, m[2])) for e in range(shape[0])])
        elif spec.transposed and re.match(spec.transposed, key):
            value = take(spec.hf_name(key)).T
        else:
            value = take(spec.hf_name(key))
        if tuple(value.shape) != tuple(shape):
            raise ConversionError(f"tensor for {key!r} has shape {tuple(value.shape)} in the Hugging Face "
                                  f"checkpoint, expected {tuple(shape)}")
        out[key] = np.ascontiguousarray(value)
    ignored = re.compile(_IGNORED + (r"|^lm_head\.weight$" if "lm_head.weight" not in expected else ""))  # tied
    extra = sorted(k for k in set(tensors) - used if not ignored.search(k))
    if extra:
        raise ConversionError(f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all) in the Hugging Face "
                              "checkpoint; config.json does not have it")
    return out


def model_from_hf_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, family: str, seed: int = 0):
    """The jaxllm Transformer of `cfg` holding HF `tensors`, built abstractly: no random init is
    drawn (`jaxllm.convert.state_dict.materialize`); `seed` seeds its RNG streams."""
    from jaxllm.convert.state_dict import materialize, state_dict_shapes
    from jaxllm.model.transformer import abstract_model

    abstract = abstract_model(cfg, seed)
    return materialize(abstract, from_hf_tensors(tensors, state_dict_shapes(abstract), family), seed)


# ---------------------------------------------------------------------------------------------
# Directories


def save_hf(path: str | Path, model, family: str | None = None, tokenizer_dir: str | Path | None = None) -> str:
    """Write `model` (a jaxllm Transformer) as a Hugging Face directory at `path`; returns the family.

    config.json + model.safetensors, plus the tokenizer files found in `tokenizer_dir` (a run
    directory's Hugging Face tokenizer.json, or an HF directory's tokenizer files). The directory
    is built under a temporary name and renamed into place; `path` must not exist yet.
    """
    from safetensors.numpy import save_file

    from jaxllm.convert.state_dict import to_state_dict

    cfg = model.cfg
    if Path(path).exists():
        raise ConversionError(f"output {str(path)!r} already exists; choose a new path")
    family = family or infer_family(cfg)
    check_exportable(cfg, family)
    tensors = to_hf_tensors(to_state_dict(model), family)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    config = hf_config(cfg, family)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
    return family


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy Hugging Face tokenizer files from `src` to `dst`; a jaxllm char tokenizer (not an HF
    format) is skipped. Returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        file = src / name
        if not file.is_file():
            continue
        if name == "tokenizer.json":
            try:
                if json.loads(file.read_text()).get("type") == "char":  # jaxllm's own char tokenizer
                    continue
            except (ValueError, AttributeError):
                continue
            if not (src / "tokenizer_config.json").is_file():
                (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        shutil.copyfile(file, dst / name)
        copied.append(name)
    return copied


def read_hf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors) of a Hugging Face directory (one or sharded safetensors files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise ConversionError(f"{str(config_file)!r} is not valid JSON: {e}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{str(index)!r} is not a valid safetensors index: {e}") from None
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{str(path)!r} has no model.safetensors (PyTorch .bin checkpoints are not supported)")
    tensors = {}
    for name in files:
        try:
            bfloat16 = []  # numpy has no bfloat16: those tensors are read through jax, then widened
            with safe_open(str(path / name), framework="numpy") as f:
                for key in f.keys():
                    if f.get_slice(key).get_dtype() == "BF16":
                        bfloat16.append(key)
                    else:
                        tensors[key] = f.get_tensor(key)
            if bfloat16:
                with safe_open(str(path / name), framework="flax") as f:
                    tensors.update({key: np.asarray(f.get_tensor(key), np.float32) for key in bfloat16})
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ConversionError(f"{str(path / name)!r} is not a readable safetensors file: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return hf, tensors


def load_hf(path: str | Path, rngs_seed: int = 0):
    """(jaxllm Transformer, family) from a Hugging Face directory; the model is built abstractly
    and filled with the checkpoint's tensors (no random init drawn); `rngs_seed` seeds its RNG streams."""
    hf, tensors = read_hf(path)
    if not isinstance(hf, dict):
        raise ConversionError(f"{str(Path(path) / 'config.json')!r} is not a JSON object")
    try:
        cfg, family = model_config_from_hf(hf)
    except KeyError as e:
        raise ConversionError(f"config.json lacks the field {e.args[0]!r}") from None
    return model_from_hf_tensors(tensors, cfg, family, rngs_seed), family
