"""The optimizer, built from optax parts: the gradient's global norm kept for the logs, global-norm
clipping, AdamW or Lion with decoupled weight decay masked off norms, biases (and embeddings unless
`decay_embeddings`), a linear-warmup + cosine-decay learning rate, and gradient accumulation with
optax.MultiSteps."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import TrainConfig


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
                                              decay_steps=t.max_steps, end_value=t.min_lr)


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: matrices, but not norms or biases (ndim < 2), and not the
    embedding tables unless asked."""

    def decays(path, x) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        is_embedding = any(n.startswith("embed_") for n in names)
        return x.ndim >= 2 and (decay_embeddings or not is_embedding)

    return jax.tree_util.tree_map_with_path(decays, params)


class GradNormState(NamedTuple):
    grad_norm: jax.Array


def record_grad_norm() -> optax.GradientTransformation:
    """Passes the gradient through and keeps its global norm in the optimizer state. Inside
    optax.MultiSteps it sees the accumulated gradient (the mean over the micro-batches) and its new
    state is kept only at the update, so the norm is that of the update's whole batch."""
    return optax.GradientTransformation(
        init=lambda params: GradNormState(jnp.zeros([], jnp.float32)),
        update=lambda updates, state, params=None: (updates, GradNormState(optax.tree.norm(updates))))


def last_grad_norm(opt_state) -> jax.Array:
    """The global norm of the last update's gradient (before clipping), from `record_grad_norm`'s state."""
    return optax.tree.get(opt_state, "grad_norm")[...]


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    schedule = lr_schedule(t)
    mask = lambda params: decay_mask(params, t.decay_embeddings)  # noqa: E731
    if t.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=mask)
    else:
        opt = optax.lion(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=mask)
    clip = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
    chain = optax.chain(record_grad_norm(), *clip, opt)
    return optax.MultiSteps(chain, every_k_schedule=t.grad_accum) if t.grad_accum > 1 else chain
