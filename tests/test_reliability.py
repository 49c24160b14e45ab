"""No silent success on a broken run: kills at random moments resume bit-identically, SIGINT /
SIGTERM stop gracefully with a checkpoint, non-finite updates are skipped and stop the run, a second
trainer is locked out, failed checkpoint writes stop the run, and live or corrupt run directories
are read or refused in one line."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm.checkpoint import Checkpointer, committed_steps, load_model
from jaxllm.cli import run
from jaxllm.config import load_config
from jaxllm.errors import DataError, TrainingError
from jaxllm.files import FileLock, atomic_dir, atomic_write
from jaxllm.train.monitor import read_metrics
from tests.test_train import ROOT, corpus  # noqa: F401 (a fixture: about 40k characters of varied text)

SMALL = ["model.n_layer=1", "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8",
         "train.warmup_steps=2", "train.eval_batches=2", "train.sample_every=0", "train.wandb=disabled"]


def train_argv(corpus, run_dir, *overrides) -> list[str]:
    return ["--config", str(ROOT / "configs/tiny-gpt.yaml"), "--run-dir", str(run_dir), "--no-progress", *SMALL,
            f"train.data={corpus}", *overrides]


def cli(command, argv, capsys):
    code = run(command, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def numbers(tree) -> list[np.ndarray]:
    key = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x  # noqa: E731
    return [np.asarray(key(x)) for x in jax.tree.leaves(tree)]


def params(run_dir: Path, step: int) -> list[np.ndarray]:
    return numbers(ocp.StandardCheckpointer().restore((run_dir / "checkpoints" / str(step) / "state").absolute()))


def loss_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


# --- subprocess training: kills and signals ----------------------------------------------------

KILL_RUN = ["train.max_steps=40", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.log_every=1",
            "train.eval_every=10"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "WANDB_MODE": "disabled"}


def start(corpus, run_dir, *overrides) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/train.py", *train_argv(corpus, run_dir, *KILL_RUN, *overrides)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> bool:
    """Polls `condition` (no sleep: a checkpoint write of this model lasts milliseconds) until it
    holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
    return False


def writing(run_dir: Path) -> bool:
    try:
        return any(".orbax-checkpoint-tmp" in name for name in os.listdir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return False


def logged_steps(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    code, _, err = finish(start(corpus, whole))
    assert code == 0, err
    rng = random.Random(int(os.environ.get("JAXLLM_KILL_SEED", "0")))
    moments = [  # (what, a condition on the run directory to kill at)
        ("while starting", lambda: (time.sleep(rng.uniform(0.5, 3.0)), True)[1]),
        ("during a checkpoint write", lambda: writing(killed)),
        ("mid-training", lambda k=rng.randint(3, 12): logged_steps(killed) >= k),
        ("during another checkpoint write", lambda: writing(killed)),
    ]
    hit = []
    for what, condition in moments:
        process = start(corpus, killed)
        if wait_for(condition, process):
            process.send_signal(signal.SIGKILL)
            hit.append((what, writing(killed)))
        finish(process)
    assert any(what.startswith("during") and was_writing for what, was_writing in hit), hit
    assert len(hit) >= 3, hit
    code, _, err = finish(start(corpus, killed))
    assert code == 0, err
    assert 40 in committed_steps(killed / "checkpoints")
    for a, b in zip(params(whole, 40), params(killed, 40), strict=True):  # parameters, Adam moments, counters
        assert np.array_equal(a, b)
    assert loss_steps(killed) == loss_steps(whole) == list(range(1, 41))  # no duplicated or lost step
    timeless = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
    assert [timeless(r) for r in read_metrics(killed / "metrics.jsonl")] == \
        [timeless(r) for r in read_metrics(whole / "metrics.jsonl")]
    assert not (killed / "train.lock").exists()


def test_sigterm_and_sigint_mid_run_save_a_checkpoint_and_exit_0_and_resuming_loses_no_step(corpus, tmp_path):
    """SIGTERM, then (resumed) SIGINT: each finishes its step, checkpoints it and exits 0, and the
    next run resumes there with no step lost or repeated."""
    endless = ["train.max_steps=100000", "train.checkpoint_every=1000"]
    stopped = 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(signum).name
        process = start(corpus, tmp_path, *endless)
        assert wait_for(lambda: logged_steps(tmp_path) >= stopped + 5, process)
        process.send_signal(signum)
        code, out, err = finish(process)
        assert code == 0, err
        assert "Traceback" not in err and f"{name}: stopping after this step with a checkpoint" in err
        if stopped:
            assert f"resumed from {tmp_path / 'checkpoints'} at step {stopped}" in out
        stopped = int(out.strip().splitlines()[-1].split(" at step ")[1].split(":")[0])
        assert out.strip().splitlines()[-1].startswith(f"stopped by {name} at step {stopped}: checkpoint")
        assert committed_steps(tmp_path / "checkpoints")[-1] == stopped  # saved where it stopped, not at 1000
        assert loss_steps(tmp_path) == list(range(1, stopped + 1))
    code, out, err = finish(start(corpus, tmp_path, f"train.max_steps={stopped + 2}"))
    assert code == 0, err
    assert f"resumed from {tmp_path / 'checkpoints'} at step {stopped}" in out
    assert loss_steps(tmp_path) == list(range(1, stopped + 3))


def test_a_second_signal_while_stopping_exits_at_once(monkeypatch, capsys):
    import jaxllm.train.loop as loop

    exits = []
    monkeypatch.setattr(loop, "exit_now", lambda signum: exits.append(signum))
    stop = loop.GracefulStop()
    stop(signal.SIGTERM)
    assert stop.name == "SIGTERM" and exits == []
    assert "SIGTERM: stopping after this step with a checkpoint (SIGTERM again exits at once)" in capsys.readouterr().err
    stop(signal.SIGINT)
    assert exits == [signal.SIGINT]  # jaxllm.cli.exit_now: one line, os._exit(128 + signum)


def test_ctrl_c_while_sampling_compiles_exits_130_with_one_line(corpus, tmp_path):
    code, _, err = finish(start(corpus, tmp_path, "train.max_steps=3"))
    assert code == 0, err
    process = subprocess.Popen([sys.executable, "scripts/sample.py", "--run", str(tmp_path), "--prompt", "the",
                                "--max-new-tokens", "50", "--no-stream"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr.readline().startswith("loaded ")  # then it compiles the decode loop
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)
    assert code == 130  # not -11: Python tearing down after KeyboardInterrupt left an XLA compile
    assert err.strip().splitlines() == ["interrupted (SIGINT): exiting"]


# --- non-finite numbers ----------------------------------------------------------------------


def test_a_nonfinite_update_is_skipped_inside_the_step_and_counted(corpus, monkeypatch):
    """A batch whose loss is forced to NaN leaves the model (parameters, RNG streams) and the
    optimizer's moments bit-identical (only the counters move); the next finite one updates them and
    resets the count in a row."""
    import jaxllm.train.loop as loop
    from jaxllm.sharding import make_mesh

    poison = 7  # a first token id that makes the loss NaN
    real = loop.lm_loss

    def poisoned(model, x, y, chunk=None):
        return real(model, x, y, chunk=chunk) * jax.numpy.where(x[0, 0] == poison, jax.numpy.nan, 1.0)

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    cfg = load_config(ROOT / "configs/tiny-gpt.yaml", [*SMALL, "train.max_steps=10"])
    mesh = make_mesh("data:1", jax.devices()[:1])
    rng = np.random.default_rng(0)
    good, bad = (rng.integers(0, 8, (8, 33)).astype(np.int32) for _ in range(2))
    good[0, 0], bad[0, 0] = 1, poison
    with jax.set_mesh(mesh):
        trainer = loop.Trainer(cfg, mesh)
        kept = lambda state: numbers((state[0], state[1]["opt_state"]["inner_state"]))  # noqa: E731
        before = kept(trainer.state)
        trainer.state, loss, _, skips = trainer.train_step(trainer.state, trainer.put(bad))
        assert np.isnan(loss) and skips.tolist() == [1, 1]
        assert all(np.array_equal(a, b) for a, b in zip(before, kept(trainer.state), strict=True))
        trainer.state, loss, _, skips = trainer.train_step(trainer.state, trainer.put(bad))
        assert skips.tolist() == [2, 2]
        trainer.state, loss, _, skips = trainer.train_step(trainer.state, trainer.put(good))
        assert np.isfinite(loss) and skips.tolist() == [0, 2]
        after = kept(trainer.state)
    assert not all(np.array_equal(a, b) for a, b in zip(before, after))


def test_a_run_gone_nonfinite_stops_after_n_skips_with_its_last_good_checkpoint(corpus, tmp_path, capsys):
    """lr=1e6 makes the gradient non-finite from step 3 on: the run skips, reports and counts the
    updates, stops after train.max_nonfinite_steps with exit 2, and every checkpoint on disk is finite
    and loads; metrics.jsonl stays JSON."""
    argv = train_argv(corpus, tmp_path, "train.max_steps=30", "train.lr=1e6", "train.min_lr=0", "train.log_every=1",
                      "train.checkpoint_every=2", "train.max_nonfinite_steps=3", "train.eval_every=100")
    code, _, err = cli("train", argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "non-finite 3 updates in a row (train.max_nonfinite_steps=3)" in errors[0]
    steps = committed_steps(tmp_path / "checkpoints")
    assert steps and f"its last checkpoint is step {steps[-1]}" in errors[0]
    stopped = int(errors[0].split()[2].rstrip(":"))
    assert stopped < 30
    assert [line for line in err.splitlines() if "update skipped" in line][-1].endswith("(3 in a row, 3 in all)")
    for step in steps:
        assert all(np.all(np.isfinite(x)) for x in params(tmp_path, step) if np.issubdtype(x.dtype, np.floating))
    model, step = load_model(tmp_path, steps[-1], announce=False)
    from flax import nnx
    assert step == steps[-1] and all(np.all(np.isfinite(x)) for x in numbers(nnx.state(model, nnx.Param)))
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = [json.loads(line) for line in text.splitlines()]
    # log_every=1: each record first settles its step's count, so the stopping step writes none
    assert [r["step"] for r in records] == list(range(1, stopped))
    assert records[-1]["skipped_updates"] == 2 and records[0]["skipped_updates"] == 0


def test_a_checkpoint_whose_state_overflowed_is_never_written(corpus, tmp_path, monkeypatch):
    import jaxllm.train.loop as loop

    monkeypatch.setattr(loop.Trainer, "all_finite", staticmethod(lambda state: False))
    cfg = load_config(ROOT / "configs/tiny-gpt.yaml", [*SMALL, f"train.data={corpus}", "train.max_steps=4",
                                                          "train.checkpoint_every=2"])
    with pytest.raises(TrainingError, match="non-finite numbers .* not saved, the run stops, no checkpoint"):
        loop.train(cfg, tmp_path, progress=False)
    assert committed_steps(tmp_path / "checkpoints") == []


# --- the run directory: lock, failed writes, corrupt files --------------------------------------


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_taken_over(corpus, tmp_path, capsys):
    argv = train_argv(corpus, tmp_path / "run", "train.max_steps=3")
    (tmp_path / "run").mkdir()
    holder = FileLock(tmp_path / "run" / "train.lock")  # another trainer, alive (its own open file)
    assert holder.acquire() == (True, {})
    before = snapshot(tmp_path)
    code, _, err = cli("train", argv, capsys)
    assert_one_line_error(code, err, "is in use by another trainer", f"pid {os.getpid()}", "--run-dir")
    assert snapshot(tmp_path) == before
    holder.release()
    (tmp_path / "run" / "train.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))
    code, out, err = cli("train", argv, capsys)
    assert code == 0, err
    assert "took over the lock of a trainer that is gone (pid 999999 on gone" in err
    assert not (tmp_path / "run" / "train.lock").exists()  # released (deleted) at the end


@pytest.mark.parametrize("where", ["save", "background"])
def test_a_failed_checkpoint_write_stops_the_run_at_once_in_one_line(where, corpus, tmp_path, capsys, monkeypatch):
    """A full disk: the write of the second checkpoint fails (in save itself, or in orbax's background
    thread, reported by check_for_errors): exit 2 at once, the first checkpoint intact."""
    calls = []
    real_save, real_check = ocp.CheckpointManager.save, ocp.CheckpointManager.check_for_errors

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            if where == "save":
                raise OSError(errno.ENOSPC, "No space left on device")
            return True  # the write "started" and will fail in the background: nothing is committed
        return real_save(self, step, *args, **kwargs)

    def check(self):
        if where == "background" and len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_check(self)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check)
    code, _, err = cli("train", train_argv(corpus, tmp_path, "train.max_steps=20", "train.checkpoint_every=2",
                                           "train.log_every=1"), capsys)
    assert_one_line_error(code, err, f"writing checkpoint '{tmp_path / 'checkpoints' / '4'}' failed",
                          "No space left on device", "checkpoint 2 is intact")
    assert calls == [2, 4] and committed_steps(tmp_path / "checkpoints") == [2]
    assert load_model(tmp_path, announce=False)[1] == 2
    assert max(loss_steps(tmp_path)) <= 5  # stopped at once, not at the end


def test_an_empty_corpus_writes_nothing_and_a_good_one_then_trains(corpus, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    run_dir = tmp_path / "run"
    code, _, err = cli("train", train_argv(tmp_path / "empty.txt", run_dir, "train.max_steps=3"), capsys)
    assert_one_line_error(code, err, "holds no text")
    assert not run_dir.exists()
    run_dir.mkdir()  # an existing, empty run directory stays empty too
    code, _, err = cli("train", train_argv(tmp_path / "empty.txt", run_dir, "train.max_steps=3"), capsys)
    assert_one_line_error(code, err, "holds no text")
    assert list(run_dir.iterdir()) == []
    code, out, err = cli("train", train_argv(corpus, run_dir, "train.max_steps=3"), capsys)
    assert code == 0, err
    vocab = len(set(corpus.read_text(encoding="utf-8"))) + 1  # the corpus's characters + unk, not a tokenizer of nothing
    assert f"vocab {vocab}," in out
    assert all(np.isfinite(r["loss"]) and r["loss"] > 1.0 for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r)


def test_a_refused_resume_leaves_the_run_directory_byte_identical(corpus, tmp_path, capsys):
    """A corrupt latest checkpoint: one line naming it and the previous step, and config.yaml is not
    rewritten with the new settings before the failure."""
    run_dir = tmp_path / "run"
    assert cli("train", train_argv(corpus, run_dir, "train.max_steps=4", "train.checkpoint_every=2"), capsys)[0] == 0
    for f in (run_dir / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    before = snapshot(tmp_path)
    code, _, err = cli("train", train_argv(corpus, run_dir, "train.max_steps=8", "train.lr=1e-4"), capsys)
    assert_one_line_error(code, err, f"checkpoint '{run_dir / 'checkpoints' / '4'}' cannot be read",
                          "step 2 is there too", "to resume from step 2")
    assert snapshot(tmp_path) == before
    code, _, err = cli("sample", ["--run", str(run_dir), "--prompt", "the"], capsys)
    assert_one_line_error(code, err, "cannot be read", "load it with --step 2")
    code, out, err = cli("sample", ["--run", str(run_dir), "--step", "2", "--prompt", "the", "--max-new-tokens", "4",
                                    "--no-stream"], capsys)
    assert code == 0 and f"loaded '{run_dir / 'checkpoints' / '2'}' (step 2)" in err


def test_resume_ignores_an_uncommitted_checkpoint(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli("train", train_argv(corpus, run_dir, "train.max_steps=3"), capsys)[0] == 0
    assert committed_steps(run_dir / "checkpoints") == [3]
    (run_dir / "checkpoints" / "3").rename(run_dir / "checkpoints" / "3.orbax-checkpoint-tmp-1764650000")
    before = snapshot(tmp_path)
    code, _, err = cli("train", [*train_argv(corpus, run_dir, "train.max_steps=4"), "--resume"], capsys)
    assert_one_line_error(code, err, "--resume", "no checkpoint to resume from")
    assert snapshot(tmp_path) == before


def test_loading_a_live_run_retries_when_its_latest_step_is_deleted_under_it(corpus, tmp_path, monkeypatch, capsys):
    """keep_checkpoints deletes the step a reader chose: the reader takes the new latest and says which."""
    run_dir = tmp_path / "run"
    argv = train_argv(corpus, run_dir, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    assert cli("train", argv, capsys)[0] == 0
    real = Checkpointer.restore_model
    deleted = []

    def restore_model(self, step, target):
        if not deleted:  # as the live run's policy would, between choosing the step and reading it
            import shutil
            shutil.rmtree(self.directory / str(step))
            deleted.append(step)
        return real(self, step, target)

    monkeypatch.setattr(Checkpointer, "restore_model", restore_model)
    model, step = load_model(run_dir)
    assert deleted == [4] and step == 2
    assert f"loaded '{run_dir / 'checkpoints' / '2'}' (step 2)" in capsys.readouterr().err
    deleted.clear()
    with pytest.raises(DataError, match="was deleted while it was read"):  # a step asked for is not replaced
        load_model(run_dir, 2)


# --- small pieces ------------------------------------------------------------------------------


def test_metrics_tolerate_a_torn_last_line_and_refuse_real_corruption(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(path)


def test_atomic_writes_get_the_mode_open_would_give_them(tmp_path):
    import jaxllm.files as files

    atomic_write(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d"):
        pass
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~files._UMASK
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~files._UMASK
    (tmp_path / "a.txt").chmod(0o640)
    atomic_write(tmp_path / "a.txt", "y")  # an existing file keeps its mode
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
