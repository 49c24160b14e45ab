"""Device meshes and the one table that maps logical parameter axes to mesh axes.

Every parameter carries `axes` metadata (logical names such as `embed`, `heads`, `mlp`); `RULES`
below is the only place that decides which mesh axis each name is split over. Layers never write
a PartitionSpec. Mesh axes:

- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters and optimizer state split over the `embed` dimension;
- `tensor`: Megatron-style splitting of heads, MLP width and vocabulary;
- `expert`: MoE experts split over devices.

The batch is split over `data` and `fsdp`. A spec like `data:2,fsdp:-1,tensor:1,expert:1` builds
the mesh; -1 takes the devices the other axes leave.
"""
from __future__ import annotations

import math
import os

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxllm.config import MESH_AXES, mesh_axes
from jaxllm.errors import ConfigError

BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (None: replicated). Names a table does not list are replicated.
RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "experts": "expert",
    "head_dim": None,
    "positions": None,
    "norm": None,
    "latent": None,
    "lora": None,  # a LoRA adapter's rank
    "inject": None,  # recursion: the [state, input] width of the concat adapter, the index of the states
}


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """'data:2,fsdp:-1' -> {'data': 2, 'fsdp': n/2, 'tensor': 1, 'expert': 1}. The syntax was checked
    when the config loaded (`config.mesh_axes`); this adds the device arithmetic."""
    sizes = mesh_axes(spec)
    free = [name for name, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n_devices % fixed:
            raise ConfigError(f"train.mesh={spec!r}: {n_devices} devices do not divide by {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"train.mesh={spec!r}: uses {math.prod(sizes.values())} devices but there are "
                          f"{n_devices}; make the sizes multiply to {n_devices} or use -1 on one axis")
    return sizes


def make_mesh(spec: str, devices=None) -> jax.sharding.Mesh:
    """A mesh with Auto axes (XLA propagates shardings from the annotated parameters and batch)."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(axes, shape, mesh: jax.sharding.Mesh, rules=RULES) -> P:
    """A PartitionSpec for a value with logical `axes`: each dimension goes to its rule's mesh axis
    when that axis is not used yet and divides the dimension; otherwise it is replicated."""
    if axes is None:
        return P()
    used, spec = set(), []
    for name, dim in zip(axes, shape):
        mesh_axis = rules.get(name)
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            used.add(mesh_axis)
            spec.append(mesh_axis if mesh.shape[mesh_axis] > 1 else None)
    return P(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=RULES):
    """NamedShardings for an nnx state (model, optimizer, RNG...), same tree: variables with
    `axes` metadata follow the rules (optimizer moments inherit their parameter's axes); anything
    else is replicated."""

    def one(x):
        if isinstance(x, nnx.Variable):
            spec = logical_to_spec(x.get_metadata().get("axes"), x.shape, mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build_state(create, abstract, shardings, mesh: jax.sharding.Mesh, eager: bool | None = None):
    """nnx.state(create()) laid out by `shardings` (`abstract`: its shapes, from nnx.eval_shape).

    `eager` (default: one process, and `fits_one_device`): run `create` eagerly on the mesh's first
    device, then place a copy of the state (every leaf its own buffer, as the train step's donation
    needs). Each parameter's random draw is then a small program cached by shape, so start-up
    compiles a handful of them. Otherwise: one program jitted with `out_shardings`, which builds on
    each device only its own pieces (what a state too large for one device needs) but compiles every
    parameter's draw as kernels of its own: on an H200 that took 2.5-3.6 minutes for llama-374m's 24
    layers, ~130 kernels a layer (docs/perf.md, "GPU start-up")."""
    device = mesh.devices.flat[0]
    if eager is None:  # device_put cannot place onto other processes' devices
        eager = not mesh.is_multi_process and fits_one_device(abstract, device)
    if eager:
        with jax.default_device(device):
            # fresh buffers: leaves that share one (an EMA clone's weights) must not be donated twice
            return jax.device_put(nnx.state(create()), shardings, may_alias=False)
    return jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()


def fits_one_device(abstract, device) -> bool:
    """Whether a state of these shapes takes at most a quarter of the device's memory (a CPU, which
    reports no limit, always holds it)."""
    nbytes = sum(x.size * getattr(x.dtype, "itemsize", 8) for x in jax.tree.leaves(abstract))
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return limit is None or nbytes <= limit / 4


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Call jax.distributed.initialize when launched as one process of several: explicit
    coordinator flags, SLURM with more than one task, or a multi-host TPU pod. Returns whether it did."""
    if coordinator is not None:
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if slurm or tpu_pod:  # jax reads the cluster's environment itself
        jax.distributed.initialize()
        return True
    return False
