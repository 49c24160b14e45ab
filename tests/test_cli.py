"""scripts/verify.py and the platform switch, run as a user runs them."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.config import load_config
from jaxllm.model.transformer import count_params

ROOT = Path(__file__).resolve().parents[1]


def dense_param_count(m) -> int:
    """Closed form for the dense model, written out independently of the code under test."""
    a, D, L, V, F = m.attention, m.d_model, m.n_layer, m.vocab_size, m.mlp.d_ff
    N, K, H = a.n_head, a.n_kv_head, a.head_dim
    norm = 0 if m.rezero else (D if m.norm.kind == "rmsnorm" else (2 * D if m.norm.bias else D))
    attention = D * N * H + 2 * D * K * H + N * H * D + (N * H + 2 * K * H if a.qkv_bias else 0) + (D if a.out_bias else 0)
    n_mats = 3 if m.mlp.kind == "swiglu" else 2
    mlp = n_mats * D * F + ((n_mats - 1) * F + D if m.mlp.bias else 0)
    layer = attention + mlp + 2 * norm + (1 if m.rezero else 0)
    final_norm = D if m.norm.kind == "rmsnorm" else (2 * D if m.norm.bias else D)
    adapter = 2 * D * D if m.recursion.mode != "none" and m.recursion.inject == "concat" else 0  # Linear(2D -> D)
    return (V * D + (m.max_seq_len * D if m.position.kind == "learned" else 0) + L * layer + final_norm
            + (0 if m.tie_embeddings else D * V) + (V if m.lm_head_bias else 0) + adapter)


PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
DENSE_PRESETS = [p for p in PRESETS if (lambda m: m.attention.kind == "mha" and not m.moe.n_routed_experts)(
    load_config(p).model)]


@pytest.mark.parametrize("path", DENSE_PRESETS, ids=[p.stem for p in DENSE_PRESETS])
def test_dense_preset_param_count_matches_closed_form(path):
    m = load_config(path).model
    assert count_params(m) == dense_param_count(m)


def test_llama_374m_and_seed003_counts():
    assert count_params(load_config(ROOT / "configs/llama-374m.yaml").model) == 373_867_520
    # seed 003 with its 65-character vocabulary: 10.71M
    assert round(count_params(load_config(ROOT / "configs/seed003-char-gpt.yaml").model) / 1e6, 2) == 10.71


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_verify_prints_every_preset_with_its_count():
    result = run("scripts/verify.py", "--max-params", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for path in PRESETS:
        m = load_config(path).model
        row = next(line for line in lines if line.startswith(path.stem + " "))
        assert f"{count_params(m) / 1e6:.2f}M" in row
        if path in DENSE_PRESETS:
            assert f"{dense_param_count(m) / 1e6:.2f}M" in row
    assert "373.87M" in next(line for line in lines if line.startswith("llama-374m "))
    tiny = next(line for line in lines if line.startswith("tiny-gpt "))
    loss = float(tiny.split("loss ")[1].split()[0])
    assert abs(loss - math.log(128)) < 0.5  # a freshly initialised model predicts ~uniformly


@pytest.mark.parametrize("args, message", [
    (["--platform", "cuda"], "jax[cuda12]"),
    (["--platform", "tpu"], "jax[tpu]"),
    (["--platform", "metal"], "jax-metal"),
    (["configs/tiny-gpt.yaml", "model.attention.n_kv_head=3"], "tiny-gpt.yaml: model.attention.n_kv_head=3"),
    (["configs/nope.yaml"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run("scripts/verify.py", *args, env={"JAX_PLATFORMS": ""})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_platform_in_environment_is_one_line():
    result = run("scripts/verify.py", "configs/tiny-gpt.yaml", env={"JAX_PLATFORMS": "vulkan"})
    assert result.returncode == 2 and "unknown platform 'vulkan'; allowed: cpu, cuda, tpu, metal" in result.stderr


def test_jaxllm_entry_point_runs_verify():
    result = run("-m", "jaxllm.cli", "verify", "configs/tiny-gpt.yaml")
    assert result.returncode == 0 and "tiny-gpt" in result.stdout and "ok: loss" in result.stdout
    assert run("-m", "jaxllm.cli", "frobnicate").returncode == 2


def test_small_variant_keeps_every_switch():
    from jaxllm.verify import small_variant

    big = load_config(ROOT / "configs/llama-374m.yaml", ["model.attention.window=512", "model.attention.n_kv_head=4"])
    small = small_variant(big).model
    assert count_params(small) < 1e6
    m = big.model
    assert (small.position, small.norm, small.mlp.kind, small.tie_embeddings, small.dtype) == \
        (m.position, m.norm, m.mlp.kind, m.tie_embeddings, m.dtype)
    assert small.attention.window == 16 and small.attention.n_kv_head < small.attention.n_head


@pytest.mark.parametrize("args", [["--max-params", "lots"], ["--platform", "gpu"], ["--bogus"]])
def test_bad_command_line_values_are_one_line(args):
    result = run("scripts/verify.py", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_seed004_is_exactly_973_12m():
    d, c, heads, nope, rope, v, f, layers, vocab = 768, 192, 12, 32, 32, 64, 1536, 30, 49152
    mla = (d * c + c * heads * nope + c * heads * rope          # q_proj_d, q_proj_u, rope_q
           + d * c + c * heads * nope + c * heads * v           # kv_proj_d, k_proj_u, v_proj_u
           + d * heads * rope + heads * v * d)                  # rope_k, o_proj
    assert mla == 1_548_288
    layer = mla + (1 + 7) * 3 * d * f + d * 7 + 2 * d          # shared + routed SwiGLU, router, 2 RMSNorms
    total = vocab * d + 2048 * d + layers * layer + d * vocab + vocab + d  # + head, head bias, final norm
    m = load_config(ROOT / "configs/seed004-customllm.yaml").model
    assert count_params(m) == total and f"{total / 1e6:.2f}M" == "973.12M"


def test_deepseek_v2_lite_shape_is_15_7b():
    assert round(count_params(load_config(ROOT / "configs/deepseek-v2-lite-shape.yaml").model) / 1e9, 1) == 15.7


def test_dashed_config_overrides_work_like_plain_ones(capsys):
    """`--train.batch_size=32` (seed 000's configurator) is `train.batch_size=32`, in every command."""
    from jaxllm.cli import config_overrides, main

    assert config_overrides(["--config", "x.yaml", "--train.batch_size=32", "--model.attention.n_head=2",
                             "--run-dir=r", "--trainer=1", "model.n_layer=1"]) == \
        ["--config", "x.yaml", "train.batch_size=32", "model.attention.n_head=2", "--run-dir=r", "--trainer=1",
         "model.n_layer=1"]
    outputs = []
    for args in (["model.n_layer=1"], ["--model.n_layer=1"], []):
        assert main(["verify", "configs/tiny-gpt.yaml", *args]) == 0
        outputs.append(capsys.readouterr().out.rsplit(",", 1)[0])  # without the time taken
    assert outputs[0] == outputs[1] != outputs[2]
    code = main(["train", "--config", "configs/tiny-gpt.yaml", "--train.batch_size=0"])
    err = capsys.readouterr().err
    assert code == 2 and "train.batch_size" in err and len(err.strip().splitlines()) == 1
