"""`jaxllm sample`: weights from a safetensors file (torch_ref layout) or a run directory, streaming,
prompt files, the interactive loop and one-line errors with exit code 2."""
import io

import pytest
from flax import nnx

from jaxllm.cli import main
from jaxllm.config import config_from_dict, to_dict
from jaxllm.convert import save_safetensors
from jaxllm.decode import GREEDY, generate
from jaxllm.model import Transformer
from jaxllm.train.tokenizer import CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random model saved as torch_ref weights, with a character tokenizer beside it."""
    directory = tmp_path_factory.mktemp("checkpoint")
    tokenizer = CharTokenizer(CHARS)
    cfg = config_from_dict({"model": dict(vocab_size=tokenizer.vocab_size, d_model=32, n_layer=2, max_seq_len=48,
                                          position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2),
                                          init_std=0.3)}).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    save_safetensors(directory / "model.safetensors", model, config=to_dict(cfg))
    tokenizer.save(directory / "tokenizer.json")
    return directory / "model.safetensors", model, tokenizer


def sample(capsys, *args):
    try:
        code = main(["sample", *map(str, args)])
    except SystemExit as e:  # argparse's own errors exit (one line, status 2: jaxllm.cli.ArgumentParser)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_text_streams_the_decoded_continuation(checkpoint, capsys):
    path, model, tokenizer = checkpoint
    code, out, err = sample(capsys, "--checkpoint", path, "--prompt", "the cat", "--temperature", "0",
                            "--max-new-tokens", "20")
    assert code == 0, err
    expected = tokenizer.decode(generate(model, [tokenizer.encode("the cat")], max_new_tokens=20, sampling=GREEDY)[0])
    assert out == "the cat" + expected + "\n"
    code, torch_out, err = sample(capsys, "--checkpoint", path, "--prompt", "the cat", "--temperature", "0",
                                  "--max-new-tokens", "20", "--engine", "torch", "--no-stream")
    assert code == 0, err
    assert torch_out == out


def test_a_prompt_file_is_one_batch_and_stop_strings_cut_the_text(checkpoint, capsys, tmp_path):
    path, model, tokenizer = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nhello\\nworld\n", encoding="utf-8")  # a literal \n in a line is a newline
    code, out, err = sample(capsys, "--checkpoint", path, "--prompt-file", prompts, "--temperature", "0",
                            "--max-new-tokens", "12")
    assert code == 0, err
    rows = [tokenizer.decode(r) for r in generate(model, [tokenizer.encode(p) for p in ("the cat", "hello\nworld")],
                                                    max_new_tokens=12)]
    assert out == f"--- prompt 0 ---\nthe cat{rows[0]}\n--- prompt 1 ---\nhello\nworld{rows[1]}\n"
    stop = rows[0][3:5]
    code, out, _ = sample(capsys, "--checkpoint", path, "--prompt", "the cat", "--temperature", "0",
                          "--max-new-tokens", "12", "--stop", stop)
    assert code == 0 and out == "the cat" + rows[0][:rows[0].index(stop) + len(stop)] + "\n"


def test_interactive_loop_changes_settings_between_prompts(checkpoint, capsys, monkeypatch):
    path, model, tokenizer = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO("/temperature 0\n/length 7\n/top_p 2\nthe cat\n/settings\n/quit\n"))
    code, out, _ = sample(capsys, "--checkpoint", path, "--interactive", "--no-stream")
    assert code == 0
    expected = tokenizer.decode(generate(model, [tokenizer.encode("the cat")], max_new_tokens=7)[0])
    assert "temperature = 0.0" in out and "max_new_tokens = 7" in out
    assert "error: top_p is 2.0; allowed: a number in (0, 1]" in out  # a bad setting keeps the loop going
    assert "the cat" + expected + "\n" in out
    assert "max_new_tokens 7, temperature 0.0, top_k 0, top_p 1.0" in out


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "a" * 48], "prompt 0 is 48 tokens; the context holds 48"),
    (["--prompt", "Hello?"], "characters outside the vocabulary: '?H'"),
    (["--prompt", "hi", "--top-p", "0"], "top_p is 0.0; allowed"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens is 0; allowed"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, capsys, args, message):
    code, out, err = sample(capsys, "--checkpoint", checkpoint[0], *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_missing_files_are_one_line_errors(checkpoint, capsys, tmp_path):
    for args, message in [
        (["--checkpoint", tmp_path / "nope.safetensors", "--prompt", "hi"], "does not exist"),
        (["--checkpoint", checkpoint[0], "--tokenizer", tmp_path / "no.json", "--prompt", "hi"], "tokenizer file"),
        (["--run", tmp_path, "--prompt", "hi"], "is not a run directory"),
        (["--checkpoint", checkpoint[0]], "nothing to do"),
        (["--prompt", "hi"], "one of the arguments --run --checkpoint is required"),
    ]:
        code, _, err = sample(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.fixture(scope="module")
def tidar_checkpoint(tmp_path_factory):
    """A small random TiDAR model (model.diffusion: one more id, [MASK], past the characters)."""
    directory = tmp_path_factory.mktemp("tidar")
    tokenizer = CharTokenizer(CHARS)
    cfg = config_from_dict({"model": dict(vocab_size=tokenizer.vocab_size + 1, d_model=32, n_layer=2, max_seq_len=64,
                                          position=dict(kind="rope"), attention=dict(n_head=4, n_kv_head=2),
                                          init_std=0.3, diffusion=dict(enabled=True, block_size=4))}).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    save_safetensors(directory / "model.safetensors", model, config=to_dict(cfg))
    tokenizer.save(directory / "tokenizer.json")
    return directory / "model.safetensors", model, tokenizer


@pytest.mark.parametrize("engine", ["jax", "torch"])
def test_speculative_tidar_prints_the_greedy_text_and_its_figures(tidar_checkpoint, capsys, engine):
    path, model, tokenizer = tidar_checkpoint
    args = ["--checkpoint", path, "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "24",
            "--engine", engine]
    code, plain, err = sample(capsys, *args)
    assert code == 0, err
    code, out, err = sample(capsys, *args, "--speculative", "tidar", "--block", "3")
    assert code == 0, err
    assert out == plain  # beta 1 (the default): exactly the AR model's text
    line = err.strip().splitlines()[-1]
    assert line.startswith("[tidar block 3] ") and "tokens per forward" in line and "acceptance" in line
    forwards = int(line.split(" over ")[1].split()[0])
    hist = dict(item.split(":") for item in line.split("accepted: ")[1].split())
    assert sorted(hist) == ["0", "1", "2"] and sum(map(int, hist.values())) == forwards


@pytest.mark.parametrize("args,message", [
    (["--speculative", "tidar"], "needs a model trained with model.diffusion.enabled"),
    (["--block", "4"], "--block is 4, but it only applies with --speculative tidar"),
])
def test_speculative_misuse_is_one_line_and_exit_2(checkpoint, capsys, args, message):
    code, out, err = sample(capsys, "--checkpoint", checkpoint[0], "--prompt", "hi", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_speculative_bad_block_and_beta_are_one_line_errors(tidar_checkpoint, capsys):
    for args, message in ((["--block", "0"], "block is 0; allowed"), (["--beta", "2"], "beta is 2.0; allowed"),
                          (["--no-cache"], "needs the KV cache")):
        code, out, err = sample(capsys, "--checkpoint", tidar_checkpoint[0], "--prompt", "hi", "--speculative", "tidar",
                                *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
