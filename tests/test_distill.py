"""`jaxllm distill`: the self-distillation corpus for a TiDAR drafter is the run's greedy
continuations of prompts from the training split only, then the text itself; the printed
train.val_fraction keeps the text's own validation split; bad input is one line, exit 2, nothing
written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxllm.checkpoint import load_model
from jaxllm.cli import run
from jaxllm.config import load_config
from jaxllm.decode import generate
from jaxllm.tasks.distill import SEPARATOR, prompt_starts
from jaxllm.train.data import split
from jaxllm.train.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.d_model=32", "model.n_layer=1", "model.mlp.d_ff=64", "model.max_seq_len=64", "model.attention.window=16",
         "model.vocab_size=40", "model.diffusion.enabled=false"]
TRAIN = ["train.max_steps=2", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1", "train.eval_every=2",
         "train.eval_batches=1", "train.sample_every=0", "train.mesh=data:8", "train.checkpoint_every=2",
         "train.val_fraction=0.2", "train.wandb=disabled"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, corpus path): the demo preset shrunk, trained 2 steps on a small corpus."""
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "far", "away"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(120)), encoding="utf-8")
    # in a fresh process: XLA:CPU's compile of a train step has segfaulted twice late in a long-lived
    # xdist worker (docs/status.md); the environment (conftest's 8 CPU devices) is inherited
    result = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/tiny-tidar-demo.yaml",
                             "--run-dir", str(root / "run"), "--no-progress", f"train.data={corpus}", *MODEL, *TRAIN],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "run", corpus


def distill(capsys, *args) -> tuple[int, str, str]:
    try:
        code = run("distill", list(map(str, args)))
    except SystemExit as e:  # argparse's own one-line errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_corpus_is_greedy_continuations_of_training_prompts_then_the_text(trained, tmp_path, capsys):
    run_dir, corpus = trained
    out = tmp_path / "mix.txt"
    code, printed, err = distill(capsys, "--run", run_dir, "--data", corpus, "--out", out, "--rows", 5,
                                 "--prompt-tokens", 16, "--new", 12, "--batch", 2, "--seed", 3)
    assert code == 0, err
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    text = corpus.read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text))
    n_train = len(split(ids, load_config(run_dir / "config.yaml").train.val_fraction)[0])
    starts = prompt_starts(n_train, 5, 16, 3)
    assert (starts + 16 <= n_train).all() and len(set(starts.tolist())) == 5  # training split only, distinct here
    model, _ = load_model(run_dir)
    docs = []
    for s in starts:  # one prompt at a time: the script's batches of 2 must not change a row
        prompt = ids[s:s + 16].tolist()
        docs.append(tokenizer.decode(prompt + generate(model, [prompt], max_new_tokens=12)[0]))
    assert out.read_text(encoding="utf-8") == SEPARATOR.join(docs + [text])

    fraction = float(re.search(r"train\.val_fraction=([0-9.e-]+)", printed).group(1))
    train, val = split(np.asarray(tokenizer.encode(out.read_text(encoding="utf-8"))), fraction)
    np.testing.assert_array_equal(val, ids[n_train:])  # exactly the text's own validation split
    assert len(train) > n_train  # ... and the continuations are training data

    code, again, err = distill(capsys, "--run", run_dir, "--data", corpus, "--out", out, "--rows", 5,
                               "--prompt-tokens", 16, "--new", 12, "--seed", 3, "--force")
    assert code == 0, err
    assert out.read_text(encoding="utf-8") == SEPARATOR.join(docs + [text])  # same arguments, same file


@pytest.mark.parametrize("args, message", [
    (["--prompt-tokens", 40, "--new", 30], "--prompt-tokens + --new is 70; the run's context holds 64"),
    (["--rows", 0], "--rows: 0 is invalid; allowed: an integer >= 1"),
    (["--data", "missing.txt"], "--data 'missing.txt' does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys, args, message):
    run_dir, corpus = trained
    out = tmp_path / "mix.txt"
    base = {"--run": run_dir, "--data": corpus, "--out": out, "--prompt-tokens": 16, "--new": 12}
    given = dict(zip(args[::2], args[1::2]))
    code, _, err = distill(capsys, *[str(x) for k, v in {**base, **given}.items() for x in (k, v)])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_an_existing_out_or_a_non_run_is_refused(trained, tmp_path, capsys):
    run_dir, corpus = trained
    out = tmp_path / "mix.txt"
    out.write_text("keep me", encoding="utf-8")
    code, _, err = distill(capsys, "--run", run_dir, "--data", corpus, "--out", out, "--prompt-tokens", 16, "--new", 12)
    assert code == 2 and "already exists; give --force" in err
    assert out.read_text(encoding="utf-8") == "keep me"
    code, _, err = distill(capsys, "--run", tmp_path, "--data", corpus, "--out", tmp_path / "other.txt")
    assert code == 2 and "is not a run directory" in err
    assert not (tmp_path / "other.txt").exists()
