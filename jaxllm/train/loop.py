"""The training loop: a run directory, a sharded jitted train step, evaluation, samples,
checkpoints and resume.

A run directory holds `config.yaml` (the resolved config, vocab_size set from the tokenizer),
`tokenizer.json`, `tokens.bin`/`tokens.json` (the corpus, tokenised once), `checkpoints/`,
`metrics.jsonl` and `loss.png`. Running again in the same directory resumes from its latest
checkpoint; a directory made by an incompatible config is refused before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import numpy as np
import optax
import yaml
from flax import nnx

from jaxllm.metrics import flops_per_token, peak_flops
from jaxllm.config import Config, to_dict, to_yaml
from jaxllm.files import atomic_write
from jaxllm.model import Transformer, cross_entropy, lm_loss
from jaxllm.model.moe import update_router_bias
from jaxllm.sharding import batch_divisor, batch_sharding, make_mesh, state_shardings
from jaxllm.train import data as data_lib
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.errors import DataError
from jaxllm.train.monitor import MetricsLog, Wandb
from jaxllm.train.optim import lr_schedule, make_optimizer
from jaxllm.train.tokenizer import build_tokenizer, load_tokenizer

# Train fields that must match to continue a run in the same directory (the model section must too).
DATA_FIELDS = ("data", "text_field", "max_corpus_bytes", "val_fraction", "tokenizer", "bpe_vocab_size", "seed")


# ---------------------------------------------------------------------------------------------
# The run directory: config, tokenizer, tokens


def _incompatibility(saved: dict, cfg: Config) -> str | None:
    new = to_dict(cfg)
    new["model"]["vocab_size"] = saved["model"]["vocab_size"]  # set from the tokenizer
    pairs = [(f"train.{k}", saved["train"].get(k), new["train"][k]) for k in DATA_FIELDS]
    pairs += [(f"model.{k}", saved["model"].get(k), v) for k, v in new["model"].items()]
    for name, old, value in pairs:
        if old != value:
            return f"{name}: {old!r} there, {value!r} now"
    return None


def prepare_run_dir(cfg: Config, run_dir: Path, is_main: bool = True):
    """Config (with vocab_size from the tokenizer), tokenizer and memory-mapped tokens of a run."""
    t = cfg.train
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text())
        if problem := _incompatibility(saved, cfg):
            raise DataError(f"run directory {str(run_dir)!r} holds a run of another config ({problem}); "
                            f"use a new --run-dir or the same config")
    data_lib.corpus_files(t.data)  # a missing data path fails before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    texts = lambda: data_lib.iter_texts(t.data, t.text_field, t.max_corpus_bytes)  # noqa: E731
    tok_path = run_dir / "tokenizer.json"
    if tok_path.exists():
        tokenizer = load_tokenizer(tok_path)
    else:
        tokenizer = build_tokenizer(t.tokenizer, texts, t.bpe_vocab_size)
        if is_main:
            tokenizer.save(tok_path)
    tokens = data_lib.load_tokens(run_dir)
    if tokens is None:
        tokens = data_lib.tokenize_corpus(texts(), tokenizer, run_dir)
    # TiDAR reserves one more id, never produced by the tokenizer, for its [MASK] token
    reserved = 1 if cfg.model.diffusion.enabled and cfg.model.diffusion.mask_token_id is None else 0
    model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size + reserved)
    cfg = dataclasses.replace(cfg, model=model)
    if is_main:
        atomic_write(saved_path, to_yaml(cfg))
    return cfg, tokenizer, tokens


# ---------------------------------------------------------------------------------------------
# Sharded state and jitted steps


class Trainer:
    """The model + optimizer state laid out over a mesh, and the jitted steps that use it."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = cfg, mesh
        tx = make_optimizer(cfg.train)

        def create():
            model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
            model.train()  # dropout / LayerDrop on; eval steps switch their copy off
            return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

        self.graphdef, abstract = nnx.split(nnx.eval_shape(create))
        self.shardings = state_shardings(abstract, mesh)
        self.batch_sharding = batch_sharding(mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # The state is created already sharded: each device builds only its own pieces.
        self.state = jax.jit(lambda: nnx.state(create()), out_shardings=self.shardings)()
        self.train_step = jax.jit(self._train_step, in_shardings=(self.shardings, self.batch_sharding),
                                  out_shardings=(self.shardings, replicated, replicated), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.shardings, self.batch_sharding),
                                 out_shardings=replicated)

    def _train_step(self, state, batch):
        model, optimizer = nnx.merge(self.graphdef, state)
        loss, grads = nnx.value_and_grad(lm_loss)(model, batch[:, :-1], batch[:, 1:])
        optimizer.update(model, grads)
        update_router_bias(model)  # DeepSeek-V3 aux-loss-free balancing; a no-op for other models
        return nnx.state((model, optimizer)), loss, optax.tree.norm(grads)

    def _eval_model(self, state):
        model, _ = nnx.merge(self.graphdef, state)
        model.eval()
        return model

    def _eval_step(self, state, batch):
        return cross_entropy(self._eval_model(state)(batch[:, :-1]), batch[:, 1:])

    def put(self, batch: np.ndarray) -> jax.Array:
        """This host's rows of the global batch -> one array split over the data and fsdp axes."""
        return jax.make_array_from_process_local_data(self.batch_sharding, batch)

    def evaluate(self, batches) -> float:
        losses = [self.eval_step(self.state, self.put(b)) for b in batches]
        return float(np.mean(jax.device_get(losses)))

    def sample(self, tokenizer, prompt: str, n_tokens: int, temperature: float, seed: int) -> str:
        """Sampled continuation of `prompt` by jaxllm.decode (KV cache, one jitted loop); past the
        context, the context shifts (`generate_long`). A prompt longer than the context keeps its end."""
        from jaxllm.decode import Sampling, generate_long

        ids = [int(i) for i in tokenizer.encode(prompt)] or [0]
        context = ids[-(self.cfg.model.max_seq_len - 1):]
        new = generate_long(self._eval_model(self.state), [context], max_new_tokens=n_tokens,
                            sampling=Sampling(temperature=temperature), seed=seed)[0]
        return tokenizer.decode(ids + new)


# ---------------------------------------------------------------------------------------------
# The loop


def stages(cfg: Config) -> list:
    """The curriculum, or one stage of the configured batch and sequence length."""
    from jaxllm.config import CurriculumStage

    t = cfg.train
    return list(t.curriculum) or [CurriculumStage(seq_len=t.seq_len or cfg.model.max_seq_len, batch_size=t.batch_size)]


def train(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train (or continue) the run in `run_dir`; returns the last metrics. `stop_after` ends the
    process early at that step (after its checkpoint), as an interruption would."""
    run_dir = Path(run_dir)
    is_main = jax.process_index() == 0
    if resume and not any((run_dir / "checkpoints").glob("[0-9]*")):
        raise DataError(f"--resume: run directory {str(run_dir)!r} has no checkpoint to resume from")
    t = cfg.train
    mesh = make_mesh(t.mesh)
    plan = stages(cfg)
    for stage in plan:
        micro = stage.batch_size // t.grad_accum
        if micro % batch_divisor(mesh) or micro % jax.process_count():
            raise DataError(f"train.batch_size / train.grad_accum = {micro} sequences must divide by the "
                            f"data x fsdp mesh size ({batch_divisor(mesh)}) and the process count "
                            f"({jax.process_count()})")
    cfg, tokenizer, tokens = _prepare_on_main_first(cfg, run_dir, is_main)
    train_tokens, val_tokens = data_lib.split(tokens, t.val_fraction)
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())

    def iterator(stage_index: int):
        stage = plan[stage_index]
        local = stage.batch_size // t.grad_accum // jax.process_count()
        return data_lib.train_iterator(train_tokens, stage.seq_len, local, t.seed + stage_index, **hosts)

    def val_batches(stage_index: int):
        stage = plan[stage_index]
        local = stage.batch_size // t.grad_accum // jax.process_count()
        return data_lib.eval_batches(val_tokens, stage.seq_len, local, t.eval_batches, **hosts)

    with jax.set_mesh(mesh):
        trainer = Trainer(cfg, mesh)
    checkpointer = Checkpointer(run_dir / "checkpoints", t.keep_checkpoints)
    step, stage_index = 0, 0
    latest = checkpointer.latest_step()
    if latest is not None:
        stage_index = checkpointer.restore_meta(latest)["stage"]
    data_iter, evals = iterator(stage_index), val_batches(stage_index)
    if latest is not None:
        trainer.state = checkpointer.restore(latest, trainer.state, data_iter)
        step = latest
        if is_main:
            print(f"resumed from {run_dir / 'checkpoints'} at step {step}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step)
    wandb = Wandb(t.wandb, t.wandb_project, run_dir, to_dict(cfg)) if is_main else None
    schedule = lr_schedule(t)
    flops = flops_per_token(cfg.model, plan[stage_index].seq_len)
    peak = peak_flops(jax.devices()[0])
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(trainer.state[0], nnx.Param)))
    if is_main:
        print(f"{n_params / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}, {len(train_tokens):,} train / "
              f"{len(val_tokens):,} val tokens, mesh {dict(mesh.shape)}, run dir {run_dir}")

    bar = _progress(step, t.max_steps, progress and is_main)
    say = bar.write if is_main else (lambda message: None)
    last: dict = {}
    window_losses, window_tokens, window_start = [], 0, time.perf_counter()
    try:
        while step < t.max_steps:
            stage = plan[stage_index]
            for _ in range(t.grad_accum):
                trainer.state, loss, grad_norm = trainer.train_step(trainer.state, trainer.put(next(data_iter)))
                window_losses.append(loss)
            window_tokens += stage.batch_size * stage.seq_len
            step += 1
            bar.update(1)
            record = {}
            if step % t.log_every == 0 or step == t.max_steps:
                loss_value = float(np.mean(jax.device_get(window_losses)))
                seconds = time.perf_counter() - window_start
                tokens_per_s = window_tokens / seconds
                mfu = flops * tokens_per_s / (peak * jax.device_count()) if peak else None
                record = {"step": step, "loss": loss_value, "lr": float(schedule(step - 1)),
                          "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s, "mfu": mfu,
                          "seq_len": stage.seq_len, "batch_size": stage.batch_size}
                bar.set_postfix_str(f"loss {loss_value:.4f} | {tokens_per_s:,.0f} tok/s | "
                                    f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
                window_losses, window_tokens, window_start = [], 0, time.perf_counter()
            val_loss = None
            if step % t.eval_every == 0 or step == t.max_steps:
                val_loss = trainer.evaluate(evals)
                record = {**record, "step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
                say(f"step {step}: val loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}")
                stage_index = _next_stage(plan, stage_index, record["val_ppl"])
                if plan[stage_index] is not stage:
                    s = plan[stage_index]
                    say(f"curriculum: stage {stage_index} (batch {s.batch_size} x seq {s.seq_len})")
                    data_iter, evals = iterator(stage_index), val_batches(stage_index)
                    flops = flops_per_token(cfg.model, s.seq_len)
            if record and is_main:
                metrics.log(record)
                wandb.log(record)
                if "val_loss" in record:
                    metrics.plot(run_dir / "loss.png", title=f"{run_dir.name}")
            if is_main and t.sample_every and step % t.sample_every == 0:
                text = trainer.sample(tokenizer, t.sample_prompt, t.sample_tokens, t.sample_temperature, t.seed + step)
                say(f"--- sample at step {step} ---\n{text}\n---")
            if step % t.checkpoint_every == 0 or step == t.max_steps or step == stop_after:
                checkpointer.save(step, trainer.state, data_iter, {"step": step, "stage": stage_index}, val_loss)
            last = {**last, **record}
            if step == stop_after:
                break
    finally:
        bar.close()
        checkpointer.close()
        if wandb is not None:
            wandb.finish()
    if is_main and metrics.records:
        metrics.plot(run_dir / "loss.png", title=f"{run_dir.name}")
    last["step"] = step
    return last


def _prepare_on_main_first(cfg: Config, run_dir: Path, is_main: bool):
    """Process 0 builds the tokenizer and token file; the other hosts then read them (shared disk)."""
    if jax.process_count() == 1:
        return prepare_run_dir(cfg, run_dir)
    from jax.experimental import multihost_utils

    prepared = prepare_run_dir(cfg, run_dir) if is_main else None
    multihost_utils.sync_global_devices("jaxllm.train: run directory prepared")
    return prepared or prepare_run_dir(cfg, run_dir, is_main=False)


def _next_stage(plan, index: int, val_ppl: float) -> int:
    threshold = plan[index].until_ppl
    return index + 1 if threshold is not None and val_ppl <= threshold else index


def _progress(initial: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="step", dynamic_ncols=True)


def load_run(run_dir: Path, step: int | None = None) -> tuple["Trainer", int]:
    """(trainer holding the restored state, step) of a run directory's checkpoint at `step`
    (default: the latest)."""
    from jaxllm.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "tokenizer.json").is_file():
        raise DataError(f"{str(run_dir)!r} is not a run directory (no config.yaml and tokenizer.json)")
    cfg = load_config(run_dir / "config.yaml")
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise DataError(f"run directory {str(run_dir)!r} has no checkpoint")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise DataError(f"run directory {str(run_dir)!r} has no checkpoint at step {step}; "
                            f"it has steps {', '.join(map(str, sorted(steps)))}")
        mesh = make_mesh("data:1", jax.devices()[:1])
        with jax.set_mesh(mesh):
            trainer = Trainer(cfg, mesh)
        trainer.state = checkpointer.restore_state(step, trainer.state)
    finally:
        checkpointer.close()
    return trainer, step


def model_from_run(run_dir: Path, step: int | None = None):
    """(the model of a run directory's checkpoint at `step` (default: the latest), in eval mode, step)."""
    trainer, step = load_run(run_dir, step)
    model, _ = nnx.merge(trainer.graphdef, trainer.state)
    model.eval()
    return model, step


def sample_from_run(run_dir: Path, prompt: str, n_tokens: int, temperature: float, seed: int) -> tuple[int, str]:
    """(step, text): a continuation of `prompt` from the latest checkpoint of a run directory."""
    trainer, step = load_run(run_dir)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    return step, trainer.sample(tokenizer, prompt, n_tokens, temperature, seed)
