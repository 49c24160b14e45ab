"""The optimizer, built from optax parts: the gradient's global norm kept for the logs, global-norm
clipping, AdamW or Lion with decoupled weight decay masked off norms, biases (and embeddings unless
`decay_embeddings`), a linear-warmup + cosine-decay learning rate, gradient accumulation with
optax.MultiSteps, and optax.apply_if_finite around it all: an update from a non-finite gradient is
skipped (parameters and moments untouched) and counted in the optimizer state, inside the jitted
step. The training loop stops the run after train.max_nonfinite_steps of them in a row."""
from __future__ import annotations

import fnmatch
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import TrainConfig
from jaxllm.errors import ConfigError


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


def poison_unless_finite(loss: jax.Array, grads):
    """`grads`, or NaN everywhere when `loss` is not finite: a non-finite loss with a finite gradient
    (which the chain rule makes all but impossible) is skipped like a non-finite gradient."""
    return jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)


def nonfinite_counts(opt_state) -> jax.Array:
    """[updates skipped in a row, updates skipped in all] (int32), from apply_if_finite's state."""
    return jnp.stack([optax.tree.get(opt_state, "notfinite_count")[...],
                      optax.tree.get(opt_state, "total_notfinite")[...]])


def update_applied(opt_state) -> jax.Array:
    """Whether the last update was applied (False: skipped as non-finite)."""
    return optax.tree.get(opt_state, "last_finite")[...]


def param_path(path) -> str:
    """A parameter's dotted path, e.g. 'layers.0.mlp.down_proj.weight' (what train.trainable matches)."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def matches(pattern: str, path: str) -> bool:
    """A train.trainable pattern matches a path by glob, or as a prefix of whole names ('lm_head'
    matches 'lm_head.weight'; 'layers.1' matches everything of layer 1)."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + ".*")


LORA_PARAMS = ("*.lora_a", "*.lora_b")


def trainable_filter(model, patterns: tuple[str, ...] | None):
    """The nnx filter of the parameters that train: those `patterns` match; with None, all of them,
    or a model with LoRA adapters (model.lora.rank > 0) its adapters alone. It is the optimizer's
    `wrt` and the gradient's `DiffState`. A pattern that matches no parameter is a one-line
    ConfigError."""
    from flax import nnx

    if patterns is None and model.cfg.lora.rank:
        patterns = LORA_PARAMS
    if patterns is None:
        return nnx.Param
    paths = [param_path(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for pattern in patterns:
        if not any(matches(pattern, p) for p in paths):
            firsts = {}  # one example per top-level name: embed_tokens.weight, layers.0.attn..., ...
            for path in paths:
                firsts.setdefault(path.split(".")[0], path)
            shown = ", ".join(list(firsts.values())[:5])
            raise ConfigError(f"train.trainable pattern {pattern!r} matches no parameter; parameter paths look "
                              f"like {shown}, ... (globs over dotted paths, e.g. 'layers.*.mlp.*')")
    return nnx.All(nnx.Param, lambda path, _: any(matches(p, param_path(path)) for p in patterns))


class LossScaleState(NamedTuple):
    loss_scale: jax.Array
    counter: jax.Array


def loss_scaling(kind: float | str) -> optax.GradientTransformation:
    """Unscale the gradient of a loss that was multiplied by `loss_scale(opt_state)` (jmp's
    Static/DynamicLossScale), and with 'dynamic' adjust the scale: halved after a non-finite
    gradient (which apply_if_finite then skips), doubled after 2000 finite ones in a row."""
    import jmp

    dynamic = kind == "dynamic"
    initial = 2.0 ** 15 if dynamic else float(kind)

    def scaler(state: LossScaleState):
        if dynamic:
            return jmp.DynamicLossScale(state.loss_scale, state.counter)
        return jmp.StaticLossScale(state.loss_scale)

    def init(params):
        return LossScaleState(jnp.asarray(initial, jnp.float32), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        s = scaler(state)
        grads = s.unscale(updates)
        if not dynamic:
            return grads, state
        adjusted = s.adjust(jmp.all_finite(grads))
        return grads, LossScaleState(adjusted.loss_scale, adjusted.counter)

    return optax.GradientTransformation(init, update)


def loss_scale(opt_state) -> jax.Array:
    """The current loss scale (1 without train.loss_scale): multiply the loss by it before the backward pass."""
    found = optax.tree.get(opt_state, "loss_scale", default=None)
    return jnp.ones([], jnp.float32) if found is None else found[...]


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    schedule = lr_schedule(t)
    mask = lambda params: decay_mask(params, t.decay_embeddings)  # noqa: E731
    if t.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=mask)
    else:
        opt = optax.lion(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=mask)
    clip = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
    chain = optax.chain(record_grad_norm(), *clip, opt)
    if t.grad_accum > 1:
        chain = optax.MultiSteps(chain, every_k_schedule=t.grad_accum)
    # Never "give up and apply" (apply_if_finite's own limit): the loop stops the run instead.
    guarded = optax.apply_if_finite(chain, max_consecutive_errors=int(jnp.iinfo(jnp.int32).max))
    # the scale sits outside the guard: a non-finite gradient must still lower a dynamic scale
    return guarded if t.loss_scale is None else optax.chain(loss_scaling(t.loss_scale), guarded)
