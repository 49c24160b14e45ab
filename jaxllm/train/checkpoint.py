"""Checkpoints with orbax: model + optimizer state (with the dropout RNG streams), the grain data
iterator and a small JSON record (step, curriculum stage) in one step directory each, written
asynchronously. Kept: the last `keep` plus the best by validation loss."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        keep_last_and_best = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(preservation_policy=keep_last_and_best, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, meta: dict, val_loss: float | None = None) -> None:
        import grain

        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta),
        ), metrics=None if val_loss is None else {"val_loss": float(val_loss)}, force=True)

    def restore_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, step: int, target_state, data_iterator):
        """The saved state, laid out like `target_state` (same shardings); the iterator is restored in place."""
        import grain

        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return restored.state

    def restore_state(self, step: int, target_state):
        """Only the model + optimizer state (for sampling), laid out like `target_state`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
