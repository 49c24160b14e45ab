"""`jaxllm convert` / scripts/convert.py: every source and target, exact round trips, one-line errors
that leave no output behind, and the features each Hugging Face family refuses."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jaxllm.cli import main
from jaxllm.config import Config, config_from_dict, load_config, to_dict, to_yaml
from jaxllm.convert import load_safetensors, save_safetensors
from jaxllm.errors import ConversionError
from jaxllm.convert.hf import check_exportable, infer_family
from jaxllm.model import Transformer
from jaxllm.model.params import Buffer

ROOT = Path(__file__).resolve().parents[1]
LLAMA = config_from_dict({"model": dict(
    vocab_size=64, d_model=32, n_layer=2, max_seq_len=64, position=dict(kind="rope"), norm=dict(kind="rmsnorm"),
    attention=dict(n_head=4, n_kv_head=2), mlp=dict(kind="swiglu", d_ff=48), tie_embeddings=False)}).model
GPT = config_from_dict({"model": dict(vocab_size=64, d_model=32, n_layer=1, max_seq_len=64,
                                      attention=dict(n_head=4, qkv_bias=True, out_bias=True),
                                      mlp=dict(kind="gelu_tanh", bias=True))}).model


def weights(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def convert(*args: str) -> int:
    return main(["convert", *map(str, args)])


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_every_format_round_trips_exactly(tmp_path):
    source = Transformer(LLAMA, rngs=nnx.Rngs(0))
    save_safetensors(tmp_path / "a.safetensors", source, config=to_dict(LLAMA))
    (tmp_path / "llama.yaml").write_text(to_yaml(Config(model=LLAMA)))  # a torch .pt file has no config
    steps = [("a.safetensors", "b_hf", "hf"), ("b_hf", "c.gguf", "gguf"), ("c.gguf", "d.pt", "torch"),
             ("d.pt", "e", "jaxllm"), ("e", "f.safetensors", "torch"), ("f.safetensors", "g_hf", "hf"),
             ("g_hf", "h.safetensors", "jaxllm")]
    for src, dst, to in steps:
        extra = ["--config", tmp_path / "llama.yaml"] if src.endswith(".pt") else []
        assert convert(tmp_path / src, tmp_path / dst, "--to", to, *extra) == 0, (src, dst)
    assert json.loads((tmp_path / "b_hf" / "config.json").read_text())["model_type"] == "llama"
    assert listing(tmp_path / "e") == {"model.safetensors", "config.yaml"}
    state_dict, config = load_safetensors(tmp_path / "h.safetensors")
    assert config_from_dict({"model": config}).model == LLAMA
    target = Transformer(LLAMA, rngs=nnx.Rngs(1))
    from jaxllm.convert import from_state_dict
    from_state_dict(target, state_dict)
    for key, value in weights(source).items():
        np.testing.assert_array_equal(weights(target)[key], value, err_msg=key)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_training_run_directory_converts_with_its_tokenizer(tmp_path):
    """A run directory as the training loop writes it (config.yaml, tokenizer.json, an orbax
    checkpoint of the model + optimizer state and the data iterator), made without training steps."""
    import jax

    from jaxllm.sharding import make_mesh
    from jaxllm.train import data as data_lib
    from jaxllm.checkpoint import Checkpointer, load_model
    from jaxllm.train.loop import Trainer, prepare_run_dir

    corpus = tmp_path / "corpus.txt"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "far", "away"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=12)) + "." for _ in range(100)))
    cfg = load_config(ROOT / "configs/tiny-llama.yaml", [
        "model.n_layer=1", "model.d_model=32", "model.attention.n_head=2", "model.attention.n_kv_head=1",
        "model.max_seq_len=32", "model.mlp.d_ff=32", "train.seq_len=32", "train.batch_size=2",
        "train.tokenizer=bpe", "train.bpe_vocab_size=300", f"train.data={corpus}"])
    cfg, _, tokens = prepare_run_dir(cfg, tmp_path / "run")
    mesh = make_mesh("data:1", jax.devices()[:1])
    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", keep=1)
    checkpointer.save(1, trainer.state, data_lib.train_iterator(tokens, 32, 2, 0), {"step": 1, "stage": 0})
    checkpointer.close()
    assert convert(tmp_path / "run", tmp_path / "hf", "--to", "hf") == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= listing(tmp_path / "hf")
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.decode(tokenizer.encode("the lazy dog")) == "the lazy dog"
    assert convert(tmp_path / "hf", tmp_path / "back", "--to", "jaxllm") == 0
    assert listing(tmp_path / "back") == {"model.safetensors", "config.yaml", "tokenizer.json"}
    expected, step = load_model(tmp_path / "run")
    assert step == 1
    state_dict, _ = load_safetensors(tmp_path / "back" / "model.safetensors")
    from jaxllm.convert import to_state_dict
    for key, value in to_state_dict(expected).items():
        np.testing.assert_array_equal(state_dict[key], value, err_msg=key)


def bad_hf_dir(tmp_path: Path) -> Path:
    """A Hugging Face directory whose config.json disagrees with its tensors (wider model)."""
    from jaxllm.convert.hf import save_hf

    save_hf(tmp_path / "hf_bad", Transformer(LLAMA, rngs=nnx.Rngs(0)))
    config = json.loads((tmp_path / "hf_bad" / "config.json").read_text())
    config["intermediate_size"] = 64
    (tmp_path / "hf_bad" / "config.json").write_text(json.dumps(config))
    return tmp_path / "hf_bad"


def error_cases(tmp_path: Path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + bytes(range(60)))
    gpt = tmp_path / "gpt.safetensors"
    save_safetensors(gpt, Transformer(GPT, rngs=nnx.Rngs(0)), config=to_dict(GPT))
    plain = tmp_path / "plain.safetensors"  # a torch_ref state_dict without a config
    from safetensors.numpy import save_file
    from jaxllm.convert import to_state_dict
    save_file(to_state_dict(Transformer(GPT, rngs=nnx.Rngs(0))), str(plain))
    return [
        ([corrupt, "out_hf", "--to", "hf"], "is not a readable safetensors file"),
        ([bad_gguf, "out.safetensors", "--to", "jaxllm"], "is not a readable GGUF file"),
        ([gpt, "out.gguf", "--to", "gguf"], "GGUF export supports llama, mixtral-shaped models; this one is gpt2"),
        ([gpt, "out_hf", "--to", "hf", "--family", "llama"], "llama cannot express position.kind='learned'"),
        ([bad_hf_dir(tmp_path), "out.safetensors", "--to", "jaxllm"], "has shape (32, 48) in the Hugging Face checkpoint, expected (32, 64)"),
        ([plain, "out_hf", "--to", "hf"], "holds no jaxllm config: pass --config"),
        ([gpt, gpt, "--to", "torch"], "already exists"),
        ([gpt, "out.bin", "--to", "torch"], "must end in .pt, .pth or .safetensors"),
        ([gpt, "out.gguf", "--to", "hf", "--dtype", "float16"], "--dtype applies to --to gguf only"),
        ([tmp_path / "nope.safetensors", "out_hf", "--to", "hf"], "does not exist"),
    ]


def test_bad_inputs_are_one_line_errors_that_write_nothing(tmp_path, capsys):
    cases = error_cases(tmp_path)
    before = listing(tmp_path)
    for args, message in cases:
        args = [a if isinstance(a, Path) else tmp_path / a if a.startswith("out") else a for a in args]
        assert convert(*args) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (message, err)
        assert listing(tmp_path) == before, message  # no output, no temporary


def test_the_script_exits_2_with_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not a gguf file at all")
    result = subprocess.run([sys.executable, "scripts/convert.py", str(corrupt), str(tmp_path / "out"), "--to", "hf"],
                            cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert listing(tmp_path) == {"corrupt.gguf"}


REFUSED = [  # (family, model overrides of the Llama config, words the error must contain)
    ("llama", {"diffusion": {"enabled": True}}, "TiDAR"),
    ("llama", {"recursion": {"mode": "loop"}}, "recursion"),
    ("llama", {"rezero": True}, "ReZero"),
    ("llama", {"attention": {"window": 16}}, "sliding window"),
    ("llama", {"lm_head_bias": True}, "LM-head bias"),
    ("mixtral", {"moe": {"n_routed_experts": 4, "router": "noisy"}}, "noisy router"),
    ("mixtral", {"moe": {"n_routed_experts": 4, "norm_topk_prob": False}}, "norm_topk_prob"),
    ("mixtral", {"moe": {"n_routed_experts": 4, "capacity_factor": 1.0}}, "capacity_factor"),
    ("qwen2_moe", {"moe": {"n_routed_experts": 4}}, "gated shared expert"),
    ("deepseek_v3", {"attention": {"kind": "mla", "mla": {"variant": "seed004", "q_lora_rank": 16}}}, "seed004"),
    ("deepseek_v3", {"attention": {"kind": "mla"}, "norm": {"eps": 1e-6}, "moe": {"n_routed_experts": 4, "n_shared_experts": 1}},
     "sigmoid"),
    ("deepseek_v3", {"attention": {"kind": "mla"}}, "latent_norm_eps"),
    ("gpt2", {}, "position.kind='rope'"),
]


@pytest.mark.parametrize("family,overrides,words", REFUSED, ids=[r[2] for r in REFUSED])
def test_features_a_family_cannot_express_are_refused_by_name(family, overrides, words):
    model = to_dict(LLAMA)
    for key, value in overrides.items():
        model[key] = {**model[key], **value} if isinstance(value, dict) else value
    model["attention"]["mla"] = {**model["attention"]["mla"], **overrides.get("attention", {}).get("mla", {})}
    cfg = config_from_dict({"model": model}).model
    with pytest.raises(ConversionError) as err:
        check_exportable(cfg, family)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_family_inference():
    assert infer_family(GPT) == "gpt2"
    assert infer_family(LLAMA) == "llama"
    assert infer_family(dataclasses.replace(LLAMA, attention=dataclasses.replace(LLAMA.attention, window=8))) == "mistral"
