"""jaxllm <-> GGUF (llama.cpp's file format), architecture `llama`: Llama- and Mixtral-shaped models.

Export goes through the Hugging Face tensors of `jaxllm.convert.hf` (so every layout rule lives in
one place) and renames them to GGUF names as llama.cpp's own converter does:
- attn_q / attn_k rows are permuted from HF's half-split RoPE layout (pairs (i, i + H/2)) to the
  interleaved layout llama.cpp rotates (pairs (2i, 2i + 1)): `permute` below is llama.cpp's
  `LlamaModel.permute`; `unpermute` is its inverse (transformers' GGUF loader does the same);
- Mixtral's routed experts are stacked: ffn_{gate,up,down}_exps [E, out, in], router ffn_gate_inp;
- a tied output projection is omitted (llama.cpp reuses token_embd).
Types: float32, or float16 for every tensor of rank >= 2 except the router (1-D norms stay F32,
as convert_hf_to_gguf writes them). The tokenizer is `tokenizer.ggml.model = "none"` with the
vocabulary size: llama.cpp then runs on token ids (see docs/interop.md).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxllm.convert.hf import check_exportable, infer_family, model_from_hf_tensors, to_hf_tensors
from jaxllm.errors import ConversionError
from jaxllm.files import atomic_path

FAMILIES = ("llama", "mixtral")
DTYPES = ("float32", "float16")
ARCH = "llama"

_NAMES = [  # (Hugging Face name, GGUF name); {i} is the layer
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("model.layers.{i}.block_sparse_moe.gate.weight", "blk.{i}.ffn_gate_inp.weight"),
]
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_EXPERT_GGUF = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rows -> llama.cpp interleaved rows, per head (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rename(name: str, to_gguf: bool) -> str:
    """Hugging Face -> GGUF name (to_gguf) or back, through `_NAMES`."""
    for hf_name, gguf_name in _NAMES:
        src, dst = (hf_name, gguf_name) if to_gguf else (gguf_name, hf_name)
        if m := re.fullmatch(re.escape(src).replace(r"\{i\}", r"(\d+)"), name):
            return dst.format(i=m[1] if m.groups() else "")
    raise ConversionError(f"GGUF {ARCH} has no tensor for {name!r}" if to_gguf
                          else f"unexpected GGUF tensor {name!r} for architecture {ARCH!r}")


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The GGUF tensors (float32, numpy shapes [out, in] / [E, out, in]) of a jaxllm model."""
    from jaxllm.convert.state_dict import to_state_dict

    cfg = model.cfg
    family = infer_family(cfg)
    if family not in FAMILIES:
        raise ConversionError(f"GGUF export supports {', '.join(FAMILIES)}-shaped models; this one is {family}"
                              + (" (sliding window)" if family == "mistral" else ""))
    check_exportable(cfg, family)
    if cfg.attention.qkv_bias or cfg.attention.out_bias or cfg.mlp.bias:
        raise ConversionError("GGUF export cannot express attention or MLP biases")
    if cfg.attention.window is not None:
        raise ConversionError("GGUF llama cannot express a sliding window (model.attention.window)")
    hf_tensors = to_hf_tensors(to_state_dict(model), family)
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, value in hf_tensors.items():
        if m := _EXPERT.match(name):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = value
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        gguf_name = _rename(name, to_gguf=True)
        if gguf_name.endswith("attn_q.weight"):
            value = permute(value, cfg.attention.n_head)
        elif gguf_name.endswith("attn_k.weight"):
            value = permute(value, cfg.attention.n_kv_head)
        out[gguf_name] = value
    for (layer, w), by_expert in experts.items():
        out[f"blk.{layer}.{_EXPERT_GGUF[w]}.weight"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def save_gguf(path: str | Path, model, dtype: str = "float32", name: str = "jaxllm") -> None:
    """Write `model` as a GGUF file (architecture llama) at `path`, atomically."""
    import gguf

    if dtype not in DTYPES:
        raise ConversionError(f"GGUF dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    path = Path(path)
    if path.exists():
        raise ConversionError(f"output {str(path)!r} already exists; choose a new path")
    cfg = model.cfg
    a, moe = cfg.attention, cfg.moe
    tensors = gguf_tensors(model)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_name(name)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(moe.moe_intermediate_size if moe.n_routed_experts else cfg.mlp.d_ff)
        writer.add_head_count(a.n_head)
        writer.add_head_count_kv(a.n_kv_head)
        writer.add_key_length(a.head_dim)
        writer.add_value_length(a.head_dim)
        writer.add_layer_norm_rms_eps(cfg.norm.eps)
        writer.add_rope_freq_base(cfg.position.rope_theta)
        writer.add_rope_dimension_count(a.head_dim)
        writer.add_vocab_size(cfg.vocab_size)
        if moe.n_routed_experts:
            writer.add_expert_count(moe.n_routed_experts)
            writer.add_expert_used_count(moe.num_experts_per_tok)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_tokenizer_model("none")
        for tensor_name, value in tensors.items():
            if dtype == "float16" and value.ndim >= 2 and not tensor_name.endswith("ffn_gate_inp.weight"):
                value = value.astype(np.float16)
            writer.add_tensor(tensor_name, value)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:  # a failed write (a full disk) closes the file too, before atomic_path removes it
            writer.close()


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata {key: value}, tensors {name: float32 array, numpy shape}) of a GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        tensors = {}
        for t in reader.tensors:
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ConversionError(f"GGUF tensor {t.name!r} is {t.tensor_type.name}; only F32 and F16 files are read")
            tensors[t.name] = np.asarray(t.data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
    except ConversionError:
        raise
    except Exception as e:  # gguf raises ValueError, struct errors, IndexError... on a corrupt file
        raise ConversionError(f"{str(path)!r} is not a readable GGUF file: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return metadata, tensors


def load_gguf(path: str | Path, seed: int = 0):
    """A jaxllm Transformer from a llama-architecture GGUF file in F32 or F16 (Llama or Mixtral shaped),
    built abstractly and filled with the file's tensors (no random init drawn); `seed` seeds its RNG streams."""
    from jaxllm.config import config_from_dict
    from jaxllm.errors import ConfigError

    metadata, tensors = read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch != ARCH:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; allowed: {ARCH!r}")

    def meta(key, default=None):
        value = metadata.get(f"{ARCH}.{key}", default)
        if value is None:
            raise ConversionError(f"GGUF file lacks the metadata key {ARCH}.{key!r}")
        return value

    def f32(value) -> float:  # GGUF stores float32: the shortest decimal that rounds to it (1e-06, not 9.99e-07)
        return float(str(np.float32(value)))

    n_head, n_kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
    d = int(meta("embedding_length"))
    n_experts = int(meta("expert_count", 0))
    vocab = int(metadata.get(f"{ARCH}.vocab_size") or tensors["token_embd.weight"].shape[0])
    ff = int(meta("feed_forward_length"))
    model = dict(vocab_size=vocab, d_model=d, n_layer=int(meta("block_count")), max_seq_len=int(meta("context_length")),
                 position=dict(kind="rope", rope_theta=f32(meta("rope.freq_base", 10000.0))),
                 norm=dict(kind="rmsnorm", eps=f32(meta("attention.layer_norm_rms_epsilon"))),
                 attention=dict(n_head=n_head, n_kv_head=n_kv, head_dim=int(meta("attention.key_length", d // n_head))),
                 mlp=dict(kind="swiglu", d_ff=ff), tie_embeddings="output.weight" not in tensors)
    if n_experts:
        model["moe"] = dict(n_routed_experts=n_experts, num_experts_per_tok=int(meta("expert_used_count")),
                            moe_intermediate_size=ff, router="softmax", norm_topk_prob=True)
    try:
        cfg = config_from_dict({"model": model}).model
    except ConfigError as e:
        raise ConversionError(f"GGUF metadata does not make a valid jaxllm model: {e}") from None
    family = "mixtral" if n_experts else "llama"
    hf_tensors = {}
    for name, value in tensors.items():
        m = re.match(r"^blk\.(\d+)\.(ffn_gate_exps|ffn_up_exps|ffn_down_exps)\.weight$", name)
        if m:
            w = {v: k for k, v in _EXPERT_GGUF.items()}[m[2]]
            for e in range(value.shape[0]):
                hf_tensors[f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{w}.weight"] = value[e]
            continue
        hf_name = _rename(name, to_gguf=False)
        if name.endswith("attn_q.weight"):
            value = unpermute(value, n_head)
        elif name.endswith("attn_k.weight"):
            value = unpermute(value, n_kv)
        hf_tensors[hf_name] = value
    return model_from_hf_tensors(hf_tensors, cfg, family, seed)

