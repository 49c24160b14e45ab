"""The parity harness: one set of random weights in jaxllm and torch_ref, compared number for number.

Contract (DESIGN.md): float32 on CPU, sequences >= 256 tokens, weights drawn with std 0.1-0.3 so
logits are not tiny; logits max|jax - torch| / max|torch| <= 1e-4, per-token KL <= 1e-6, and the
gradient of the loss on every parameter <= 1e-4 relative (max abs difference / max abs value).

The loss is compared as training computes it, in training mode: only a training forward records
the MoE aux losses. The noisy router's training noise is drawn once per pair (`Pair.router_noise`)
and fed to both sides.
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
from jaxllm.model.moe import pop_expert_load
from jaxllm.model.params import pop_aux_losses
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
    router_noise: np.ndarray | None = None  # [B, SEQ, E] the noisy router's training noise, both sides

    def train(self, training: bool = True) -> None:
        """Both models in training (or eval) mode."""
        if training:
            self.jax_model.train()
        else:
            self.jax_model.eval()
        self.torch_model.train(training)


def make_pair(cfg: Config, seed: int = 0, batch: int = 2, seq: int = SEQ) -> Pair:
    jax_model = Transformer(cfg.model, rngs=nnx.Rngs(seed))
    randomize(jax_model, seed)
    torch_model = TorchTransformer(to_dict(cfg.model))
    torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in to_state_dict(jax_model).items()})
    jax_model.eval()
    torch_model.eval()
    tokens = np.random.default_rng(seed + 1).integers(0, cfg.model.vocab_size, (batch, seq + 1))
    moe = cfg.model.moe
    noise = (np.random.default_rng(seed + 2).standard_normal((batch, seq, moe.n_routed_experts)).astype(np.float32)
             if moe.n_routed_experts and moe.router == "noisy" else None)
    return Pair(cfg, jax_model, torch_model, tokens, noise)


def training_draws(cfg: Config) -> bool:
    """Whether a training forward draws random numbers the harness cannot feed to both sides."""
    m = cfg.model
    return bool(m.dropout or m.attention.dropout or m.mlp.dropout or m.layerdrop or m.recursion.random_loops)


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


@nnx.jit
def _jax_logits(model, inputs, noise):
    logits = model(inputs, router_noise=noise)
    pop_aux_losses(model)  # what a training-mode forward recorded; the loss forward records its own
    pop_expert_load(model)
    return logits


@nnx.jit
def _jax_loss_and_grads(model, inputs, targets, noise):
    return nnx.value_and_grad(lm_loss)(model, inputs, targets, noise)


def compare(pair: Pair, train: bool | None = None) -> Report:
    """The logits in the pair's mode (eval unless a test switched both models), then the full loss
    (aux losses included) and its gradients in training mode, or with train=False in the pair's
    mode; train=None: training mode unless the config's training forward draws random numbers
    (dropout, LayerDrop, random loop counts). The loss forward's expert loads stay in the jax model
    (`pop_expert_load`), as torch_ref's stay in its MoE layers."""
    inputs, targets = pair.tokens[:, :-1], pair.tokens[:, 1:]
    noise_j, noise_t = (None, None) if pair.router_noise is None else (
        jnp.asarray(pair.router_noise), torch.from_numpy(pair.router_noise))
    logits_j = np.asarray(_jax_logits(pair.jax_model, jnp.asarray(inputs), noise_j), np.float64)
    logits_t = pair.torch_model(torch.from_numpy(inputs), router_noise=noise_t).detach().double().numpy()

    was_training = pair.torch_model.training
    if train is None:
        train = not training_draws(pair.cfg)
    pair.train(train or was_training)
    loss_j, grads_j = _jax_loss_and_grads(pair.jax_model, jnp.asarray(inputs), jnp.asarray(targets), noise_j)
    pair.torch_model.zero_grad()
    loss_t = pair.torch_model.loss(torch.from_numpy(inputs), torch.from_numpy(targets), router_noise=noise_t)
    loss_t.backward()
    pair.train(was_training)
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
