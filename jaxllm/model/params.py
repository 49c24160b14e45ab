"""Parameter creation shared by every layer.

Every parameter carries `axes`: one logical axis name per dimension (`embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`, `positions`, `norm`). `jaxllm.sharding` maps those names to
mesh axes through one table; no layer ever writes a PartitionSpec.
"""
from __future__ import annotations

import fnmatch
import math

import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtypes(cfg) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype) of a ModelConfig: the one place their names become dtypes."""
    return _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]


def param(rngs: nnx.Rngs | None, shape, axes, init: str = "normal", std: float = 0.02,
          dtype=jnp.float32) -> nnx.Param:
    """A parameter of `shape` with logical `axes`; init is 'normal' (with `std`), 'zeros' or 'ones'."""
    shape = tuple(shape)
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, axes=tuple(axes))


def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a projection whose leading letters of x (those not in w, e.g.
    B and T of "BTD,DNH->BTNH") lead the output too: they are merged into one before the einsum
    and split after. The numbers are the same; the gradient of w then contracts over one
    dimension instead of two, which XLA:CPU otherwise lowers through a transposing copy with the
    activation's backward fused in and not vectorised (3-4x the step's time per MLP on the CPU;
    docs/perf.md). On GPU and TPU the reshape is free."""
    ins, out = spec.split("->")
    x_letters, w_letters = ins.split(",")
    n = 0
    while n < len(x_letters) and x_letters[n] not in w_letters and out[n:n + 1] == x_letters[n]:
        n += 1
    if n < 2:
        return jnp.einsum(spec, x, w)
    lead = x.shape[:n]
    y = jnp.einsum(f"X{x_letters[n:]},{w_letters}->X{out[n:]}", x.reshape(-1, *x.shape[n:]), w)
    return y.reshape(*lead, *y.shape[1:])


class Einsum(nnx.Module):
    """A weight of shape in_shape + out_shape (and an optional bias over out_shape) applied by an
    einsum whose letters the caller writes at the call site, e.g. `proj("BTD,DNH->BTNH", x)`."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, bias: bool, std: float,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), std=std, dtype=param_dtype)
        self.bias = param(None, out_shape, out_axes, "zeros", dtype=param_dtype) if bias else None
        self.dtype = dtype
        self.n_in = len(in_shape)  # the weight's leading input dims (its fan-in, for init schemes)
        self.lora_a = self.lora_b = None  # LoRA adapters (`apply_lora`): [in..., r] and [r, out...]
        self.lora_scale = 0.0

    def kernel(self) -> jax.Array:
        """The weight the einsum applies: W, or W + (alpha / r) A B with LoRA adapters."""
        w = self.weight[...]
        if self.lora_a is not None:
            a, b = self.lora_a[...], self.lora_b[...]
            r = a.shape[-1]
            delta = a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32)
            w = (w.astype(jnp.float32) + self.lora_scale * delta.reshape(w.shape)).astype(w.dtype)
        return w

    def __call__(self, spec: str, x: jax.Array) -> jax.Array:
        y = project(spec, x.astype(self.dtype), self.kernel().astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


RESIDUAL_OUTPUTS = ("o_proj", "down_proj")  # the projections that write into the residual stream


def apply_init_scheme(model: nnx.Module, scheme: str, n_layer: int, rngs: nnx.Rngs) -> None:
    """Redraw a freshly built model's weights by `scheme` (ModelConfig.init; 'normal' leaves them).

    'xavier_uniform': every projection weight W with fan_in (the product of its input dims) and
    fan_out becomes U(-a, a), a = sqrt(6 / (fan_in + fan_out)): each `Einsum` but the MoE routers,
    each expert's matrices (per expert: [E, in, out]) and an untied head. 'scaled' (GPT-2): the
    residual output projections (attention and MLP `o_proj` / `down_proj`, dense or experts) are
    multiplied by 1 / sqrt(2 n_layer), i.e. drawn at init_std / sqrt(2 n_layer)."""
    if scheme == "normal":
        return
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Param) or len(path) < 2 or node[...].ndim < 2:
            continue
        owner, name = path[-2], path[-1]
        parent = model
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        if isinstance(parent, Einsum):
            if owner == "router" or name != "weight":
                continue
            n_in, shape, residual = parent.n_in, node[...].shape, owner in RESIDUAL_OUTPUTS
            fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        elif type(parent).__name__ == "RoutedExperts":  # [E, in, out] per expert
            fan_in, fan_out, residual = node[...].shape[1], node[...].shape[2], name in RESIDUAL_OUTPUTS
        elif type(parent).__name__ == "LMHead":
            (fan_in, fan_out), residual = node[...].shape, False
        else:  # embeddings, norms, biases: as drawn
            continue
        value = node[...]
        if scheme == "xavier_uniform":
            a = math.sqrt(6.0 / (fan_in + fan_out))
            node[...] = jax.random.uniform(rngs.params(), value.shape, value.dtype, -a, a)
        elif residual:
            node[...] = value / math.sqrt(2 * n_layer)


def module_paths(model: nnx.Module, kind: type) -> dict[str, nnx.Module]:
    """The submodules of `kind` by dotted path, e.g. {'layers.0.attn.q_proj': Einsum, ...}."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, kind)}


def apply_lora(model: nnx.Module, lora, rngs: nnx.Rngs) -> None:
    """Give every Einsum whose path matches one of `lora.targets` (ModelConfig.lora) LoRA adapters:
    A [in..., r] drawn U(+-1/sqrt(fan_in)) (PEFT's kaiming-uniform with a = sqrt(5)), B [r, out...]
    zeros. A pattern that matches no projection is a one-line ConfigError."""
    if not lora.rank:
        return
    from jaxllm.errors import ConfigError

    einsums = module_paths(model, Einsum)
    for pattern in lora.targets:
        if not any(fnmatch.fnmatchcase(path, pattern) for path in einsums):
            shown = ", ".join(p for p in einsums if p.startswith("layers.0."))
            raise ConfigError(f"model.lora.targets pattern {pattern!r} matches no projection; projections are "
                              f"e.g. {shown}")
    for path, e in einsums.items():
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in lora.targets):
            continue
        w = e.weight
        in_shape, out_shape = w.shape[:e.n_in], w.shape[e.n_in:]
        in_axes, out_axes = w.axes[:e.n_in], w.axes[e.n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        e.lora_a = nnx.data(nnx.Param(jax.random.uniform(rngs.params(), (*in_shape, lora.rank), w.dtype, -bound, bound),
                                      axes=(*in_axes, "lora")))  # (nnx.data: the attribute was a static None)
        e.lora_b = nnx.data(nnx.Param(jnp.zeros((lora.rank, *out_shape), w.dtype), axes=("lora", *out_axes)))
        e.lora_scale = lora.alpha / lora.rank


class AuxLoss(nnx.Intermediate):
    """An auxiliary training loss a layer records during its forward (already multiplied by its
    coefficient): `self.sow(AuxLoss, "name", value)`. `lm_loss` pops and adds them all."""


def pop_aux_losses(module: nnx.Module) -> jax.Array:
    """The sum of the auxiliary losses (already weighted by their coefficients) that layers of
    `module` recorded with `self.sow(AuxLoss, ...)` during the last forward, removed from it."""
    losses = jax.tree.leaves(nnx.pop(module, AuxLoss))
    return sum(losses, jnp.zeros((), jnp.float32))


class Buffer(nnx.Variable):
    """Persistent state that is saved and converted with the parameters but not trained by the
    optimiser (which updates `nnx.Param` only), like a torch buffer: e.g. the V3 router bias."""
