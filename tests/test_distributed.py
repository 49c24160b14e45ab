"""Two processes through jax.distributed (gloo collectives over loopback) train like one process.

Each process has one CPU device and reads only its own rows of every global batch; the reference
is one process with two devices and the same mesh (data:2), the same config and the same data.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_two_processes_match_one(tmp_path):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog and runs far away".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(600)))
    args = [sys.executable, str(ROOT / "scripts/train.py"), "--config", str(ROOT / "configs/tiny-gpt.yaml"),
            "--no-progress", "model.n_layer=1", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
            "train.warmup_steps=2", "train.max_steps=6", "train.eval_every=3", "train.eval_batches=2",
            "train.sample_every=0", "train.checkpoint_every=3", "train.log_every=1", "train.wandb=disabled",
            f"train.data={corpus}", "train.mesh=data:2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
    one_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    one = subprocess.run([*args, "--run-dir", str(tmp_path / "one")], env=one_env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]

    port = free_port()
    two_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([*args, "--run-dir", str(tmp_path / "two"), "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)], env=two_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    assert all("done: step 6" in out for out, _ in outputs)  # both processes trained to the end

    single, multi = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[0] for r in single] == [r[0] for r in multi] == [1, 2, 3, 4, 5, 6]
    for (step, loss_1, val_1), (_, loss_2, val_2) in zip(single, multi):
        np.testing.assert_allclose(loss_2, loss_1, rtol=1e-5, err_msg=f"step {step}")
        if val_1 is not None:
            np.testing.assert_allclose(val_2, val_1, rtol=1e-5, err_msg=f"step {step}")
    assert sum(v is not None for _, _, v in single) == 2
