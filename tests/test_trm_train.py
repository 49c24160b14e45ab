"""TRM deep-supervision training (jaxllm.train.trm) through the common loop: the carry, halting
and exploration, EMA, exact resume, the evaluation scores, and one-line refusals of bad input."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxllm.cli import main as cli_main
from jaxllm.config import load_config
from jaxllm.sharding import make_mesh
from jaxllm.tasks.maze import make_dataset, save_puzzles
from jaxllm.train.loop import train
from jaxllm.train.trm import TRMRun, TRMTrainer, load_trm, puzzle_config, score
from tests.test_train import as_numbers

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.d_model=32", "model.attention.n_head=2", "model.trm.h_cycles=2", "model.trm.l_cycles=2",
         "model.trm.n_sup=4", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
         "train.checkpoint_every=100", "train.eval_every=100", "train.mesh=data:-1"]


@pytest.fixture(scope="module")
def puzzles(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("puzzles") / "maze3.npz"
    save_puzzles(path, make_dataset(3, 400, 40, seed=0))
    return path


def cfg_for(puzzles, *overrides):
    return load_config(ROOT / "configs/trm-maze.yaml", [*SMALL, f"train.data={puzzles}", *overrides])


def test_carry_replaces_exactly_the_halted_rows_and_counts_their_steps(puzzles):
    cfg = puzzle_config(cfg_for(puzzles, "model.trm.halt_exploration=0"))
    mesh = make_mesh("data:1", jax.devices()[:1])
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        trainer = TRMTrainer(cfg, mesh, batch=8)
        batches = [rng.integers(2, 50, (8, 2, 9)).astype(np.int32) % [[[50], [2]]] for _ in range(6)]
        history = []
        for batch in batches:
            carry_before = jax.device_get(nnx.merge(trainer.graphdef, trainer.state)[3])
            halted_before = np.asarray(carry_before.halted[...])
            trainer.state, *_ = trainer.train_step(trainer.state, trainer.put(batch))
            carry = nnx.merge(trainer.graphdef, trainer.state)[3]
            inputs, steps = np.asarray(carry.inputs[...]), np.asarray(carry.steps[...])
            old_inputs = np.asarray(carry_before.inputs[...])
            np.testing.assert_array_equal(inputs[halted_before], batch[halted_before, 0])
            np.testing.assert_array_equal(inputs[~halted_before], old_inputs[~halted_before])
            np.testing.assert_array_equal(steps[halted_before], 1)
            np.testing.assert_array_equal(steps[~halted_before], np.asarray(carry_before.steps[...])[~halted_before] + 1)
            history.append(np.asarray(carry.halted[...]))
    # the q head starts at bias -5: nothing halts early, every row halts at n_sup = 4 steps
    assert [h.all() for h in history] == [False, False, False, True, False, False]


def test_exploration_holds_rows_past_a_positive_halting_logit(puzzles):
    """With the halting bias forced positive, every row halts after its first step unless exploration
    drew it a minimum of 2..n_sup steps: with probability 1 no row halts before step 2."""
    mesh = make_mesh("data:1", jax.devices()[:1])
    batch = np.zeros((8, 2, 9), np.int32) + [[[2], [0]]]
    halts = {}
    for p in (0.0, 1.0):
        cfg = puzzle_config(cfg_for(puzzles, f"model.trm.halt_exploration={p}"))
        with jax.set_mesh(mesh):
            trainer = TRMTrainer(cfg, mesh, batch=8)
            model, optimizer, ema, carry = nnx.merge(trainer.graphdef, trainer.state)
            model.q_head.bias[...] = jnp.full((1,), 20.0)
            trainer.state = nnx.state((model, optimizer, ema, carry))
            trainer.state, *_ = trainer.train_step(trainer.state, trainer.put(batch))
            halts[p] = np.asarray(nnx.merge(trainer.graphdef, trainer.state)[3].halted[...])
    assert halts[0.0].all() and not halts[1.0].any()


def test_ema_follows_the_weights_at_its_decay(puzzles):
    cfg = puzzle_config(cfg_for(puzzles, "model.trm.ema_decay=0.5", "train.warmup_steps=0"))  # lr > 0 at once
    mesh = make_mesh("data:1", jax.devices()[:1])
    batch = np.random.default_rng(1).integers(0, 2, (8, 2, 9)).astype(np.int32) + [[[2], [0]]]
    with jax.set_mesh(mesh):
        trainer = TRMTrainer(cfg, mesh, batch=8)
        before = jax.device_get(nnx.state(nnx.merge(trainer.graphdef, trainer.state)[2], nnx.Param))
        trainer.state, *_ = trainer.train_step(trainer.state, trainer.put(batch))
        model, _, ema, _ = nnx.merge(trainer.graphdef, trainer.state)
        after, weights = (jax.device_get(nnx.state(m, nnx.Param)) for m in (ema, model))
    moved = 0
    for b, a, w in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(weights), strict=True):
        np.testing.assert_allclose(a, 0.5 * b + 0.5 * w, rtol=1e-6, atol=1e-7)
        moved += not np.array_equal(a, b)
    assert moved > 5


def test_resume_continues_the_carry_and_ema_bit_for_bit(puzzles, tmp_path):
    cfg = cfg_for(puzzles, "train.max_steps=8", "train.eval_every=4")
    whole = train(cfg, tmp_path / "whole", progress=False, run_class=TRMRun)
    train(cfg, tmp_path / "split", progress=False, stop_after=3, run_class=TRMRun)
    resumed = train(cfg, tmp_path / "split", progress=False, run_class=TRMRun)
    timeless = lambda r: {k: v for k, v in r.items() if k != "steps_per_s"}  # noqa: E731
    assert timeless(resumed) == timeless(whole)
    a, b = (ocp.StandardCheckpointer().restore((tmp_path / run / "checkpoints/8/state").absolute())
            for run in ("whole", "split"))
    assert set(a) == {"0", "1", "2", "3"}  # model, optimizer, EMA model, carry
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 20
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(as_numbers(x), as_numbers(y))
    records = [[timeless(json.loads(line)) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("whole", "split")]
    assert records[0] == records[1] and {"val_exact", "train_exact", "halt_steps"} <= set(records[0][-1])


def test_load_trm_reads_the_ema_weights_and_the_trained_ones(puzzles, tmp_path):
    cfg = cfg_for(puzzles, "train.max_steps=3")
    train(cfg, tmp_path, progress=False, run_class=TRMRun)
    saved = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints/3/state").absolute())
    for ema, key in ((True, "2"), (False, "0")):
        model, step, _ = load_trm(tmp_path, ema=ema)
        got = jax.device_get(nnx.state(model, nnx.Param)["lm_head"]["weight"][...])
        assert step == 3
        np.testing.assert_array_equal(got, np.asarray(saved[key]["lm_head"]["weight"]["value"]))
    assert not np.array_equal(saved["0"]["lm_head"]["weight"]["value"], saved["2"]["lm_head"]["weight"]["value"])


def test_score_reads_accuracy_per_step_and_where_the_halting_head_stops():
    labels = np.array([[1, 0], [0, 1], [1, 1]])
    right, wrong = labels, 1 - labels
    predictions = np.stack([wrong, right, right])  # [S=3, N=3, L]
    predictions[2, 2] = wrong[2]  # puzzle 2 is right after step 2 only
    q_halt = np.array([[-1, 1, -1], [2, -1, 3], [-1, -1, -1.0]])  # stops: puzzle 0 at 2, 1 at 1, 2 at 2
    s = score(predictions, q_halt, labels)
    assert s.by_step == [0.0, 1.0, 2 / 3]
    assert s.halted == pytest.approx(2 / 3)  # puzzle 1 halted after step 1, still wrong
    assert s.mean_halt_steps == pytest.approx(5 / 3)


@pytest.mark.parametrize("override, message", [
    ("model.trm.h_cycles=0", "model.trm.h_cycles=0 is invalid: must be an integer >= 1"),
    ("model.trm.l_cycles=-1", "model.trm.l_cycles=-1 is invalid: must be an integer >= 1"),
    ("model.trm.n_sup=0", "model.trm.n_sup=0 is invalid"),
    ("model.trm.mode=plain", "model.trm.n_sup=4 is invalid: must be 1 when model.trm.mode is 'plain'"),
    ("model.trm.halt_exploration=1.5", "model.trm.halt_exploration=1.5 is invalid"),
    ("model.trm.ema_decay=1", "model.trm.ema_decay=1.0 is invalid"),
    ("model.trm.mixer=conv", "model.trm.mixer: got 'conv'"),
    ("model.recursion.mode=trm", "model.recursion.mode='trm' is invalid: must be 'none'"),
    ("model.attention.window=4", "model.attention.window=4 is invalid"),
    ("train.grad_accum=2", "train.grad_accum=2 is invalid: must be 1 when model.trm.enabled"),
])
def test_a_recursion_config_that_cannot_run_is_one_line_exit_2(puzzles, tmp_path, capsys, override, message):
    code = cli_main(["train", "--config", str(ROOT / "configs/trm-maze.yaml"), "--run-dir", str(tmp_path / "run"),
                     *SMALL, f"train.data={puzzles}", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_puzzle_file_of_the_wrong_shape_is_one_line_exit_2(puzzles, tmp_path, capsys):
    data = dict(np.load(puzzles))
    data["train_labels"] = data["train_labels"][:, :-1]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    code = cli_main(["train", "--config", str(ROOT / "configs/trm-maze.yaml"), "--run-dir", str(tmp_path / "run"),
                     *SMALL, f"train.data={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and "train_labels" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_sample_refuses_a_trm_run(puzzles, tmp_path, capsys):
    code = cli_main(["train", "--config", str(ROOT / "configs/trm-maze.yaml"), "--run-dir", str(tmp_path),
                     *SMALL, f"train.data={puzzles}", "--sample", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "has no text to sample" in err and err.count("\n") == 1
