"""Checkpoints with orbax, for training and for inference.

A run's `checkpoints/<step>/` holds three items: `state`, which is `nnx.state((model, optimizer))`
(subtree 0: the model's variables: parameters, dropout RNG streams, MoE router buffers; subtree
1: the optimizer state), `data` (the grain iterator) and `meta` (step, curriculum stage).
Training writes them asynchronously and restores all three (`Checkpointer`); it keeps the last
`keep` steps plus the best by validation loss.

Inference (`load_model`) restores only subtree 0 (orbax partial restore onto the abstract model,
`nnx.eval_shape`), straight into arrays laid out over a mesh as training lays them out: about 1x
the parameter memory, no optimizer moments, no training step compiled.
"""
from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxllm.errors import ConfigError, DataError, TrainingError

MODEL, OPTIMIZER = 0, 1  # the subtrees of the saved `state`: nnx.state((model, optimizer))
ITEMS = ("state", "data", "meta")


def committed_steps(directory: Path) -> list[int]:
    """The steps orbax finished writing: `checkpoints/<step>/`. A write in progress, or one a kill
    interrupted, is `<step>.orbax-checkpoint-tmp-*` and is never a step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _reason(e: BaseException) -> str:
    """An exception as a short phrase for a one-line message: its root cause (orbax wraps
    tensorstore's), first line, without tensorstore's database path, at most 200 characters."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    first = re.sub(r' in OCDBT database at local file "[^"]*"', "", first)
    return f"{type(e).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}" if first else type(e).__name__


def _quiet_closed_loop_callbacks() -> None:
    """When a read fails, orbax closes its asyncio loop while tensorstore reads are still in
    flight; each one's callback then raises "Event loop is closed" as an unraisable exception, a
    traceback apiece on stderr around the one-line error. Drop those (and only those) from the first
    read on."""
    previous = sys.unraisablehook
    if getattr(previous, "jaxllm_quiet", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.jaxllm_quiet = True
    sys.unraisablehook = hook


class CheckpointVanished(DataError):
    """The step being read was deleted under us: a live run's keep_checkpoints policy."""


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 1, *, create: bool = True,
                 fallback: str = "load it with --step {step}"):
        """`fallback`: what a one-line read error tells the user to do to use another step."""
        self.fallback = fallback
        self.writing: int | None = None  # the step of the last save started
        keep_last_and_best = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=keep_last_and_best, create=create,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, meta: dict, val_loss: float | None = None) -> None:
        """Starts writing checkpoint `step` in the background. A failed write (a full disk, a
        read-only directory) is a TrainingError here or at the next `check`, `save` or `close`."""
        import grain

        self.check()  # the previous write's failure, named as its own
        self.writing = step
        with self._write_errors():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ), metrics=None if val_loss is None else {"val_loss": float(val_loss)}, force=True)

    def wait(self) -> None:
        """Waits for the write in progress (a TrainingError if it failed)."""
        with self._write_errors():
            self.manager.wait_until_finished()

    def check(self) -> None:
        """Raises the TrainingError of a background write that failed (cheap: called every step)."""
        with self._write_errors():
            self.manager.check_for_errors()

    @contextlib.contextmanager
    def _write_errors(self):
        try:
            yield
        except Exception as e:
            failed = self.writing
            with contextlib.suppress(Exception):  # let an earlier write in flight commit before listing
                self.manager.wait_until_finished()
            good = [s for s in committed_steps(self.directory) if s != failed]
            kept = f"checkpoint {good[-1]} is intact" if good else "no checkpoint was written before"
            raise TrainingError(f"writing checkpoint {str(self.directory / str(failed))!r} failed ({_reason(e)}); "
                                f"the run stops, {kept}") from None

    def restore_meta(self, step: int) -> dict:
        with self._read_errors(step):
            return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, step: int, target_state, data_iterator):
        """The whole saved state (model + optimizer), laid out like `target_state` (same shardings);
        the data iterator is restored in place. A checkpoint whose state has another structure (another
        train.optimizer or train.grad_accum, or an older jaxllm) is a one-line DataError."""
        import grain

        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        with self._read_errors(step, "model + optimizer state"):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ))
        return restored.state

    def restore_model(self, step: int, abstract_model_state, key: int = MODEL):
        """Only the model's variables (subtree `key` of `state`: MODEL, or a TRM run's EMA copy), read
        straight into arrays of the shapes, dtypes and shardings of `abstract_model_state`
        (jax.ShapeDtypeStruct leaves). The optimizer's arrays are never read."""
        target = {key: abstract_model_state}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        with self._read_errors(step, "model"):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
        state = restored.state[key]
        # A partial restore leaves what the checkpoint lacks as it was given: abstract.
        missing = [_dotted(path) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                   if isinstance(leaf, jax.ShapeDtypeStruct)]
        if missing:
            raise DataError(f"checkpoint {str(self.directory / str(step))!r} lacks the model's {missing[0]} "
                            f"({len(missing)} missing in all): another config or an older jaxllm wrote it")
        return state

    @contextlib.contextmanager
    def _read_errors(self, step: int, what: str = "step and stage"):
        """Any failure to read checkpoint `step` as one line: orbax's "tree structures do not match"
        (another optimizer or accumulation wrote it), a missing item, a truncated or empty file.
        With other steps on disk, it names the newest other one to fall back to."""
        path = str(self.directory / str(step))
        _quiet_closed_loop_callbacks()
        try:
            yield
        except DataError:
            raise
        except Exception as e:
            if not (self.directory / str(step)).is_dir():
                raise CheckpointVanished(f"checkpoint {path!r} was deleted while it was read (a live run's "
                                         f"train.keep_checkpoints); try again") from None
            if "do not match" in str(e):
                raise DataError(f"checkpoint {path!r} does not hold this config's {what} (another train.optimizer "
                                f"or train.grad_accum, or an older jaxllm, wrote it); continue with the settings "
                                f"that wrote it or use a new --run-dir") from None
            missing = [item for item in ITEMS if not (self.directory / str(step) / item).is_dir()]
            problem = f"it lacks {', '.join(missing)}" if missing else _reason(e)
            others = [s for s in committed_steps(self.directory) if s != step]
            hint = f"; step {others[-1]} is there too: {self.fallback.format(step=others[-1], path=path)}" if others else ""
            raise DataError(f"checkpoint {path!r} cannot be read ({problem}): corrupt or written by another "
                            f"version{hint}") from None

    def close(self) -> None:
        """Waits for the write in progress (a TrainingError if it failed)."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _dotted(path) -> str:
    """'layers.0.attn.q_proj.weight' for a jax key path into an nnx state (the Variable's `.value` dropped)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(names[:-1] if names and names[-1] == "value" else names)


# ---------------------------------------------------------------------------------------------
# Inference: the model alone


def checkpoint_step(run_dir: Path, checkpointer: Checkpointer, step: int | None) -> int:
    """`step` (default: the latest) if the run directory has a checkpoint there, else a DataError."""
    steps = sorted(checkpointer.all_steps())
    if not steps:
        raise DataError(f"run directory {str(run_dir)!r} has no checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise DataError(f"run directory {str(run_dir)!r} has no checkpoint at step {step}; "
                        f"it has steps {', '.join(map(str, steps))}")
    return step


def inference_mesh(spec: str) -> jax.sharding.Mesh:
    """The run's `train.mesh` over this machine's devices when it fits them (a -1 axis always
    does); otherwise every device on `fsdp` (parameters split over their embed dimension)."""
    from jaxllm.sharding import make_mesh

    try:
        return make_mesh(spec)
    except ConfigError:  # e.g. data:8 from an 8-GPU run, loaded on a laptop
        return make_mesh("fsdp:-1")


def load_model(run_dir: Path, step: int | None = None, mesh: jax.sharding.Mesh | None = None, *,
               announce: bool = True):
    """(model, step): the model of a training run directory's checkpoint at `step` (default: the
    latest), in eval mode, its variables laid out over `mesh` (default: `inference_mesh` of the
    run's train.mesh) by the same rules as in training. Restores the model part of the checkpoint
    only: the optimizer state is neither built nor read. A live run may delete the latest step
    while it is read (train.keep_checkpoints): then the new latest is read instead. `announce`
    prints the step used to stderr."""
    from flax import nnx

    from jaxllm.config import load_config
    from jaxllm.model.transformer import abstract_model
    from jaxllm.sharding import state_shardings

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{str(run_dir)!r} is not a run directory (no config.yaml); give a directory "
                        f"written by `jaxllm train`")
    if not (run_dir / "checkpoints").is_dir():
        raise DataError(f"run directory {str(run_dir)!r} has no checkpoint")
    cfg = load_config(run_dir / "config.yaml")
    mesh = inference_mesh(cfg.train.mesh) if mesh is None else mesh
    graphdef, abstract = nnx.split(abstract_model(cfg.model, cfg.train.seed))
    shardings = state_shardings(abstract, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    for attempt in range(3):
        checkpointer = Checkpointer(run_dir / "checkpoints", create=False)
        try:
            chosen = checkpoint_step(run_dir, checkpointer, step)
            state = checkpointer.restore_model(chosen, target)
            break
        except CheckpointVanished:
            if step is not None or attempt == 2:
                raise
        finally:
            checkpointer.close()
    if announce:
        print(f"loaded {str(run_dir / 'checkpoints' / str(chosen))!r} (step {chosen})", file=sys.stderr)
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, chosen
