"""The parity harness: one set of random weights in jaxllm and torch_ref, compared number for number.

Contract (DESIGN.md): float32 on CPU, sequences >= 256 tokens, weights drawn with std 0.1-0.3 so
logits are not tiny; logits max|jax - torch| / max|torch| <= 1e-4, per-token KL <= 1e-6, and the
gradient of the loss on every parameter <= 1e-4 relative (max abs difference / max abs value).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxllm.config import Config, config_from_dict, to_dict
from jaxllm.convert import from_state_dict, to_state_dict
from jaxllm.model import Transformer, lm_loss
from jaxllm.model.transformer import pop_aux_losses
from torch_ref.model import Transformer as TorchTransformer

LOGITS_TOL = 1e-4
KL_TOL = 1e-6
GRAD_TOL = 1e-4
SEQ = 256
ZERO_GRAD = 1e-6  # a gradient this small against the largest one is float32 noise around 0

torch.set_num_threads(2)


def tiny_config(overrides: dict | None = None, **model) -> Config:
    """A small model (width 64, 2 layers, 4 heads, vocab 128, context 320) with `model` fields set."""
    base = dict(vocab_size=128, d_model=64, n_layer=2, max_seq_len=320, attention=dict(n_head=4))
    for key, value in model.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return config_from_dict({"model": base}, [f"{k}={v}" for k, v in (overrides or {}).items()])


def randomize(model: Transformer, seed: int) -> None:
    """Redraw every parameter: std 0.1-0.3 per tensor; norm weights 1 + N(0, 0.2); ReZero alphas
    in [0.5, 1] so the residual branches matter."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * rng.standard_normal(var.shape)
        elif name.endswith("rezero_alpha"):
            value = rng.uniform(0.5, 1.0, var.shape)
        else:
            value = rng.uniform(0.1, 0.3) * rng.standard_normal(var.shape)
        var[...] = jnp.asarray(value, jnp.float32)


@dataclasses.dataclass
class Pair:
    cfg: Config
    jax_model: Transformer
    torch_model: TorchTransformer
    tokens: np.ndarray  # [B, SEQ + 1]


def make_pair(cfg: Config, seed: int = 0, batch: int = 2, seq: int = SEQ) -> Pair:
    jax_model = Transformer(cfg.model, rngs=nnx.Rngs(seed))
    randomize(jax_model, seed)
    torch_model = TorchTransformer(to_dict(cfg.model))
    torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in to_state_dict(jax_model).items()})
    jax_model.eval()
    torch_model.eval()
    tokens = np.random.default_rng(seed + 1).integers(0, cfg.model.vocab_size, (batch, seq + 1))
    return Pair(cfg, jax_model, torch_model, tokens)


@dataclasses.dataclass
class Report:
    logits_rel: float
    kl_max: float
    loss_rel: float  # the full loss, auxiliary losses included
    grad_rel: dict[str, float]

    def worst_grad(self) -> tuple[str, float]:
        return max(self.grad_rel.items(), key=lambda kv: kv[1])

    def ok(self) -> bool:
        return (self.logits_rel <= LOGITS_TOL and self.kl_max <= KL_TOL and self.loss_rel <= LOGITS_TOL
                and self.worst_grad()[1] <= GRAD_TOL)

    def __str__(self) -> str:
        name, worst = self.worst_grad()
        return f"logits rel {self.logits_rel:.2e}, max KL {self.kl_max:.2e}, loss rel {self.loss_rel:.2e}, worst grad rel {worst:.2e} ({name})"


def kl_per_token(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per position, in float64."""
    p_log = p_logits - _logsumexp(p_logits)
    q_log = q_logits - _logsumexp(q_logits)
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _jax_forward_and_grads(model, inputs, targets):
    @nnx.jit
    def run(model, inputs, targets):
        logits = model(inputs)
        pop_aux_losses(model)  # this forward's aux losses; lm_loss records its own
        loss, grads = nnx.value_and_grad(lm_loss)(model, inputs, targets)
        return logits, loss, grads

    return run(model, inputs, targets)


def compare(pair: Pair) -> Report:
    inputs, targets = pair.tokens[:, :-1], pair.tokens[:, 1:]
    logits_j, loss_j, grads_j = _jax_forward_and_grads(pair.jax_model, jnp.asarray(inputs), jnp.asarray(targets))
    logits_j = np.asarray(logits_j, np.float64)

    pair.torch_model.zero_grad()
    logits_t = pair.torch_model(torch.from_numpy(inputs)).detach().double().numpy()
    loss_t = pair.torch_model.loss(torch.from_numpy(inputs), torch.from_numpy(targets))
    loss_t.backward()
    loss_rel = abs(float(loss_j) - loss_t.item()) / abs(loss_t.item())

    logits_rel = float(np.abs(logits_j - logits_t).max() / np.abs(logits_t).max())
    kl_max = float(kl_per_token(logits_t, logits_j).max())
    grads_j = to_state_dict(grads_j)  # torch layout, same keys
    grads_t = {name: (torch.zeros_like(p) if p.grad is None else p.grad).double().numpy()  # None: unused
               for name, p in pair.torch_model.named_parameters()}
    global_scale = max(np.abs(g).max() for g in grads_t.values())
    grad_rel = {}
    for name, g_t in grads_t.items():
        g_j = grads_j[name]
        scale = np.abs(g_t).max()
        if scale <= ZERO_GRAD * global_scale:
            # Zero in exact arithmetic, float32 noise here: the k_proj bias (softmax ignores the
            # shift q.b common to all of a query's scores), q/k with a window of 1 (softmax over one
            # key). No relative error exists; both sides must be ~0 on the scale of the gradient.
            grad_rel[name] = float(max(np.abs(g_j).max(), scale) / global_scale)
        else:
            grad_rel[name] = float(np.abs(g_j - g_t).max() / scale)
    assert set(grad_rel) == set(grads_j), set(grad_rel) ^ set(grads_j)
    return Report(logits_rel, kl_max, loss_rel, grad_rel)
