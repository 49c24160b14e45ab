"""Bad input to every command (train, sample, convert, verify, bench), one row each: the CLI (run
in-process, `jaxllm.cli.main`) prints one line `error: ...` naming the problem and what is
allowed, exits 2, shows no traceback, and leaves every file it was given byte-identical, with
nothing created and nothing removed.

Each row is (id, argv, expected substring of the error line, setup, patch): argv's `{name}`
fields are paths of the shared workspace (`WS`: a tiny trained run, its safetensors export, a few
small files) or of the case's own directory `{case}` (also the working directory), which `setup`
may fill first (copies of the run, to corrupt); `patch` fakes what a test cannot cause for real
as root (a full disk, a read-only directory). The snapshot (sha256 of every file, and the set of
paths) covers the workspace and the case directory, taken after setup and compared after the call.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxllm.cli import main

ROOT = Path(__file__).resolve().parents[1]
BAD_UTF8 = b"model:\n  d_model: 64 # caf\xe9\n"


# ---------------------------------------------------------------------------------------------
# The workspace, built once


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, str]:
    """Paths of a tiny trained run (2 steps of tiny-llama without its window: Llama-shaped, a char tokenizer), its export as jaxllm
    safetensors (config inside, tokenizer beside it) and small good and bad files."""
    from jaxllm.config import config_from_dict, load_config, to_dict
    from jaxllm.convert import save_safetensors
    from jaxllm.model import Transformer
    from jaxllm.train.loop import train

    from flax import nnx

    root = tmp_path_factory.mktemp("ws")
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "far", "away"]
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) + "." for _ in range(150)),
                                     encoding="utf-8")
    cfg = load_config(ROOT / "configs/tiny-llama.yaml", [
        "model.n_layer=1", "model.attention.window=null", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8", "train.mesh=data:8",
        "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1",
        "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=0", "train.wandb=disabled",
        f"train.data={root / 'corpus.txt'}"])
    train(cfg, root / "run", progress=False)
    export = root / "export"
    export.mkdir()
    assert main(["convert", str(root / "run"), str(export / "model.safetensors"), "--to", "jaxllm"]) == 0
    shutil.copyfile(root / "run" / "tokenizer.json", export / "tokenizer.json")
    # a Llama-shaped model whose width is no multiple of its heads (head_dim set explicitly)
    odd = config_from_dict({"model": dict(vocab_size=32, d_model=30, n_layer=1, max_seq_len=32,
                                          position=dict(kind="rope"), norm=dict(kind="rmsnorm"),
                                          attention=dict(n_head=4, head_dim=8), mlp=dict(kind="swiglu", d_ff=48),
                                          tie_embeddings=False)}).model
    save_safetensors(root / "odd-llama.safetensors", Transformer(odd, rngs=nnx.Rngs(0)), config=to_dict(odd))
    save_safetensors(root / "no-config.safetensors", Transformer(odd, rngs=nnx.Rngs(0)))  # needs --config
    (root / "bad-utf8.yaml").write_bytes(BAD_UTF8)
    (root / "bad-utf8.txt").write_bytes(b"the cat \xff\xfe sat\n")
    (root / "empty.yaml").write_text("")
    (root / "comments.yaml").write_text("# nothing but a comment\n")
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "broken.yaml").write_text("model:\n  d_model: 64\n bad: [1, 2\n")
    (root / "blank-prompts.txt").write_text("\n  \n")
    (root / "prompts.txt").write_text("the cat\n")
    (root / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "a-file").write_text("a regular file, not a directory\n")
    names = {"corpus": "corpus.txt", "run": "run", "odd-llama": "odd-llama.safetensors",
             "no-config": "no-config.safetensors", "bad-utf8-yaml": "bad-utf8.yaml", "bad-utf8-txt": "bad-utf8.txt",
             "empty": "empty.yaml", "comments": "comments.yaml", "list": "list.yaml", "broken": "broken.yaml",
             "blank-prompts": "blank-prompts.txt", "prompts": "prompts.txt", "corrupt": "corrupt.safetensors",
             "a-file": "a-file"}
    return {"ws": str(root), "model": str(export / "model.safetensors"), "gpt": str(ROOT / "configs/tiny-gpt.yaml"),
            "llama": str(ROOT / "configs/tiny-llama.yaml"), **{k: str(root / v) for k, v in names.items()}}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots`: a file's sha256, a directory's 'dir', a link's target."""
    out = {}
    for root in roots:
        for directory, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(directory) / name
                if path.is_symlink():
                    out[str(path)] = "link:" + os.readlink(path)
                elif path.is_dir():
                    out[str(path)] = "dir"
                else:
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# Setups (the case's own files) and patches (what root cannot cause for real)


def copy_run(case: Path, ws: dict) -> Path:
    shutil.copytree(ws["run"], case / "run")
    return case / "run"


def run_without_checkpoints(case: Path, ws: dict) -> None:
    (case / "run").mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copyfile(Path(ws["run"]) / name, case / "run" / name)


def step_dir(run: Path) -> Path:
    return max((p for p in (run / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def truncated_state_file(case: Path, ws: dict) -> None:
    """Every data file of the saved state cut to half its length (a copy interrupted mid-way)."""
    for path in (step_dir(copy_run(case, ws)) / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_state_files(case: Path, ws: dict) -> None:
    for path in (step_dir(copy_run(case, ws)) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def step_without_state(case: Path, ws: dict) -> None:
    shutil.rmtree(step_dir(copy_run(case, ws)) / "state")


def empty_run_config(case: Path, ws: dict) -> None:
    (copy_run(case, ws) / "config.yaml").write_text("")


def truncated_tokens(case: Path, ws: dict) -> None:
    tokens = copy_run(case, ws) / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:5])


def only_a_tmp_checkpoint(case: Path, ws: dict) -> None:
    run = copy_run(case, ws)
    step = step_dir(run)
    step.rename(step.with_name(f"{step.name}.orbax-checkpoint-tmp"))


def corrupt_metrics_line(case: Path, ws: dict) -> None:
    """A metrics.jsonl whose first line is damaged (not a torn last line, which a resume repairs)."""
    metrics = copy_run(case, ws) / "metrics.jsonl"
    metrics.write_text('{"step": 1, "lo\n' + metrics.read_text().split("\n", 1)[1])


def another_shape(case: Path, ws: dict) -> None:
    """config.yaml edited to another width than its checkpoints were trained with."""
    config = copy_run(case, ws) / "config.yaml"
    config.write_text(config.read_text().replace("d_model: 64", "d_model: 32").replace("head_dim: 16", "head_dim: 8"))


def empty_corpus(case: Path, ws: dict) -> None:
    (case / "empty.txt").write_text("")


def fake_full_disk_safetensors(monkeypatch) -> None:
    """safetensors' writer runs out of space half-way (as it reports it: a SafetensorError)."""
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                              f'path "{filename}"')

    monkeypatch.setattr("safetensors.numpy.save_file", save_file)


def fake_full_disk_gguf(monkeypatch) -> None:
    import gguf

    def write_tensors_to_file(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors_to_file)


def fake_full_disk_torch(monkeypatch) -> None:
    import torch

    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", save)


def fake_read_only(directory: str):
    """Every temporary file or directory made in `directory` fails as in a read-only directory."""
    def patch(monkeypatch) -> None:
        import tempfile

        for name in ("mkstemp", "mkdtemp"):
            real = getattr(tempfile, name)

            def refuse(*args, real=real, **kwargs):
                if str(kwargs.get("dir", "")).startswith(directory):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs["dir"])
                return real(*args, **kwargs)

            monkeypatch.setattr(tempfile, name, refuse)
    return patch


def fake_not_writable(directory: str):
    """os.access says `directory` is not writable (as it does for a user without the permission)."""
    def patch(monkeypatch) -> None:
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if str(path).startswith(directory)
                            else real(path, mode, *a, **k))
    return patch


def fake_read_only_run_dir(directory: str):
    """A read-only --run-dir: creating anything under it fails with EACCES."""
    def patch(monkeypatch) -> None:
        fake_read_only(directory)(monkeypatch)
        fake_not_writable(directory)(monkeypatch)
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if str(self).startswith(directory):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    return patch


# ---------------------------------------------------------------------------------------------
# The table

SAMPLE = ["sample", "--checkpoint", "{model}", "--prompt", "the"]
CONVERT_TO = ["convert", "{model}"]


def row(id_, argv, expected, setup=None, patch=None, marks=()):
    return pytest.param(argv, expected, setup, patch, id=id_, marks=marks)


CASES = [
    # train: the config file and the overrides (all refused before anything is written)
    row("train-config-not-utf8", ["train", "--config", "{bad-utf8-yaml}"], "is not UTF-8 text (byte 0xe9"),
    row("train-config-empty", ["train", "--config", "{empty}"], "is empty; allowed: a YAML mapping"),
    row("train-config-only-comments", ["train", "--config", "{comments}"], "is empty; allowed: a YAML mapping"),
    row("train-config-a-list", ["train", "--config", "{list}"], "holds a list; allowed: a YAML mapping"),
    row("train-config-yaml-syntax", ["train", "--config", "{broken}"], "is not valid YAML: "),
    row("train-config-missing", ["train", "--config", "{ws}/nope.yaml"], "does not exist"),
    row("train-config-a-directory", ["train", "--config", "{ws}"], "is a directory"),
    row("train-lr-inf", ["train", "--config", "{gpt}", "train.lr=.inf"], "train.lr: got inf, expected a finite number"),
    row("train-lr-nan", ["train", "--config", "{gpt}", "train.lr=.nan"], "train.lr: got nan, expected a finite number"),
    row("train-lr-overflows", ["train", "--config", "{gpt}", "train.lr=1e999"], "train.lr: got '1e999', which overflows"),
    row("train-eps-minus-inf", ["train", "--config", "{gpt}", "model.norm.eps=-.inf"], "model.norm.eps: got -inf"),
    row("train-dropout-nan", ["train", "--config", "{gpt}", "model.dropout=.nan"], "model.dropout: got nan"),
    row("train-grad-clip-inf", ["train", "--config", "{gpt}", "train.grad_clip=.inf"], "train.grad_clip: got inf"),
    row("train-until-ppl-inf", ["train", "--config", "{gpt}",
                                "train.curriculum=[{seq_len: 8, batch_size: 8, until_ppl: .inf}, "
                                "{seq_len: 16, batch_size: 8}]"], "train.curriculum[0].until_ppl: got inf"),
    row("train-batch-size-0", ["train", "--config", "{gpt}", "train.batch_size=0"], "train.batch_size=0 is invalid"),
    row("train-unknown-field", ["train", "--config", "{gpt}", "model.colour=1"], "unknown field 'model.colour'"),
    row("train-lora-moved", ["train", "--config", "{gpt}", "--train.lora.rank=8"], "it is model.lora"),
    row("train-override-without-value", ["train", "--config", "{gpt}", "model.n_layer"], "expected key=value"),
    row("train-process-id-not-int", ["train", "--process-id", "x"], "argument --process-id"),
    # sample: settings (checked before the model is loaded), prompt files, sources
    row("sample-max-new-tokens-1e12", [*SAMPLE, "--max-new-tokens", "1000000000000"],
        "max_new_tokens is 1000000000000; allowed: an integer in 1..2147483647"),
    row("sample-max-new-tokens-0", [*SAMPLE, "--max-new-tokens", "0"], "max_new_tokens is 0; allowed"),
    row("sample-max-new-tokens-negative", [*SAMPLE, "--max-new-tokens", "-5"], "max_new_tokens is -5; allowed"),
    row("sample-max-new-tokens-not-int", [*SAMPLE, "--max-new-tokens", "lots"], "argument --max-new-tokens"),
    row("sample-top-k-negative", [*SAMPLE, "--top-k", "-1"], "top_k is -1; allowed: an integer >= 0"),
    row("sample-top-p-0", [*SAMPLE, "--top-p", "0"], "top_p is 0.0; allowed: a number in (0, 1]"),
    row("sample-top-p-above-1", [*SAMPLE, "--top-p", "1.5"], "top_p is 1.5; allowed"),
    row("sample-temperature-negative", [*SAMPLE, "--temperature", "-1"], "temperature is -1.0; allowed: a number >= 0"),
    row("sample-temperature-nan", [*SAMPLE, "--temperature", "nan"], "temperature is nan; allowed"),
    row("sample-temperature-inf", [*SAMPLE, "--temperature", "inf"], "temperature is inf; allowed"),
    row("sample-min-p-above-1", [*SAMPLE, "--min-p", "1.5"], "min_p is 1.5; allowed: a number in [0, 1]"),
    row("sample-min-p-negative", [*SAMPLE, "--min-p", "-0.1"], "min_p is -0.1; allowed"),
    row("sample-repetition-penalty-0", [*SAMPLE, "--repetition-penalty", "0"], "repetition_penalty is 0.0; allowed"),
    row("sample-repetition-penalty-nan", [*SAMPLE, "--repetition-penalty", "nan"], "repetition_penalty is nan"),
    row("sample-seed-negative", [*SAMPLE, "--seed", "-1"], "seed is -1; allowed: an integer in 0.."),
    row("sample-seed-too-big", [*SAMPLE, "--seed", str(2**64)], "seed is 18446744073709551616; allowed"),
    row("sample-step-negative", ["sample", "--run", "{run}", "--prompt", "the", "--step", "-1"],
        "argument --step: -1 is invalid; allowed: an integer >= 0"),
    row("sample-step-missing", ["sample", "--run", "{run}", "--prompt", "the", "--step", "999"],
        "has no checkpoint at step 999; it has steps 2"),
    row("sample-eos-id-outside-vocab", [*SAMPLE, "--eos-id", "100000"], "eos_id is 100000; allowed: 0.."),
    row("sample-block-without-speculative", [*SAMPLE, "--block", "4"], "--block is 4, but it only applies"),
    row("sample-prompt-file-not-utf8", ["sample", "--checkpoint", "{model}", "--prompt-file", "{bad-utf8-txt}"],
        "prompt file '{bad-utf8-txt}' is not UTF-8 text (byte 0xff at offset 8)"),
    row("sample-prompt-file-missing", ["sample", "--checkpoint", "{model}", "--prompt-file", "{ws}/nope.txt"],
        "does not exist"),
    row("sample-prompt-file-a-directory", ["sample", "--checkpoint", "{model}", "--prompt-file", "{ws}"],
        "is a directory"),
    row("sample-prompt-file-blank", ["sample", "--checkpoint", "{model}", "--prompt-file", "{blank-prompts}"],
        "holds no prompt"),
    row("sample-tokenizer-not-utf8", [*SAMPLE, "--tokenizer", "{bad-utf8-txt}"], "is not UTF-8 text (byte 0xff at offset 8)"),
    row("sample-config-not-utf8", ["sample", "--checkpoint", "{no-config}", "--config", "{bad-utf8-yaml}", "--prompt", "a"],
        "is not UTF-8 text"),
    row("sample-weights-corrupt", ["sample", "--checkpoint", "{corrupt}", "--prompt", "the"],
        "is not a readable safetensors file"),
    row("sample-run-not-a-run", ["sample", "--run", "{ws}", "--prompt", "the"], "is not a run directory"),
    row("sample-run-without-checkpoints", ["sample", "--run", "{case}/run", "--prompt", "the"], "has no checkpoint",
        setup=run_without_checkpoints),  # and creates no empty checkpoints/ (the snapshot)
    # convert: what the target cannot express, destinations that cannot be written
    row("convert-llama-width-not-multiple-of-heads", ["convert", "{odd-llama}", "{case}/hf", "--to", "hf"],
        "llama cannot express model.d_model=30 with model.attention.n_head=4"),
    row("convert-dst-under-a-file", [*CONVERT_TO, "{a-file}/x.safetensors", "--to", "jaxllm"],
        "is a file, not a directory"),
    row("convert-dst-deep-under-a-file", [*CONVERT_TO, "{a-file}/sub/x.pt", "--to", "torch"],
        "is a file, not a directory"),
    row("convert-dst-read-only", [*CONVERT_TO, "{case}/ro/x.safetensors", "--to", "jaxllm"],
        "cannot write destination '{case}/ro/x.safetensors': Permission denied",
        setup=lambda case, ws: (case / "ro").mkdir(), patch=lambda case: fake_read_only(f"{case}/ro")),
    row("convert-dst-not-writable", [*CONVERT_TO, "{case}/ro/x.safetensors", "--to", "jaxllm"],
        "directory '{case}/ro' is not writable",
        setup=lambda case, ws: (case / "ro").mkdir(), patch=lambda case: fake_not_writable(f"{case}/ro")),
    row("convert-disk-full-safetensors", [*CONVERT_TO, "{case}/new/deeper/x.safetensors", "--to", "jaxllm"],
        "cannot write destination '{case}/new/deeper/x.safetensors': No space left on device",
        patch=lambda case: fake_full_disk_safetensors),  # the new parent directories go too
    row("convert-disk-full-hf", [*CONVERT_TO, "{case}/hf", "--to", "hf"], "No space left on device",
        patch=lambda case: fake_full_disk_safetensors),
    row("convert-disk-full-gguf", [*CONVERT_TO, "{case}/x.gguf", "--to", "gguf"], "No space left on device",
        patch=lambda case: fake_full_disk_gguf),
    row("convert-disk-full-torch", [*CONVERT_TO, "{case}/x.pt", "--to", "torch"], "PytorchStreamWriter failed",
        patch=lambda case: fake_full_disk_torch),
    row("convert-dst-exists", [*CONVERT_TO, "{prompts}", "--to", "jaxllm"], "already exists"),
    row("convert-gguf-suffix", [*CONVERT_TO, "{case}/x.bin", "--to", "gguf"], "must end in .gguf"),
    row("convert-torch-suffix", [*CONVERT_TO, "{case}/x.bin", "--to", "torch"], "must end in .pt, .pth or .safetensors"),
    row("convert-src-missing", ["convert", "{ws}/nope.safetensors", "{case}/x.pt", "--to", "torch"], "does not exist"),
    row("convert-src-corrupt", ["convert", "{corrupt}", "{case}/x.pt", "--to", "torch"], "not a readable safetensors"),
    row("convert-family-without-hf", [*CONVERT_TO, "{case}/x.pt", "--to", "torch", "--family", "llama"],
        "--family applies to --to hf and --to peft only"),
    row("convert-family-cannot-express", [*CONVERT_TO, "{case}/hf", "--to", "hf", "--family", "gpt2"],
        "gpt2 cannot express"),
    row("convert-config-not-utf8", ["convert", "{no-config}", "{case}/x.pt", "--to", "torch", "--config", "{bad-utf8-yaml}"],
        "is not UTF-8 text"),
    row("convert-unknown-target", [*CONVERT_TO, "{case}/x", "--to", "onnx"], "argument --to: invalid choice"),
    # verify
    row("verify-max-params-negative", ["verify", "{gpt}", "--max-params", "-1"],
        "argument --max-params: -1 is invalid; allowed: a finite number > 0"),
    row("verify-max-params-0", ["verify", "{gpt}", "--max-params", "0"], "argument --max-params"),
    row("verify-max-params-nan", ["verify", "{gpt}", "--max-params", "nan"], "argument --max-params"),
    row("verify-override-without-value", ["verify", "{gpt}", "model.d_model"],
        "'model.d_model' is neither a file nor a key=value override; verify takes preset YAML files"),
    row("verify-config-not-utf8", ["verify", "{bad-utf8-yaml}"], "is not UTF-8 text"),
    row("verify-config-missing", ["verify", "{ws}/nope.yaml"], "does not exist"),
    row("verify-bad-override", ["verify", "{gpt}", "model.n_layer=0"], "model.n_layer=0 is invalid"),
    row("verify-non-finite-override", ["verify", "{gpt}", "model.init_std=.inf"], "model.init_std: got inf"),
    # bench
    row("bench-train-batch-0", ["bench", "train", "--config", "{gpt}", "--batch", "0", "--no-torch"], "--batch 0 is invalid"),
    row("bench-train-steps-negative", ["bench", "train", "--config", "{gpt}", "--steps", "-1", "--no-torch"], "--steps -1 is invalid"),
    row("bench-train-seq-too-long", ["bench", "train", "--config", "{gpt}", "--seq", "100000", "--no-torch"],
        "--seq 100000 is longer than model.max_seq_len (256)"),
    row("bench-train-warmup-negative", ["bench", "train", "--config", "{gpt}", "--warmup", "-1", "--no-torch"], "--warmup -1 is invalid"),
    row("bench-moe-batch-0", ["bench", "moe", "--batch", "0"], "argument --batch: 0 is invalid; allowed: an integer >= 1"),
    row("bench-decode-step-without-run", ["bench", "decode", "--config", "{gpt}", "--step", "5", "--no-torch", "--no-hf"],
        "--step goes with --run"),
    row("bench-moe-steps-0", ["bench", "moe", "--steps", "0"], "argument --steps: 0 is invalid"),
    row("bench-moe-seq-too-long", ["bench", "moe", "--seq", "100000"],
        "--seq 100000 is longer than model.max_seq_len (1024)"),
    row("bench-recursion-loops-0", ["bench", "recursion", "--loops", "2,0"], "argument --loops: 0 in '2,0' is invalid"),
    row("bench-recursion-loops-not-ints", ["bench", "recursion", "--loops", "two"], "argument --loops"),
    row("bench-recursion-batch-negative", ["bench", "recursion", "--batch", "-1"], "argument --batch: -1 is invalid"),
    row("bench-recursion-seq-too-long", ["bench", "recursion", "--seq", "100000"],
        "--seq 100000 is longer than model.max_seq_len (256)"),
    row("bench-decode-new-0", ["bench", "decode", "--config", "{llama}", "--new", "0"], "argument --new: 0 is invalid"),
    row("bench-decode-new-1e12", ["bench", "decode", "--config", "{llama}", "--new", "1000000000000", "--no-torch", "--no-hf"],
        "--new 1000000000000 is invalid; allowed: 1..2147483647"),
    row("bench-decode-does-not-fit", ["bench", "decode", "--config", "{llama}", "--batch", "100000", "--new", "100000000", "--no-torch",
                                      "--no-hf"], "GiB for the KV cache and output, more than the"),
    row("bench-decode-runs-0", ["bench", "decode", "--config", "{llama}", "--runs", "0"], "argument --runs: 0 is invalid"),
    row("bench-decode-batch-list", ["bench", "decode", "--config", "{llama}", "--batch", "1,0"], "argument --batch: 0 in '1,0' is invalid"),
    row("bench-decode-prompt-tokens-negative", ["bench", "decode", "--config", "{llama}", "--prompt-tokens", "-1"], "argument --prompt-tokens"),
    row("bench-decode-learned-context", ["bench", "decode", "--config", "{gpt}", "--new", "1000", "--no-torch",
                                         "--no-hf"], "--prompt-tokens + --new is 1128; the context holds 256"),
    row("bench-decode-run-context", ["bench", "decode", "--run", "{run}", "--no-torch", "--no-hf"],
        "the context holds 32 (model.max_seq_len of the run)"),
    row("bench-decode-run-with-overrides", ["bench", "decode", "--run", "{run}", "model.n_layer=2"],
        "--run uses the run's own config"),
    row("bench-decode-block-0", ["bench", "decode", "--config", "{llama}", "--speculative", "tidar", "--block", "0"], "argument --block"),
    row("bench-decode-prompt-text-not-utf8", ["bench", "decode", "--run", "{run}", "--prompt-tokens", "4", "--new", "4",
                                              "--prompt-text", "{bad-utf8-txt}", "--no-torch", "--no-hf"],
        "--prompt-text '{bad-utf8-txt}' is not UTF-8 text"),
    row("bench-unknown-section", ["bench", "fly"], "unknown benchmark section 'fly'"),
]

# The training side's defects (run directories, checkpoints, data).
TRAINING_SIDE_CASES = [row(*args, **kwargs) for args, kwargs in [
    (("train-empty-data", ["train", "--config", "{llama}", "train.data={case}/empty.txt", "--run-dir", "{case}/new",
                           "--no-progress", "train.max_steps=1", "train.warmup_steps=0"], "holds no text"),
     dict(setup=empty_corpus)),
    (("sample-run-truncated-state", ["sample", "--run", "{case}/run", "--prompt", "the"], "cannot be read (ValueError"),
     dict(setup=truncated_state_file)),
    (("convert-run-truncated-state", ["convert", "{case}/run", "{case}/x.safetensors", "--to", "jaxllm"],
      "cannot be read (ValueError"),
     dict(setup=truncated_state_file)),
    (("sample-run-empty-state-files", ["sample", "--run", "{case}/run", "--prompt", "the"], "cannot be read"),
     dict(setup=empty_state_files)),
    (("sample-run-step-without-state", ["sample", "--run", "{case}/run", "--prompt", "the"], "(it lacks state)"),
     dict(setup=step_without_state)),
    (("convert-run-step-without-state", ["convert", "{case}/run", "{case}/x.pt", "--to", "torch"], "(it lacks state)"),
     dict(setup=step_without_state)),
    (("sample-run-empty-config", ["sample", "--run", "{case}/run", "--prompt", "the"], "config.yaml' is empty"),
     dict(setup=empty_run_config)),
    (("convert-run-empty-config", ["convert", "{case}/run", "{case}/x.pt", "--to", "torch"], "config.yaml' is empty"),
     dict(setup=empty_run_config)),
    (("train-resume-empty-config", ["train", "--config", "{run}/config.yaml", "--run-dir", "{case}/run", "--no-progress"],
      "is empty or not a run's config"), dict(setup=empty_run_config)),
    (("train-resume-truncated-tokens", ["train", "--config", "{run}/config.yaml", "--run-dir", "{case}/run",
                                        "--no-progress", "train.max_steps=3"], "tokens.bin' holds 5 bytes"),
     dict(setup=truncated_tokens)),
    (("train-resume-only-tmp-checkpoint", ["train", "--config", "{run}/config.yaml", "--run-dir", "{case}/run",
                                           "--resume", "--no-progress"], "--resume: run directory"),
     dict(setup=only_a_tmp_checkpoint)),
    (("sample-run-only-tmp-checkpoint", ["sample", "--run", "{case}/run", "--prompt", "the"], "no checkpoint"),
     dict(setup=only_a_tmp_checkpoint)),
    (("train-run-dir-under-a-file", ["train", "--config", "{run}/config.yaml", "--run-dir", "{a-file}/run",
                                     "--no-progress"], "a-file"), {}),
    (("train-run-dir-read-only", ["train", "--config", "{run}/config.yaml", "--run-dir", "{case}/ro/run",
                                  "--no-progress"], "{case}/ro"),
     dict(setup=lambda case, ws: (case / "ro").mkdir(), patch=lambda case: fake_read_only_run_dir(f"{case}/ro"))),
    (("train-resume-corrupt-metrics-line", ["train", "--config", "{run}/config.yaml", "--run-dir", "{case}/run",
                                            "--no-progress", "train.max_steps=3"], "metrics.jsonl:1: not a metrics record"),
     dict(setup=corrupt_metrics_line)),
    (("sample-run-checkpoint-of-another-shape", ["sample", "--run", "{case}/run", "--prompt", "the"],
      "is not compatible with the stored shape"), dict(setup=another_shape)),
]]
# Not a row: a torn last line of metrics.jsonl is repaired on resume rather than refused, and a
# lock held by another live trainer needs a second live process (both in tests/test_reliability.py).


@pytest.mark.parametrize("argv, expected, setup, patch", CASES + TRAINING_SIDE_CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, tmp_path, monkeypatch, capsys, argv, expected, setup,
                                                          patch):
    case = tmp_path / "case"
    case.mkdir()
    if setup is not None:
        setup(case, ws)
    fields = {**ws, "case": str(case)}
    argv = [_fill(a, fields) for a in argv]
    expected = _fill(expected, fields)
    monkeypatch.chdir(case)  # a default output path (runs/...) would land under the snapshot
    if patch is not None:
        patch(case)(monkeypatch)
    before = snapshot(Path(ws["ws"]), case)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (jaxllm.cli.ArgumentParser: one line, status 2)
        code = e.code
    out, err = capsys.readouterr()
    after = snapshot(Path(ws["ws"]), case)
    assert "Traceback" not in out + err
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n") and lines[0].startswith("error: ") and lines[0] != "error: ", err
    assert expected in lines[0], lines[0]
    assert sorted(set(after) - set(before)) == [], "created"
    assert sorted(set(before) - set(after)) == [], "removed"
    assert [p for p in before if before[p] != after[p]] == [], "changed"


def _fill(text: str, fields: dict[str, str]) -> str:
    for name, value in fields.items():
        text = text.replace("{" + name + "}", value)
    return text
