"""Fine-tuning from imported weights (`train.py --init-from`): a tiny random Hugging Face Llama saved
with `save_pretrained` is imported, trained a few steps on a small corpus (the loss falls, the
weights move away from the imported ones only a little), exported back to Hugging Face, and
transformers loads the export with nothing missing and the fine-tuned model's logits. Bad
--init-from input is one line, exit 2, nothing written."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoint import load_model
from jaxllm.cli import run
from jaxllm.convert.hf import load_hf
from jaxllm.convert.state_dict import to_state_dict
from jaxllm.model import Transformer
from jaxllm.train.tokenizer import CharTokenizer

torch = pytest.importorskip("torch", reason="the Hugging Face round trip needs torch")
transformers = pytest.importorskip("transformers", reason="the Hugging Face round trip needs transformers")

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
TRAIN = ["train.max_steps=8", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=2", "train.lr=3e-3",
         "train.eval_every=4", "train.eval_batches=2", "train.log_every=1", "train.sample_every=0",
         "train.mesh=data:8", "train.checkpoint_every=8"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Llama from transformers' own code, saved with save_pretrained, with a tokenizer.json."""
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tokenizer = CharTokenizer(CHARS)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size + 2, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "far", "away"]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 10)) + "." for _ in range(400)), encoding="utf-8")
    return path


def train(capsys, *args) -> tuple[int, str]:
    code = run("train", [*map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def fine_tuned(capsys, hf_dir, run_dir, corpus, *overrides) -> tuple[list[float], object, object]:
    """Train from the HF weights: (the logged losses, the trained model, the imported one)."""
    code, err = train(capsys, "--init-from", hf_dir, "--run-dir", run_dir, f"train.data={corpus}", *TRAIN, *overrides)
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], load_model(run_dir)[0], load_hf(hf_dir)[0]


def hf_logits_match(path, model) -> None:
    """transformers loads `path` with nothing missing or unexpected, and its logits are `model`'s."""
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                                 output_loading_info=True)
    assert not any(info.values()), info
    tokens = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = hf.eval()(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), theirs, atol=1e-4, rtol=1e-4)


def test_import_fine_tune_export_round_trip(hf_dir, corpus, tmp_path, capsys):
    run_dir = tmp_path / "ft"
    losses, tuned, source = fine_tuned(capsys, hf_dir, run_dir, corpus)
    saved = (run_dir / "config.yaml").read_text()
    assert f"init_from: {hf_dir}" in saved and str(hf_dir / "tokenizer.json") in saved  # where it started
    assert losses[-1] < losses[0] - 0.2
    a, b = to_state_dict(tuned), to_state_dict(source)
    assert a.keys() == b.keys() and tuned.cfg.vocab_size == source.cfg.vocab_size == len(CHARS) + 3
    moved = sum(np.linalg.norm(a[k] - b[k]) for k in a) / sum(np.linalg.norm(b[k]) for k in a)
    assert 0 < moved < 0.2  # started from the imported weights, and trained

    out = tmp_path / "exported"
    assert run("convert", [str(run_dir), str(out), "--to", "hf"]) == 0
    hf_logits_match(out, tuned)


def test_bad_init_from_is_one_line_and_writes_nothing(hf_dir, corpus, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    cases = [(["--init-from", tmp_path / "missing"], "does not exist"),
             (["--init-from", garbage], "garbage.safetensors"),
             (["--init-from", hf_dir, "model.n_layer=3"], "changes a shape of the weights")]
    for args, message in cases:
        code, err = train(capsys, *args, "--run-dir", tmp_path / "run", f"train.data={corpus}", *TRAIN)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "run").exists()
    code, err = train(capsys, "--init-from", hf_dir, "model.dropout=0.1", "train.trainable=[nothing.*]",
                      "--run-dir", tmp_path / "run", f"train.data={corpus}", *TRAIN)  # a shape-keeping override is fine
    assert code == 2 and "train.trainable pattern 'nothing.*' matches no parameter" in err
    assert not (tmp_path / "run").exists()


def test_lora_fine_tune_merges_into_weights_hugging_face_loads(hf_dir, corpus, tmp_path, capsys):
    """The issue's end-to-end path: import -> LoRA fine-tune (only the adapters move, the loss falls)
    -> merge -> export -> transformers loads it (loading info empty) with the adapted model's logits."""
    run_dir = tmp_path / "lora"
    losses, tuned, source = fine_tuned(
        capsys, hf_dir, run_dir, corpus, "model.lora.rank=4", "model.lora.alpha=8", "train.lr=1e-2",
        "model.lora.targets=['layers.*.attn.q_proj', 'layers.*.attn.v_proj', 'layers.*.mlp.down_proj']")
    assert losses[-1] < losses[0] - 0.1
    a, b = to_state_dict(tuned), to_state_dict(source)
    adapters = [k for k in a if ".lora_" in k]
    assert len(adapters) == 2 * 3 * 2  # A and B on 3 projections in 2 layers
    for key in b:  # the base weights are frozen: bit-identical to the imported ones
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(np.abs(a[k]).max() > 0 for k in adapters if k.endswith("lora_b"))  # B moved off zero

    assert run("convert", [str(run_dir), str(tmp_path / "unmerged"), "--to", "hf"]) == 2  # adapters need --merge-lora
    assert not (tmp_path / "unmerged").exists()
    capsys.readouterr()
    out = tmp_path / "merged"
    assert run("convert", [str(run_dir), str(out), "--to", "hf", "--merge-lora"]) == 0
    hf_logits_match(out, tuned)  # the adapted model, adapters unmerged
    tokens = np.random.default_rng(1).integers(0, tuned.cfg.vocab_size, (2, 24))
    assert np.abs(np.asarray(tuned(tokens)) - np.asarray(source(tokens))).max() > 1e-3  # the adapters changed it


def test_adapters_alone_save_and_load_in_pefts_layout(hf_dir, tmp_path):
    """`save_peft` writes what `peft.PeftModel.from_pretrained` applies to the Hugging Face base (the
    same logits as jaxllm's adapted model), and `load_peft` reads it back into jaxllm exactly."""
    import dataclasses

    import peft  # a test dependency (pyproject dev extra)

    from flax import nnx

    from jaxllm.config import LoRAConfig
    from jaxllm.convert import model_from_state_dict
    from jaxllm.convert.peft import load_peft, save_peft

    base, _ = load_hf(hf_dir)
    cfg = dataclasses.replace(base.cfg, lora=LoRAConfig(rank=4, alpha=8.0, targets=(
        "layers.*.attn.q_proj", "layers.*.attn.v_proj", "layers.*.mlp.down_proj")))
    sd = to_state_dict(base)
    rng = np.random.default_rng(3)
    full = to_state_dict(Transformer(cfg, rngs=nnx.Rngs(0)))  # the base's weights, random nonzero adapters
    for key in full:
        full[key] = sd[key] if key in sd else (0.3 * rng.standard_normal(full[key].shape)).astype(np.float32)
    adapted = model_from_state_dict(full, cfg)
    save_peft(tmp_path / "adapter", adapted)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with_adapters = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    tokens = np.random.default_rng(1).integers(0, base.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = with_adapters(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(adapted(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert np.abs(ours - np.asarray(base(jnp.asarray(tokens)))).max() > 1e-2  # the adapters matter

    back = load_peft(tmp_path / "adapter", base)
    assert back.cfg.lora.rank == 4
    got, want = to_state_dict(back), to_state_dict(adapted)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
