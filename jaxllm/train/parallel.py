"""Data parallelism by hand for CPU devices: each device differentiates the loss on its own rows, and
the gradients are averaged in one all-reduce of one flat vector.

The train step normally leaves the partitioning to XLA (`jax.jit` with shardings). On a
data-parallel mesh of CPU devices (`jaxllm.platform.split_cpu`: one per core), XLA's SPMD program
all-reduces the gradients as one tuple of ~40 arrays, and XLA:CPU's in-process all-reduce meets
at a rendezvous per array: 9 ms per device of a ~60 ms step of the first-run config, more than
the split saved (docs/perf.md, "One device per core"). `jax.shard_map` with one `pmean` of the raveled gradient
meets once.

Randomness: each device folds its index into the model's RNG keys, so dropout, LayerDrop and a
sampled recursion depth draw independently per device, as in PyTorch DDP (they then differ from
a one-device run's draws, as summation order already makes the numbers differ).
"""
from __future__ import annotations

import jax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P


def per_device_gradients(mesh: jax.sharding.Mesh, cfg) -> bool:
    """Whether the train step takes `value_and_grad_per_device`: CPU devices, a mesh whose only
    axis above 1 is `data`, and no mixture of experts (its balance losses and expert loads are
    statistics of the whole batch, which one device's rows would change)."""
    sizes = dict(mesh.shape)
    return (mesh.devices.flat[0].platform == "cpu" and sizes.get("data", 1) > 1
            and all(size == 1 for name, size in sizes.items() if name != "data")
            and not cfg.moe.n_routed_experts)


def value_and_grad_per_device(loss_fn, model: nnx.Module, wrt, batch: jax.Array, mesh: jax.sharding.Mesh):
    """(loss, grads) of `loss_fn(model, batch)` -> scalar mean over rows, for the whole batch
    (split over mesh axis `data`), differentiated with respect to the `wrt` variables. Each device
    runs the forward and backward on its rows; the model's other state that the forward changes
    (RNG counters) is written back into `model`."""
    graph, params, keys, rest = nnx.split(model, wrt, nnx.RngKey, ...)

    def local(params, keys, rest, rows):
        keys = jax.tree.map(lambda key: jax.random.fold_in(key, jax.lax.axis_index("data")), keys)

        def loss_of(params):
            local_model = nnx.merge(graph, params, keys, rest, copy=True)
            return loss_fn(local_model, rows), nnx.split(local_model, wrt, nnx.RngKey, ...)[3]

        (loss, new_rest), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        flat, unravel = ravel_pytree(grads)
        return jax.lax.pmean(loss, "data"), unravel(jax.lax.pmean(flat, "data")), new_rest

    loss, grads, new_rest = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P("data")),
                                          out_specs=(P(), P(), P()), check_vma=False)(params, keys, rest, batch)
    nnx.update(model, new_rest)
    return loss, grads
