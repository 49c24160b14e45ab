"""The training losses: next-token cross-entropy, TiDAR's dual-mode loss, and the auxiliary losses
(MoE balance, z-loss, ...) that layers record during the forward.

This module sits above the model (it imports `transformer` and `diffusion`; neither imports it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxllm.model.diffusion import tidar_forward
from jaxllm.model.params import pop_aux_losses
from jaxllm.model.transformer import Transformer


# Vocabularies from this size up get the chunked cross-entropy when no chunk size is given.
CHUNKED_FROM_VOCAB = 16384
DEFAULT_CHUNK = 2048  # tokens per chunk: [2048, V] float32 logits, 256 MiB at V = 32k


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over all positions (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def chunked_cross_entropy(head, x: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """`cross_entropy(head(x), targets)` for hidden states x [B, T, D], computed `chunk` tokens at a
    time so that the float32 logits [B, T, V] never exist in one piece, forward or backward: each
    chunk's logits are rematerialised in the backward (jax.checkpoint inside a scan). The same value
    and gradient up to float rounding."""
    d = x.shape[-1]
    x, targets = x.reshape(-1, d), targets.reshape(-1)
    n = targets.shape[0]
    pad = -n % chunk
    x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, 1, chunk, d)
    targets = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    weights = (jnp.arange(n + pad) < n).reshape(-1, chunk)

    @jax.checkpoint
    def chunk_loss(total, xs):
        xc, yc, wc = xs
        nll = optax.softmax_cross_entropy_with_integer_labels(head(xc)[0], yc)
        return total + jnp.sum(jnp.where(wc, nll, 0.0)), None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), (x, targets, weights))
    return total / n


def chunk_size(model: Transformer, n_tokens: int, chunk: int | None) -> int:
    """Tokens per piece of the chunked cross-entropy over `n_tokens`, 0 for one piece: `chunk`
    (0: one piece; None: DEFAULT_CHUNK when the vocabulary has at least CHUNKED_FROM_VOCAB
    entries), and one piece when all the tokens fit in a chunk."""
    if chunk is None:
        chunk = DEFAULT_CHUNK if model.cfg.vocab_size >= CHUNKED_FROM_VOCAB else 0
    return chunk if chunk and n_tokens > chunk else 0


def next_token_loss(model: Transformer, tokens: jax.Array, targets: jax.Array,
                    router_noise: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """Mean next-token cross-entropy of the model on `tokens`, chunked as `chunk_size` says."""
    chunk = chunk_size(model, tokens.size, chunk)
    if not chunk:
        return cross_entropy(model(tokens, router_noise=router_noise), targets)
    return chunked_cross_entropy(model.head, model(tokens, router_noise=router_noise, head=False), targets, chunk)


def lm_loss(model: Transformer, tokens: jax.Array, targets: jax.Array,
            router_noise: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """The training loss: next-token cross-entropy, or TiDAR's (alpha * AR + diffusion) / (1 + alpha)
    when model.diffusion is on (each chunked as `chunk_size` says), plus every auxiliary loss (MoE
    balance, z-loss...) of the forward (recorded in training mode only). `router_noise`: see
    `Transformer` (not with diffusion)."""
    if model.cfg.diffusion.enabled:
        if router_noise is not None:
            raise ValueError("router_noise is not supported with model.diffusion")
        return tidar_losses(model, tokens, targets, chunk)[0] + pop_aux_losses(model)
    return next_token_loss(model, tokens, targets, router_noise, chunk) + pop_aux_losses(model)


def tidar_losses(model, tokens: jax.Array, targets: jax.Array,
                 chunk: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(combined, AR, diffusion) losses: AR is next-token cross-entropy of the clean half on
    `targets`; diffusion is cross-entropy of each mask token on the clean token it stands for
    (unshifted labels, every token masked); combined = (alpha * AR + diffusion) / (1 + alpha).
    Each half's cross-entropy is chunked as `chunk_size` says."""
    alpha = model.cfg.diffusion.alpha
    chunk = chunk_size(model, tokens.size, chunk)
    clean, masked = tidar_forward(model, tokens, head=not chunk)
    loss = (lambda x, y: chunked_cross_entropy(model.head, x, y, chunk)) if chunk else cross_entropy  # noqa: E731
    ar, diffusion = loss(clean, targets), loss(masked, tokens)
    return (alpha * ar + diffusion) / (1 + alpha), ar, diffusion


def log_stablemax(logits: jax.Array, axis: int = -1) -> jax.Array:
    """log(s(x) / sum s(x)) with s(x) = x + 1 for x >= 0 and 1 / (1 - x) below (TRM's stablemax,
    `models/losses.py`; the official code computes it in float64, this in float32)."""
    x = logits.astype(jnp.float32)
    s = jnp.where(x >= 0, x + 1, 1 / (1 - jnp.minimum(x, 0.0)))
    return jnp.log(s) - jnp.log(jnp.sum(s, axis=axis, keepdims=True))


def trm_loss(logits: jax.Array, q_halt: jax.Array, labels: jax.Array,
             stablemax: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """TRM's loss of one supervision step (official `ACTLossHead` without the continue loss): per
    puzzle the mean cross-entropy over its cells plus 0.5 * BCE(q_halt, answer exactly correct),
    averaged over the batch. logits [B, L, V], q_halt [B], labels [B, L]. Returns (loss,
    (cross-entropy, exactly correct [B] bool))."""
    log_probs = log_stablemax(logits) if stablemax else jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0].mean(-1)  # [B]
    correct = jnp.all(jnp.argmax(logits, -1) == labels, axis=-1)
    halt = optax.sigmoid_binary_cross_entropy(q_halt, correct.astype(jnp.float32))
    return jnp.mean(ce + 0.5 * halt), (ce.mean(), correct)
