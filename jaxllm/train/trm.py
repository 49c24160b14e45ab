"""Deep-supervision training of a TRM (papers.md §2.2-2.3) through the same loop, run directory,
checkpoints and resume as a language model (`jaxllm.train.loop`).

The batch is a *carry* of B puzzles in progress, the official scheme: every optimizer step is one
supervision step of every row. A row whose puzzle halted at the previous step takes the next
puzzle of the data iterator (each step reads a whole batch, of which only those rows are used) and
starts again from TRM's initial (y, z); the others continue from their carried, detached (y, z).
A row halts after model.trm.n_sup steps, or earlier when its halting logit is > 0, except that with
probability halt_exploration a row draws a minimum number of steps in 2..n_sup first. The loss is
TRM's (`jaxllm.model.losses.trm_loss`); an EMA of the weights (model.trm.ema_decay) is kept beside
them and is what evaluation and `load_trm` use.

The carry and the EMA are part of the checkpointed state, so a resumed run continues bit for bit.
The puzzles come from a puzzle file (train.data, `jaxllm.tasks.maze`): its training split minus
its last train.val_fraction (at most 1000 puzzles), which is the validation set the run reports;
the test split is never read in training.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxllm.checkpoint import MODEL, Checkpointer, checkpoint_step, inference_mesh
from jaxllm.config import Config, load_config
from jaxllm.errors import DataError
from jaxllm.model.losses import trm_loss
from jaxllm.model.trm import TRM, abstract_trm, solve
from jaxllm.sharding import batch_sharding, build_state, state_shardings
from jaxllm.train import loop
from jaxllm.train.optim import last_grad_norm, make_optimizer, nonfinite_counts, poison_unless_finite

EMA = 2  # the subtree of the saved state holding the EMA model (MODEL = 0: the trained weights)
MAX_VAL_PUZZLES = 1000


class CarryState(nnx.Variable):
    """The training carry: state of the puzzles in progress, saved with the model, never trained."""


class Carry(nnx.Module):
    """B puzzles in progress: their cells and labels [B, L], carried (y, z) [B, T, D], the
    supervision steps each has had [B] and whether it halted at the last step [B] (at the start:
    all, so the first step takes a whole batch)."""

    def __init__(self, model: TRM, batch: int):
        y, z = model.initial_state(batch)
        cells = (batch, model.cfg.max_seq_len)
        self.inputs, self.labels = CarryState(jnp.zeros(cells, jnp.int32)), CarryState(jnp.zeros(cells, jnp.int32))
        self.y, self.z = CarryState(y), CarryState(z)
        self.steps = CarryState(jnp.zeros((batch,), jnp.int32))
        self.halted = CarryState(jnp.ones((batch,), bool))


def puzzle_config(cfg: Config) -> Config:
    """`cfg` with model.vocab_size and model.max_seq_len from its puzzle file (train.data)."""
    from jaxllm.tasks.maze import load_puzzles

    puzzles = load_puzzles(cfg.train.data)
    model = dataclasses.replace(cfg.model, vocab_size=puzzles.vocab_size, max_seq_len=puzzles.seq_len)
    return dataclasses.replace(cfg, model=model)


class TRMTrainer:
    """(model, optimizer, EMA model, carry) laid out over a mesh, and the jitted supervision step."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, batch: int):
        self.cfg, self.mesh = cfg, mesh
        tx = make_optimizer(cfg.train)

        def create():
            model = TRM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
            ema = nnx.clone(model)
            return model, nnx.Optimizer(model, tx, wrt=nnx.Param), ema, Carry(model, batch)

        self.graphdef, abstract = nnx.split(nnx.eval_shape(create))
        self.shardings = state_shardings(abstract, mesh)
        self.batch_sharding = batch_sharding(mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state = build_state(create, abstract, self.shardings, mesh)
        self.key = jax.random.key(cfg.train.seed)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.shardings, self.batch_sharding),
                                  out_shardings=(self.shardings, replicated, replicated, replicated, replicated),
                                  donate_argnums=0)
        self.solve = jax.jit(self._solve, static_argnames=("n_sup", "h_cycles", "l_cycles"))

    def _train_step(self, state, batch):
        """(new state, loss, grad_norm, skipped, metrics): one supervision step of the carry; batch
        [B, 2, L] (cells, labels) fills the rows that halted. metrics: [cross-entropy, puzzles
        halted now, of them exactly solved, their mean supervision steps]."""
        model, optimizer, ema, carry = nnx.merge(self.graphdef, state)
        t = self.cfg.model.trm
        fresh = carry.halted[...]
        inputs = jnp.where(fresh[:, None], batch[:, 0], carry.inputs[...])
        labels = jnp.where(fresh[:, None], batch[:, 1], carry.labels[...])
        y0, z0 = model.initial_state(inputs.shape[0])
        y = jnp.where(fresh[:, None, None], y0, carry.y[...])
        z = jnp.where(fresh[:, None, None], z0, carry.z[...])
        steps = jnp.where(fresh, 0, carry.steps[...]) + 1

        def loss_fn(model):
            out = model(inputs, y, z)
            loss, (ce, correct) = trm_loss(out.logits, out.q_halt, labels, t.stablemax)
            return loss, (out, ce, correct)

        (loss, (out, ce, correct)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, poison_unless_finite(loss, grads))
        decay = 0.0 if t.ema_decay is None else t.ema_decay
        nnx.update(ema, optax.incremental_update(nnx.state(model, nnx.Param), nnx.state(ema, nnx.Param), 1 - decay))

        halted = steps >= t.n_sup
        if t.n_sup > 1:  # halting head, with exploration: a drawn minimum of 2..n_sup steps
            explore_key, steps_key = jax.random.split(jax.random.fold_in(self.key, optimizer.step[...]))
            explore = jax.random.uniform(explore_key, steps.shape) < t.halt_exploration
            min_steps = jnp.where(explore, jax.random.randint(steps_key, steps.shape, 2, t.n_sup + 1), 0)
            halted = halted | ((out.q_halt > 0) & (steps >= min_steps))
        for var, value in ((carry.inputs, inputs), (carry.labels, labels), (carry.y, out.y), (carry.z, out.z),
                           (carry.steps, steps), (carry.halted, halted)):
            var[...] = value
        n_halted = jnp.sum(halted)
        metrics = jnp.stack([ce, n_halted, jnp.sum(halted & correct), jnp.sum(jnp.where(halted, steps, 0))])
        return (nnx.state((model, optimizer, ema, carry)), loss, last_grad_norm(optimizer.opt_state),
                nonfinite_counts(optimizer.opt_state), metrics.astype(jnp.float32))

    def _solve(self, state, tokens, n_sup: int, h_cycles: int | None = None, l_cycles: int | None = None):
        return solve(self.eval_model(state), tokens, n_sup, h_cycles=h_cycles, l_cycles=l_cycles)

    def eval_model(self, state) -> TRM:
        """The EMA model of `state` (the weights evaluation uses)."""
        return nnx.merge(self.graphdef, state)[2]

    @staticmethod
    def all_finite(state) -> jax.Array:
        return loop.Trainer.all_finite(state)

    def put(self, batch: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.batch_sharding, batch)


@dataclasses.dataclass(frozen=True)
class Scores:
    """Exact-puzzle accuracy of `solve`'s predictions: after each supervision step, and where the
    halting head stopped (the first step whose logit is > 0, else the last), with the mean number
    of steps it chose."""
    by_step: list[float]
    halted: float
    mean_halt_steps: float


def score(predictions: np.ndarray, q_halt: np.ndarray, labels: np.ndarray) -> Scores:
    """predictions [S, N, L], q_halt [S, N], labels [N, L] -> Scores."""
    correct = np.all(predictions == labels[None], axis=-1)  # [S, N]
    n_sup = correct.shape[0]
    stops = np.where(np.any(q_halt > 0, axis=0), np.argmax(q_halt > 0, axis=0), n_sup - 1)
    return Scores([float(c) for c in correct.mean(axis=1)],
                  float(correct[stops, np.arange(correct.shape[1])].mean()), float(stops.mean() + 1))


def evaluate(solve_fn, inputs: np.ndarray, labels: np.ndarray, batch: int, n_sup: int, **depth) -> Scores:
    """`score` over puzzles (cells [N, L], labels [N, L]) run `batch` at a time through `solve_fn`
    (tokens, n_sup, h_cycles=..., l_cycles=...) -> (predictions, q_halt); the last batch is padded."""
    preds, qs = [], []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)]) if len(chunk) < batch else chunk
        p, q = jax.device_get(solve_fn(jnp.asarray(padded), n_sup=n_sup, **depth))
        preds.append(p[:, :len(chunk)])
        qs.append(q[:, :len(chunk)])
    return score(np.concatenate(preds, 1), np.concatenate(qs, 1), labels)


def puzzle_iterator(pairs: np.ndarray, batch: int, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless shuffled batches [batch, 2, L] of (cells, labels) for this host, as
    `data.train_iterator` does for token windows (its state is checkpointed)."""
    import grain

    if len(pairs) < batch * process_count:
        raise DataError(f"train.data has {len(pairs)} training puzzles: too few for one batch of "
                        f"{batch * process_count}; use a bigger puzzle file or a smaller train.batch_size")
    ds = grain.MapDataset.source(pairs).shuffle(seed=seed).repeat(None)
    ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


class TRMRun(loop.Run):
    """`loop.Run` for a TRM on a puzzle file: the same lock, checks, checkpoints, NaN guard, graceful
    stop and logs; its own data (puzzles), step (`TRMTrainer`), log line and evaluation."""

    def check(self, cfg: Config) -> None:
        cfg = puzzle_config(cfg)  # (a bad puzzle file is refused here, before anything is written)
        saved = loop.saved_config(self.run_dir)
        if saved is not None and (problem := loop._incompatibility(saved, cfg)):
            raise DataError(f"run directory {str(self.run_dir)!r} holds a run of another config ({problem}); "
                            f"use a new --run-dir or the same config")

    def prepare(self, cfg: Config) -> Config:
        from jaxllm.files import atomic_write
        from jaxllm.config import to_yaml
        from jaxllm.tasks.maze import load_puzzles

        cfg = puzzle_config(cfg)
        puzzles = load_puzzles(cfg.train.data)
        pairs = np.stack([puzzles.train_inputs, puzzles.train_labels], axis=1)  # [N, 2, L]
        n_val = min(MAX_VAL_PUZZLES, max(1, int(len(pairs) * cfg.train.val_fraction)))
        self.train_pairs, self.val_pairs = pairs[:-n_val], pairs[-n_val:]
        if self.is_main and not (self.run_dir / "config.yaml").exists():
            atomic_write(self.run_dir / "config.yaml", to_yaml(cfg))
        return cfg

    def make_trainer(self) -> TRMTrainer:
        return TRMTrainer(self.cfg, self.mesh, self.t.batch_size)

    def describe(self) -> str:
        t = self.cfg.model.trm
        return (f"TRM {t.mode} (T={t.h_cycles}, n={t.l_cycles}, n_sup={t.n_sup}, {t.mixer}), "
                f"{len(self.train_pairs):,} train / {len(self.val_pairs):,} val puzzles of {self.cfg.model.max_seq_len} cells")

    def _enter_stage(self, index: int) -> None:
        local = self.t.batch_size // jax.process_count()
        self.stage_index = 0
        self.data_iter = puzzle_iterator(self.train_pairs, local, self.t.seed, jax.process_index(),
                                         jax.process_count())

    def train_step(self) -> jax.Array:
        self.trainer.state, loss, grad_norm, skips, metrics = self.trainer.train_step(
            self.trainer.state, self.trainer.put(next(self.data_iter)))
        self.window.losses.append(loss)
        self.window.metrics.append(metrics)
        self._count_step(skips)
        return grad_norm

    def train_record(self, grad_norm: jax.Array) -> dict:
        """Loss, cross-entropy, and of the puzzles that halted in the window: how many were solved
        exactly and after how many supervision steps on average; steps/s."""
        self._settle_skips()
        losses = np.asarray(jax.device_get(self.window.losses), np.float64)
        ce, n_halted, n_solved, n_steps = np.asarray(jax.device_get(self.window.metrics), np.float64).T
        finite = losses[np.isfinite(losses)]
        halted = n_halted.sum()
        record = {"step": self.step, "loss": float(finite.mean()) if finite.size else math.nan,
                  "ce": float(ce.mean()), "lr": float(self.schedule(self.step - 1)), "grad_norm": float(grad_norm),
                  "train_exact": float(n_solved.sum() / halted) if halted else None,
                  "halt_steps": float(n_steps.sum() / halted) if halted else None,
                  "steps_per_s": len(losses) / (time.perf_counter() - self.window.start),
                  "skipped_updates": self.skipped}
        self.bar.set_postfix_str(f"loss {record['loss']:.4f} | exact {record['train_exact'] or 0:.3f} | "
                                 f"{record['steps_per_s']:.1f} step/s")
        self.window = loop.Window()
        return record

    def evaluate(self) -> dict:
        """Exact accuracy of the EMA model on the validation puzzles after n_sup steps and where the
        halting head stops; val_loss (what the best checkpoint is chosen by) is 1 - the former."""
        n_sup = self.cfg.model.trm.n_sup
        scores = evaluate(lambda tokens, **kw: self.trainer.solve(self.trainer.state, tokens, **kw),
                          self.val_pairs[:, 0], self.val_pairs[:, 1], self.t.batch_size, n_sup)
        record = {"step": self.step, "val_exact": scores.by_step[-1], "val_exact_halted": scores.halted,
                  "val_halt_steps": scores.mean_halt_steps, "val_loss": 1.0 - scores.by_step[-1]}
        self.say(f"step {self.step}: val exact {scores.by_step[-1]:.3f} after {n_sup} steps, {scores.halted:.3f} "
                 f"halted (mean {scores.mean_halt_steps:.2f} steps)")
        return record

    def sample(self) -> None:
        """A puzzle model has no text to sample."""


def load_trm(run_dir: Path, step: int | None = None, *, ema: bool = True) -> tuple[TRM, int, Config]:
    """(model, step, config) of a TRM run directory's checkpoint (default: the latest): the EMA
    weights unless `ema` is False. Reads the model part of the checkpoint only."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{str(run_dir)!r} is not a run directory (no config.yaml); give a directory written by "
                        f"`jaxllm train`")
    cfg = load_config(run_dir / "config.yaml")
    if not cfg.model.trm.enabled:
        raise DataError(f"run directory {str(run_dir)!r} holds a language model, not a TRM (model.trm.enabled)")
    mesh = inference_mesh(cfg.train.mesh)
    graphdef, abstract = nnx.split(abstract_trm(cfg.model, cfg.train.seed))
    shardings = state_shardings(abstract, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    checkpointer = Checkpointer(run_dir / "checkpoints", create=False)
    try:
        chosen = checkpoint_step(run_dir, checkpointer, step)
        state = checkpointer.restore_model(chosen, target, key=EMA if ema else MODEL)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, state), chosen, cfg
