"""The training loop: a run directory, a sharded jitted train step, evaluation, samples,
checkpoints and resume.

A run directory holds `config.yaml` (the resolved config, vocab_size set from the tokenizer),
`tokenizer.json`, `tokens.bin`/`tokens.json` (the corpus, tokenised once), `checkpoints/`,
`metrics.jsonl` and `loss.png`. Running again in the same directory resumes from its latest
checkpoint; a directory made by an incompatible config is refused before anything is written.
While a run trains, `train.lock` in its directory holds off a second trainer.

Nothing fails silently: an update whose loss or gradient is non-finite is skipped inside the jitted
step and reported, and train.max_nonfinite_steps of them in a row stop the run (exit 2) with its
last checkpoint intact; a checkpoint is never written with non-finite numbers, and a failed
checkpoint write stops the run at once. The first SIGINT / SIGTERM finishes the step, writes a
checkpoint and exits 0; a second exits at once (every file is written atomically, so a kill at
any moment leaves the newest committed checkpoint to resume from).

`train()` reads top to bottom; each job is one method of `Run`: set up (`Run(...)`), `restore`,
`open_outputs`, then per step `train_step` (grad_accum micro-batches, one update), `train_record`
(loss, lr, grad_norm, throughput), `evaluate` (validation loss, curriculum), `write`, `sample`,
`save`; `finish` and `close` at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from jaxllm.checkpoint import Checkpointer, committed_steps, load_model
from jaxllm.cli import exit_now, signal_handler
from jaxllm.config import Config, ModelConfig, to_dict, to_yaml
from jaxllm.errors import ConfigError, DataError, TrainingError
from jaxllm.files import FileLock, atomic_write
from jaxllm.metrics import flops_per_token, peak_flops
from jaxllm.model import Transformer, lm_loss, next_token_loss, tidar_losses
from jaxllm.model.params import Buffer
from jaxllm.model.transformer import abstract_model
from jaxllm.model.moe import pop_expert_load, update_router_bias
from jaxllm.sharding import batch_divisor, batch_sharding, build_state, make_mesh, state_shardings
from jaxllm.train import data as data_lib
from jaxllm.train.monitor import MetricsLog, Wandb
from jaxllm.train.optim import (last_grad_norm, loss_scale, lr_schedule, make_optimizer, nonfinite_counts,
                                 poison_unless_finite, trainable_filter, update_applied)
from jaxllm.train.parallel import per_device_gradients, value_and_grad_per_device
from jaxllm.train.tokenizer import build_tokenizer, load_tokenizer

# Train fields that must match to continue a run in the same directory (the model section must too).
DATA_FIELDS = ("data", "text_field", "max_corpus_bytes", "val_fraction", "tokenizer", "bpe_vocab_size", "seed")


# ---------------------------------------------------------------------------------------------
# The run directory: config, tokenizer, tokens


# Model fields that choose how the same numbers are computed, not which: a run continues under
# another value of them.
EXECUTION_FIELDS = ("model.remat", "model.scan_layers", "model.attention.implementation")


def _dotted(tree: dict, prefix: str) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _incompatibility(saved: dict, cfg: Config) -> str | None:
    """The first field (dotted) that differs between a run directory's saved config and `cfg`. A
    model field the saved config lacks (added to jaxllm since) counts at its default."""
    new = to_dict(cfg)
    new["model"]["vocab_size"] = saved["model"].get("vocab_size")  # set from the tokenizer
    pairs = [(f"train.{k}", saved["train"].get(k), new["train"][k]) for k in DATA_FIELDS]
    old_model, defaults = _dotted(saved["model"], "model."), _dotted(to_dict(ModelConfig()), "model.")
    pairs += [(k, old_model.get(k, defaults.get(k)), v) for k, v in _dotted(new["model"], "model.").items()
              if k not in EXECUTION_FIELDS]
    for name, old, value in pairs:
        if old != value:
            return f"{name}: {old!r} there, {value!r} now"
    return None


def saved_config(run_dir: Path) -> dict | None:
    """The run directory's config.yaml as a dict (None when there is none); an empty or unreadable
    one is a one-line DataError."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{str(path)!r} is not YAML ({type(e).__name__}); restore it or use a new --run-dir") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict) and isinstance(saved.get("train"), dict)):
        raise DataError(f"{str(path)!r} is empty or not a run's config (no model and train sections); restore it "
                        f"or use a new --run-dir")
    return saved


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Everything that can be known wrong before a run directory is written to: a saved config of
    another run, a missing or empty corpus, corrupt tokens. Reads only."""
    t = cfg.train
    saved = saved_config(run_dir)
    if saved is not None and (problem := _incompatibility(saved, cfg)):
        raise DataError(f"run directory {str(run_dir)!r} holds a run of another config ({problem}); "
                        f"use a new --run-dir or the same config")
    if data_lib.load_tokens(run_dir) is None:  # (a truncated tokens.bin is refused by load_tokens)
        data_lib.check_corpus(t.data, t.text_field, t.max_corpus_bytes)  # also a missing data path
    else:
        data_lib.corpus_files(t.data)  # a missing data path
    if t.init_from is not None:  # the weights come with their vocabulary: the tokenizer must fit it
        if not t.tokenizer.endswith(".json"):
            raise ConfigError(f"train.tokenizer={t.tokenizer!r}: with train.init_from the tokenizer must be the "
                              f"weights' own tokenizer.json (give train.tokenizer=PATH)")
        size = load_tokenizer(t.tokenizer).vocab_size
        if size > cfg.model.vocab_size:
            raise DataError(f"train.tokenizer {t.tokenizer!r} has {size} tokens but the weights of "
                            f"{t.init_from!r} only {cfg.model.vocab_size}; give the tokenizer they were trained with")


def prepare_run_dir(cfg: Config, run_dir: Path, is_main: bool = True):
    """Config (with vocab_size from the tokenizer), tokenizer and memory-mapped tokens of a run:
    `check_run_dir`, then `_prepare_checked_run_dir`."""
    check_run_dir(cfg, run_dir)
    return _prepare_checked_run_dir(cfg, run_dir, is_main)


def _prepare_checked_run_dir(cfg: Config, run_dir: Path, is_main: bool = True):
    """`prepare_run_dir` after its checks. A new run directory gets its config.yaml here; an existing
    one keeps its own until a resume has read its checkpoint and metrics (`Run.open_outputs`)."""
    t = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    texts = lambda: data_lib.iter_texts(t.data, t.text_field, t.max_corpus_bytes)  # noqa: E731
    tokens = data_lib.load_tokens(run_dir)
    if tokens is None:  # tokenizer.json and tokens.bin are written together, tokens.json last
        tokenizer = build_tokenizer(t.tokenizer, texts, t.bpe_vocab_size)
        tokens = data_lib.tokenize_corpus(texts(), tokenizer, run_dir)
    else:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    # TiDAR reserves one more id, never produced by the tokenizer, for its [MASK] token
    reserved = 1 if cfg.model.diffusion.enabled and cfg.model.diffusion.mask_token_id is None else 0
    if t.init_from is None:  # (imported weights keep their own vocabulary)
        model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size + reserved)
        cfg = dataclasses.replace(cfg, model=model)
    if is_main and not (run_dir / "config.yaml").exists():
        atomic_write(run_dir / "config.yaml", to_yaml(cfg))
    return cfg, tokenizer, tokens


# ---------------------------------------------------------------------------------------------
# Sharded state and jitted steps


class Trainer:
    """The model + optimizer state laid out over a mesh, and the jitted steps that use it."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, init=None):
        """`init`: a model (same config) whose parameters and buffers the state starts from
        (train.init_from); the optimizer starts fresh either way."""
        self.cfg, self.mesh = cfg, mesh
        tx = make_optimizer(cfg.train)

        self.wrt = trainable_filter(abstract_model(cfg.model), cfg.train.trainable)

        def create():
            model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
            model.train()  # dropout / LayerDrop on; eval steps switch their copy off
            return model, nnx.Optimizer(model, tx, wrt=self.wrt)  # frozen parameters get no state

        self.graphdef, abstract = nnx.split(nnx.eval_shape(create))
        self.shardings = state_shardings(abstract, mesh)
        self.batch_sharding = batch_sharding(mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state = build_state(create, abstract, self.shardings, mesh)
        if init is not None:
            self.state = self._with_weights(init)
        self.per_device = per_device_gradients(mesh, cfg.model)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.shardings, self.batch_sharding),
                                  out_shardings=(self.shardings, replicated, replicated, replicated),
                                  donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.shardings, self.batch_sharding),
                                 out_shardings=replicated)

    def _with_weights(self, source):
        """The state with the model's parameters and buffers taken from `source` (cast to this
        config's parameter dtype, laid out like the state)."""
        def merged(state, weights):
            model, optimizer = nnx.merge(self.graphdef, state)
            variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, Buffer))))
            for path, var in nnx.to_flat_state(weights):  # (LoRA adapters, absent from the weights, stay new)
                variables[path][...] = var[...].astype(variables[path].dtype)
            return nnx.state((model, optimizer))

        weights = nnx.state(source, nnx.Any(nnx.Param, Buffer))
        return jax.jit(merged, out_shardings=self.shardings, donate_argnums=0)(self.state, weights)

    def _train_step(self, state, batch):
        """(new state, loss, grad_norm, skipped): one micro-batch through the model and the optimizer
        (with train.grad_accum > 1, optax.MultiSteps applies the update every grad_accum calls).
        grad_norm is the global norm of the last update's gradient: with accumulation, that of the
        whole batch. A non-finite loss or gradient leaves the state as it was (apply_if_finite);
        skipped = [such micro-batches in a row, in all]."""
        model, optimizer = nnx.merge(self.graphdef, state)
        scale = loss_scale(optimizer.opt_state)  # 1 unless train.loss_scale (float16)
        scaled = lambda m, x, y: lm_loss(m, x, y, chunk=self.cfg.train.loss_chunk) * scale  # noqa: E731
        if self.per_device:  # CPU devices: one flat all-reduce (jaxllm.train.parallel)
            loss, grads = value_and_grad_per_device(lambda m, b: scaled(m, b[:, :-1], b[:, 1:]), model, self.wrt,
                                                    batch, self.mesh)
        else:
            loss, grads = nnx.value_and_grad(scaled, argnums=nnx.DiffState(0, self.wrt))(
                model, batch[:, :-1], batch[:, 1:])
        loss = loss / scale  # the optimizer's first transformation unscales the gradient
        optimizer.update(model, poison_unless_finite(loss, grads))
        applied = update_applied(optimizer.opt_state)  # a skipped update moves no router bias either (load 0)
        loads = jax.tree.map(lambda load: jnp.where(applied, load, 0), pop_expert_load(model))
        update_router_bias(model, loads)  # DeepSeek-V3 balancing; a no-op for other models
        return nnx.state((model, optimizer)), loss, last_grad_norm(optimizer.opt_state), nonfinite_counts(
            optimizer.opt_state)

    @staticmethod
    @jax.jit
    def all_finite(state) -> jax.Array:
        """Whether every floating-point number of `state` is finite."""
        return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
                                  if jnp.issubdtype(x.dtype, jnp.floating)]))

    def eval_model(self, state):
        """The model of `state` in eval mode (no dropout); the state itself is left as it is."""
        model, _ = nnx.merge(self.graphdef, state)
        model.eval()
        return model

    def _eval_step(self, state, batch) -> dict:
        """{"val_loss": next-token loss}, and for a TiDAR model also its drafter's loss
        ("val_diffusion_loss": every token masked, as in training), so the drafter can be watched."""
        model, tokens, targets, chunk = self.eval_model(state), batch[:, :-1], batch[:, 1:], self.cfg.train.loss_chunk
        losses = {"val_loss": next_token_loss(model, tokens, targets, chunk=chunk)}
        if self.cfg.model.diffusion.enabled:
            losses["val_diffusion_loss"] = tidar_losses(model, tokens, targets, chunk)[2]
        return losses

    def put(self, batch: np.ndarray) -> jax.Array:
        """This host's rows of the global batch -> one array split over the data and fsdp axes."""
        return jax.make_array_from_process_local_data(self.batch_sharding, batch)

    def evaluate(self, batches) -> dict[str, float]:
        """Mean validation losses over `batches`: "val_loss" (+ "val_diffusion_loss" for TiDAR)."""
        losses = jax.device_get([self.eval_step(self.state, self.put(b)) for b in batches])
        return {key: float(np.mean([x[key] for x in losses])) for key in losses[0]}


def continue_text(model, tokenizer, prompt: str, n_tokens: int, temperature: float, seed: int) -> str:
    """`prompt` and a sampled continuation by jaxllm.decode (KV cache, one jitted loop); past the
    context, the context shifts (`generate_long`). A prompt longer than the context keeps its end."""
    from jaxllm.decode import Sampling, generate_long

    ids = [int(i) for i in tokenizer.encode(prompt)] or [0]
    context = ids[-(model.cfg.max_seq_len - 1):]
    new = generate_long(model, [context], max_new_tokens=n_tokens, sampling=Sampling(temperature=temperature),
                        seed=seed)[0]
    return tokenizer.decode(ids + new)


def sample_from_run(run_dir: Path, prompt: str, n_tokens: int, temperature: float, seed: int) -> tuple[int, str]:
    """(step, text): a continuation of `prompt` by the model of a run directory's latest checkpoint,
    loaded alone for inference (`jaxllm.checkpoint.load_model`: no optimizer state)."""
    model, step = load_model(run_dir)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    return step, continue_text(model, tokenizer, prompt, n_tokens, temperature, seed)


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, run_class: type["Run"] | None = None, init_model=None) -> dict:
    """Train (or continue) the run in `run_dir`; returns the last metrics, with "stopped_by" (the
    signal's name) when SIGINT / SIGTERM stopped it. `stop_after` ends the process early at that
    step (after its checkpoint), as an interruption would. `run_class`: a subclass of `Run` for
    another kind of model (TRM: jaxllm.train.trm.TRMRun)."""
    if init_model is None and cfg.train.init_from is not None and run_class is None:
        from jaxllm.train.weights import load_weights

        init_model = load_weights(cfg)
    run = (run_class or Run)(cfg, Path(run_dir), resume=resume, init_model=init_model)  # (a signal while setting up exits at once: nothing to save)
    t = run.cfg.train
    last: dict = {}
    with graceful_stop() as stop:
        try:
            run.restore()
            run.open_outputs(progress)
            started = time.perf_counter()
            out_of_time = False
            while run.step < t.max_steps and not stop.signal and not out_of_time:
                grad_norm = run.train_step()
                record = run.train_record(grad_norm) if run.due(t.log_every) else {}
                if t.max_minutes is not None and run.due(t.log_every):
                    out_of_time = run.agree(time.perf_counter() - started >= 60 * t.max_minutes)
                if run.due(t.eval_every):
                    record = {**record, **run.evaluate()}
                run.write(record)
                if t.sample_every and run.step % t.sample_every == 0:
                    run.sample()
                if run.due(t.checkpoint_every) or run.step == stop_after or stop.signal or out_of_time:
                    run.save(record.get("val_loss"))
                last = {**last, **record}
                if run.step == stop_after:
                    break
            run.finish()
        finally:
            run.close()
    return {**last, "step": run.step, **({"stopped_by": stop.name} if stop.signal else {}),
            **({"stopped_by": "train.max_minutes"} if out_of_time and not stop.signal else {})}


class GracefulStop:
    """A SIGINT / SIGTERM handler for the training loop: the first asks the loop to stop after the
    current step, with a checkpoint; a second exits at once (`jaxllm.cli.exit_now`)."""

    def __init__(self):
        self.signal: int | None = None

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name

    def __call__(self, signum, frame=None) -> None:
        if self.signal is not None:
            exit_now(signum)
        self.signal = signum
        print(f"\n{self.name}: stopping after this step with a checkpoint ({self.name} again exits at once)",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def graceful_stop():
    stop = GracefulStop()
    with signal_handler(stop):
        yield stop


def stages(cfg: Config) -> list:
    """The curriculum, or one stage of the configured batch and sequence length."""
    from jaxllm.config import CurriculumStage

    t = cfg.train
    return list(t.curriculum) or [CurriculumStage(seq_len=t.seq_len or cfg.model.max_seq_len, batch_size=t.batch_size)]


@dataclasses.dataclass
class Window:
    """The steps since the last log line: their micro-batch losses (device arrays), tokens, start
    time, and any other per-step device metrics a kind of run logs (TRM: jaxllm.train.trm)."""
    losses: list = dataclasses.field(default_factory=list)
    metrics: list = dataclasses.field(default_factory=list)
    tokens: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)


class Run:
    """One training run: its config, data, sharded state and outputs, and where it stands (step,
    curriculum stage, data iterators, the window since the last log). Process 0 writes the files."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool, init_model=None):
        """Set up: check the request, take the run directory's lock, prepare it (config, tokenizer,
        tokens) and build the sharded model + optimizer state. Nothing is written before the checks
        pass; a run directory this set-up created is removed again if it fails."""
        self.run_dir = run_dir
        self.init_model = init_model  # train.init_from's weights, loaded (a resumed run reads its checkpoint instead)
        self.is_main = jax.process_index() == 0
        if resume and not committed_steps(run_dir / "checkpoints"):
            raise DataError(f"--resume: run directory {str(run_dir)!r} has no checkpoint to resume from")
        self.mesh = make_mesh(cfg.train.mesh)
        self.plan = stages(cfg)
        for stage in self.plan:
            micro = stage.batch_size // cfg.train.grad_accum
            if micro % batch_divisor(self.mesh) or micro % jax.process_count():
                raise DataError(f"train.batch_size / train.grad_accum = {micro} sequences must divide by the "
                                f"data x fsdp mesh size ({batch_divisor(self.mesh)}) and the process count "
                                f"({jax.process_count()})")
        self.check(cfg)
        self.lock = FileLock(run_dir / "train.lock")
        created = self.is_main and not run_dir.exists()  # (other hosts never remove a shared directory)
        try:
            if self.is_main:
                self._lock()
            self.cfg = self.prepare(cfg)
            self.t = self.cfg.train
            with jax.set_mesh(self.mesh):
                self.trainer = self.make_trainer()
            self.checkpointer = Checkpointer(run_dir / "checkpoints", self.t.keep_checkpoints,
                                             fallback="move {path} out of the way to resume from step {step}")
        except BaseException:
            self.lock.release()
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        self.schedule = lr_schedule(self.t)
        self.peak = peak_flops(jax.devices()[0])
        self.step, self.stage_index = 0, 0
        self.metrics, self.wandb, self.bar = None, None, None
        self.window = Window()
        self.pending_skips = None  # (step, device array [in a row, in all]) of the last step, read one step late
        self.skipped = 0

    def check(self, cfg: Config) -> None:
        """The checks of the run directory and data that read only (`check_run_dir`), and that the
        train.trainable patterns name parameters."""
        check_run_dir(cfg, self.run_dir)
        trainable_filter(abstract_model(cfg.model), cfg.train.trainable)

    def prepare(self, cfg: Config) -> Config:
        """The run directory's tokenizer and tokens (made once); returns the config with vocab_size set."""
        cfg, self.tokenizer, tokens = _prepare_on_main_first(cfg, self.run_dir, self.is_main)
        self.train_tokens, self.val_tokens = data_lib.split(tokens, cfg.train.val_fraction)
        return cfg

    def make_trainer(self) -> "Trainer":
        return Trainer(self.cfg, self.mesh, init=self.init_model)

    def describe(self) -> str:
        """What the run trains on, for its first line."""
        return f"vocab {self.cfg.model.vocab_size}, {len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens"

    def _lock(self) -> None:
        """Create the run directory and take its lock, or refuse in one line while another trainer holds it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            taken, owner = self.lock.acquire()
        except OSError as e:
            raise DataError(f"run directory {str(self.run_dir)!r} cannot be written ({e.strerror}); give a "
                            f"--run-dir in a writable directory") from None
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}"
        if not taken:
            raise TrainingError(f"run directory {str(self.run_dir)!r} is in use by another trainer ({who}); wait "
                                f"for it, stop it, or use another --run-dir")
        if owner:
            print(f"took over the lock of a trainer that is gone ({who})", file=sys.stderr)

    def restore(self) -> None:
        """Continue from the latest checkpoint, if any: its curriculum stage, model + optimizer state,
        data iterator and step. Without one, the first stage from step 0."""
        latest = self.checkpointer.latest_step()
        self._enter_stage(0 if latest is None else self.checkpointer.restore_meta(latest)["stage"])
        if latest is not None:
            self.trainer.state = self.checkpointer.restore(latest, self.trainer.state, self.data_iter)
            self.step = latest
            if self.is_main:
                print(f"resumed from {self.run_dir / 'checkpoints'} at step {self.step}")

    def open_outputs(self, progress: bool) -> None:
        """metrics.jsonl (cut back to the restored step), then config.yaml (this run's settings: a
        resume that fails before here leaves the old one), wandb and the progress bar (process 0), and
        one line about the run; the first throughput window starts here."""
        if self.is_main:
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step)
            atomic_write(self.run_dir / "config.yaml", to_yaml(self.cfg))
            self.wandb = Wandb(self.t.wandb, self.t.wandb_project, self.run_dir, to_dict(self.cfg))
            n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(self.trainer.state[0], nnx.Param)))
            print(f"{n_params / 1e6:.2f}M parameters, {self.describe()}, mesh {dict(self.mesh.shape)}, "
                  f"run dir {self.run_dir}")
        self.bar = _progress(self.step, self.t.max_steps, progress and self.is_main)
        self.window = Window()

    def due(self, every: int) -> bool:
        """Whether a job done every `every` steps (and at the last step) is due now."""
        return self.step % every == 0 or self.step == self.t.max_steps

    @staticmethod
    def agree(flag: bool) -> bool:
        """`flag` as the main process sees it, on every process (a clock-based decision must be
        the same everywhere, or the processes' collectives would part ways)."""
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))

    def train_step(self) -> jax.Array:
        """One optimizer update from train.grad_accum micro-batches; returns its gradient's norm.
        Then the checks that cost no device wait: a failed background checkpoint write, and the
        previous step's count of skipped (non-finite) updates."""
        stage = self.plan[self.stage_index]
        for _ in range(self.t.grad_accum):
            self.trainer.state, loss, grad_norm, skips = self.trainer.train_step(
                self.trainer.state, self.trainer.put(next(self.data_iter)))
            self.window.losses.append(loss)
        self.window.tokens += stage.batch_size * stage.seq_len
        self._count_step(skips)
        return grad_norm

    def _count_step(self, skips: jax.Array) -> None:
        """After an update: advance the step, then the checks that cost no device wait (a failed
        background checkpoint write, and the previous step's count of skipped updates)."""
        self.step += 1
        self.bar.update(1)
        self.checkpointer.check()
        previous, self.pending_skips = self.pending_skips, (self.step, skips)
        if previous is not None:
            self._check_skips(*previous)

    def _check_skips(self, step: int, skips: jax.Array) -> None:
        """Report updates skipped up to `step`; stop the run after train.max_nonfinite_steps in a row."""
        in_a_row, total = (int(x) for x in jax.device_get(skips))
        if total > self.skipped:
            self.say(f"step {step}: non-finite loss or gradient, update skipped ({in_a_row} in a row, {total} in all)",
                     file=sys.stderr)
            self.skipped = total
        if in_a_row >= self.t.max_nonfinite_steps:
            raise TrainingError(f"step {step}: the loss or gradient was non-finite {in_a_row} updates in a row "
                                f"(train.max_nonfinite_steps={self.t.max_nonfinite_steps}); they were skipped and the "
                                f"run stops, {self._last_checkpoint()}; lower train.lr ({self.t.lr:g}), set "
                                f"train.grad_clip, or check the data")

    def _settle_skips(self) -> None:
        """The check of the step just taken, now (before a checkpoint, and at the end)."""
        if self.pending_skips is not None:
            self._check_skips(*self.pending_skips)
            self.pending_skips = None

    def _last_checkpoint(self) -> str:
        self.checkpointer.wait()
        steps = committed_steps(self.run_dir / "checkpoints")
        return f"its last checkpoint is step {steps[-1]}" if steps else "no checkpoint was written"

    def train_record(self, grad_norm: jax.Array) -> dict:
        """The log line of the steps since the last one: mean loss (of the finite ones), lr,
        grad_norm, tokens/s, MFU, updates skipped so far."""
        self._settle_skips()  # (this waits for the step, as reading its loss does anyway)
        stage = self.plan[self.stage_index]
        losses = np.asarray(jax.device_get(self.window.losses), np.float64)
        finite = losses[np.isfinite(losses)]
        loss = float(finite.mean()) if finite.size else math.nan
        tokens_per_s = self.window.tokens / (time.perf_counter() - self.window.start)
        mfu = self.flops * tokens_per_s / (self.peak * jax.device_count()) if self.peak else None
        self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                                 f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
        self.window = Window()
        return {"step": self.step, "loss": loss, "lr": float(self.schedule(self.step - 1)),
                "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s, "mfu": mfu,
                "seq_len": stage.seq_len, "batch_size": stage.batch_size, "skipped_updates": self.skipped}

    def evaluate(self) -> dict:
        """Validation loss and perplexity; at or below the stage's until_ppl, the next curriculum stage."""
        losses = self.trainer.evaluate(self.evals)
        val_loss = losses["val_loss"]
        record = {"step": self.step, **losses, "val_ppl": math.exp(min(val_loss, 50))}
        drafter = f", drafter (diffusion) loss {losses['val_diffusion_loss']:.4f}" if "val_diffusion_loss" in losses else ""
        self.say(f"step {self.step}: val loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}{drafter}")
        threshold = self.plan[self.stage_index].until_ppl
        if threshold is not None and record["val_ppl"] <= threshold:
            self._enter_stage(self.stage_index + 1)
            s = self.plan[self.stage_index]
            self.say(f"curriculum: stage {self.stage_index} (batch {s.batch_size} x seq {s.seq_len})")
        return record

    def write(self, record: dict) -> None:
        """metrics.jsonl and wandb; loss.png after an evaluation (process 0)."""
        if record and self.is_main:
            self.metrics.log(record)
            self.wandb.log(record)
            if "val_loss" in record:
                self.metrics.plot(self.run_dir / "loss.png", title=self.run_dir.name)

    def sample(self) -> None:
        """A continuation of train.sample_prompt, printed by process 0."""
        if self.is_main:
            t = self.t
            text = continue_text(self.trainer.eval_model(self.trainer.state), self.tokenizer, t.sample_prompt,
                                 t.sample_tokens, t.sample_temperature, t.seed + self.step)
            self.say(f"--- sample at step {self.step} ---\n{text}\n---")

    def save(self, val_loss: float | None) -> None:
        """A checkpoint of this step: state, data iterator, step and stage (async). Never of a state
        with a non-finite number: that stops the run."""
        self._settle_skips()
        if not bool(self.trainer.all_finite(self.trainer.state)):
            raise TrainingError(f"step {self.step}: the model or optimizer state holds non-finite numbers (an update "
                                f"overflowed): not saved, the run stops, {self._last_checkpoint()}; lower train.lr "
                                f"({self.t.lr:g}) or set train.grad_clip")
        self.checkpointer.save(self.step, self.trainer.state, self.data_iter,
                               {"step": self.step, "stage": self.stage_index}, val_loss)

    def finish(self) -> None:
        """The last step's checks; the final loss.png."""
        self._settle_skips()
        if self.is_main and self.metrics.records:
            self.metrics.plot(self.run_dir / "loss.png", title=self.run_dir.name)

    def close(self) -> None:
        """Waits for the last checkpoint to be written; closes the bar and wandb; releases the lock."""
        try:
            if self.bar is not None:
                self.bar.close()
            self.checkpointer.close()
            if self.wandb is not None:
                self.wandb.finish()
        finally:
            self.lock.release()

    def say(self, message: str, file=None) -> None:
        """A line to stdout (or `file`) from process 0, above the progress bar."""
        if self.is_main:
            self.bar.write(message, file=file)

    def _enter_stage(self, index: int) -> None:
        """Curriculum stage `index`: its data iterator (seeded seed + index), validation batches and FLOPs."""
        stage, t = self.plan[index], self.t
        local = stage.batch_size // t.grad_accum // jax.process_count()
        hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.stage_index = index
        self.data_iter = data_lib.train_iterator(self.train_tokens, stage.seq_len, local, t.seed + index, **hosts)
        self.evals = data_lib.eval_batches(self.val_tokens, stage.seq_len, local, t.eval_batches, **hosts)
        self.flops = flops_per_token(self.cfg.model, stage.seq_len)


def _prepare_on_main_first(cfg: Config, run_dir: Path, is_main: bool):
    """Process 0 builds the tokenizer and token file; the other hosts then read them (shared disk).
    `Run` has run `check_run_dir` already."""
    if jax.process_count() == 1:
        return _prepare_checked_run_dir(cfg, run_dir)
    from jax.experimental import multihost_utils

    prepared = _prepare_checked_run_dir(cfg, run_dir) if is_main else None
    multihost_utils.sync_global_devices("jaxllm.train: run directory prepared")
    return prepared or _prepare_checked_run_dir(cfg, run_dir, is_main=False)


def _progress(initial: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="step", dynamic_ncols=True)
