"""The FLOP count behind every MFU figure (DESIGN.md's definition), checked against the closed form."""
from pathlib import Path

import pytest

from jaxllm.metrics import flops_per_token
from jaxllm.config import load_config
from tests.test_cli import dense_param_count

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["nanogpt-cpu", "llama-374m", "tiny-llama"])
def test_flops_per_token_is_6n_plus_12lds(preset):
    m = load_config(ROOT / "configs" / f"{preset}.yaml").model
    seq = 256
    lookup_only = (m.max_seq_len * m.d_model if m.position.kind == "learned" else 0) + \
        (0 if m.tie_embeddings else m.vocab_size * m.d_model)  # tables only indexed, never multiplied
    expected = 6 * (dense_param_count(m) - lookup_only) + 12 * m.n_layer * m.d_model * seq
    assert flops_per_token(m, seq) == expected


def test_llama_374m_flops_per_token():
    m = load_config(ROOT / "configs/llama-374m.yaml").model
    # 373,867,520 params - 32,768,000 input embedding = 341,099,520 non-embedding
    assert flops_per_token(m, 1024) == 6 * 341_099_520 + 12 * 24 * 1024 * 1024


def test_flops_count_core_layers_once_per_loop_and_tidar_twice():
    base = load_config(ROOT / "configs/tiny-llama.yaml").model
    m = load_config(ROOT / "configs/tiny-llama.yaml", ["model.n_layer=3", "model.recursion.mode=trm",
                                                       "model.recursion.n_prelude=1", "model.recursion.n_core=1",
                                                       "model.recursion.n_loops=2", "model.recursion.n_latent_steps=3"]).model
    D, seq = m.d_model, 64
    layer = (dense_param_count(m) - dense_param_count(load_config(ROOT / "configs/tiny-llama.yaml",
                                                                  ["model.n_layer=2"]).model))
    calls = 2 * (3 + 1)  # 2 cycles of 3 latent updates and one answer update
    plain = flops_per_token(load_config(ROOT / "configs/tiny-llama.yaml", ["model.n_layer=3"]).model, seq)
    assert flops_per_token(m, seq) == plain + 6 * (calls - 1) * layer + 12 * (calls - 1) * D * seq
    tidar = load_config(ROOT / "configs/tiny-llama.yaml", ["model.diffusion.enabled=true"]).model
    assert flops_per_token(tidar, seq) == 2 * flops_per_token(base, 2 * seq)


@pytest.mark.parametrize("window", [None, 8])
def test_decode_benchmark_maps_llama_shapes_onto_hugging_face_with_the_same_weights(window):
    """The HF peer of `bench.py decode` (LlamaForCausalLM; MistralForCausalLM with a window) computes
    the same logits as jaxllm on the same weights."""
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from jaxllm.benchmarks.decode import hf_model
    from jaxllm.convert import to_state_dict
    from jaxllm.model import Transformer

    overrides = ["model.init_std=0.2", "model.n_layer=2", f"model.attention.window={window or 'null'}"]
    m = load_config(ROOT / "configs/tiny-llama.yaml", overrides).model
    model = Transformer(m, rngs=nnx.Rngs(0))
    hf, why = hf_model(m, to_state_dict(model), "cpu", torch.float32)
    assert why is None
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_decode_benchmark_prints_a_row_per_implementation_and_agreement(capsys):
    from jaxllm.benchmarks.decode import run

    assert run(["--config", str(ROOT / "configs/tiny-llama.yaml"), "model.n_layer=1", "model.init_std=0.3",
                "model.attention.window=null", "--batch", "2", "--prompt-tokens", "8", "--new", "6", "--runs", "1"]) == 0
    rows = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines() if "    2 " in line}
    assert [name.split(" (")[0].split(" eager")[0] for name in rows] == ["jaxllm", "torch_ref", "HF generate, static cache"]
    assert [r[-1] for r in rows.values()] == ["-", "yes", "yes"]  # the same greedy tokens on the same weights


def _write_trace(path, events, processes, threads):
    import gzip
    import json

    meta = [dict(ph="M", pid=pid, name="process_name", args=dict(name=name)) for pid, name in processes.items()]
    meta += [dict(ph="M", pid=pid, tid=tid, name="thread_name", args=dict(name=name))
             for (pid, tid), name in threads.items()]
    with gzip.open(path, "wt") as f:
        json.dump(dict(displayTimeUnit="ns", traceEvents=meta + events), f)


def test_trace_summary_counts_each_xla_op_once_and_the_union_of_their_time(tmp_path):
    """`bench.py decode --profile`'s arithmetic on a hand-made trace: a `while` enclosing its body's
    ops is not counted, other modules' ops and the host's own events are left out, device
    kernels count without `hlo_op`, and overlapping ops' busy time is their union."""
    from jaxllm.benchmarks.profile import report, summarize

    op = lambda tid, ts, dur, name, module="jit__run", pid=1: dict(  # noqa: E731
        ph="X", pid=pid, tid=tid, ts=ts, dur=dur, name=name, args=dict(hlo_op=name, hlo_module=module))
    events = [dict(ph="X", pid=1, tid=10, ts=0, dur=500, name="PjitFunction(_run)"),  # host, not an op
              op(11, 0, 100, "while.1"), op(11, 10, 20, "fusion.1"), op(11, 40, 10, "fusion.2"),
              op(11, 60, 20, "fusion.1"), op(11, 200, 50, "fusion.9", module="jit_other"),
              op(12, 0, 30, "dot.3"), op(12, 20, 40, "dot.4"),  # overlapping, neither encloses the other
              dict(ph="X", pid=2, tid=1, ts=0, dur=5, name="gemm_kernel"),
              dict(ph="X", pid=2, tid=1, ts=10, dur=5, name="gemm_kernel")]
    path = tmp_path / "perfetto_trace.json.gz"
    _write_trace(path, events, {1: "/host:CPU", 2: "/device:GPU:0"},
                 {(1, 10): "python", (1, 11): "worker", (1, 12): "other", (2, 1): "Stream #1"})
    lanes = summarize(path, module="jit__run")
    assert [(lane.name, lane.ops, lane.busy_us) for lane in lanes] == [
        ("/host:CPU / other", 2, 60.0), ("/host:CPU / worker", 3, 50.0), ("/device:GPU:0 / Stream #1", 2, 10.0)]
    assert lanes[1].top == [("fusion.1", 2, 40.0), ("fusion.2", 1, 10.0)]
    assert lanes[2].top == [("gemm_kernel", 2, 10.0)]
    assert [(lane.ops, lane.busy_us) for lane in summarize(path)][0] == (4, 100.0)  # unfiltered: jit_other's op too
    lines = report(lanes, seconds=0.001, units=5, untraced=0.0005)  # 5 tokens, 100 us of untraced wall a token
    assert lines[0] == "traced wall 1.0 ms (0.200 ms a token) over 5 tokens; untraced 0.100 ms a token"
    assert lines[1].startswith("  /host:CPU / other: 2 ops (0.4 a token), busy 0.1 ms (0.012 ms a token, 12% of")


def test_decode_benchmark_profile_writes_a_trace_of_the_decode_loop(tmp_path, capsys):
    """--profile traces one more jaxllm generation per batch: the trace holds the decode loop's ops,
    at least one per layer-op of every token (one layer: norm, q/k/v, attention, out, MLP, head)."""
    from jaxllm.benchmarks.decode import run
    from jaxllm.benchmarks.profile import summarize

    new = 6
    assert run(["--config", str(ROOT / "configs/tiny-llama.yaml"), "model.n_layer=1", "--batch", "2",
                "--prompt-tokens", "8", "--new", str(new), "--runs", "1", "--no-torch", "--no-hf",
                "--profile", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    traces = list((tmp_path / "batch2").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1 and f"profile at batch 2 (the decode loop's module, jit__run): {traces[0]}" in out
    assert "untraced" in out and "ops (" in out
    assert sum(lane.ops for lane in summarize(traces[0], module="jit__run")) >= 8 * new


def test_train_benchmark_times_the_training_loops_own_step(monkeypatch, capsys):
    """`bench train` times Trainer.train_step (the real optimizer, clipping, router-bias update and
    sharding), on the same batch each step, with overrides before and after the options."""
    from jaxllm.benchmarks.train import run
    from jaxllm.train import loop

    calls = []

    class Spy(loop.Trainer):
        def __init__(self, cfg, mesh):
            super().__init__(cfg, mesh)
            step = self.train_step
            def spy(state, batch):
                calls.append((batch.shape, batch.sharding.mesh.size))
                return step(state, batch)

            self.train_step = spy

    monkeypatch.setattr(loop, "Trainer", Spy)
    assert run(["model.n_layer=1", "--config", str(ROOT / "configs/tiny-gpt.yaml"), "--batch", "8", "--seq", "16",
                "--steps", "2", "--warmup", "1", "--no-torch", "train.optimizer=lion", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert calls == [((8, 17), 8)] * 3  # 1 warm-up + 2 timed calls of the real step, over the 8-device mesh
    assert "jaxllm (Trainer, lion)" in out and "mesh {'data': 8" in out
    assert "bfloat16 compute, float32 params" in out  # --dtype reached the model


def test_train_benchmark_no_jax_times_torch_ref_alone(monkeypatch, capsys):
    """--no-jax: torch_ref's row only, and no Trainer is built (no JAX work beside torch's)."""
    from jaxllm.benchmarks.train import run
    from jaxllm.train import loop

    def refuse(*args, **kwargs):
        raise AssertionError("--no-jax built a Trainer")

    monkeypatch.setattr(loop, "Trainer", refuse)
    assert run(["model.n_layer=1", "--config", str(ROOT / "configs/tiny-gpt.yaml"), "--batch", "8", "--seq", "16",
                "--steps", "2", "--warmup", "1", "--no-jax"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert rows == ["torch_ref"]


def test_train_benchmark_errors_are_one_line(capsys):
    from jaxllm.benchmarks.train import run
    from jaxllm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--batch 12 must divide by the data x fsdp size \(8\)"):
        run(["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--batch", "12", "--no-torch"])
    for option, value in (("--batch", "0"), ("--seq", "-3"), ("--steps", "0"), ("--warmup", "-1")):
        with pytest.raises(ConfigError, match=f"{option} {value} is invalid: must be an integer >= "):
            run(["--config", str(ROOT / "configs/tiny-gpt.yaml"), option, value, "--no-torch"])
    with pytest.raises(ConfigError, match="--no-jax and --no-torch together leave nothing to time"):
        run(["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--no-jax", "--no-torch"])


@pytest.mark.parametrize("section, argv, row", [
    ("moe", ["model.n_layer=1", "--batch", "1", "--seq", "16", "--steps", "1", "--dispatch", "grouped",
             "model.moe.n_routed_experts=4"], ["grouped", "4"]),  # dispatch, experts: the override was read
    ("recursion", ["model.d_model=32", "--loops", "2", "--batch", "1", "--seq", "16", "model.n_layer=3"], ["2"]),
])
def test_moe_and_recursion_benchmarks_take_the_same_options_and_overrides(section, argv, row, capsys):
    import importlib

    run = importlib.import_module(f"jaxllm.benchmarks.{section}").run
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:len(row)] == row for line in out.splitlines()[3:]), out
    from jaxllm.errors import ConfigError

    with pytest.raises(ConfigError, match="model.colour"):  # a bad override is a user error, before any work
        run([*argv, "model.colour=1"])


def test_the_gpu_script_refuses_an_unknown_part_before_writing_anything(tmp_path):
    """scripts/gpu_check.sh (the prepared GPU session): a mistyped part is one line, exit 2, no logs."""
    import os
    import subprocess

    out = tmp_path / "logs"
    result = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "train", "decod"], capture_output=True,
                            text=True, env={**os.environ, "OUT": str(out), "PY": "false"}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("gpu_check.sh: unknown part 'decod'; "
                                     "allowed: train decode decode_cmdbuf decode_profile tidar moe scan")
    assert not out.exists()
