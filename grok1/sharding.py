"""Meshes, the one table from logical axes to mesh axes, and the memory each device can hold.

Every parameter leaf names its dimensions with logical axes (`grok1.model.param_table`), and so do
the KV cache (`grok1.cache`) and the main activations. `RULES` maps each logical axis to a mesh
axis (or None, replicated); `table_shardings` turns a table of leaves into their shardings, and is
where a model axis larger than the KV heads makes them whole on every device. A leaf with an axis
missing from the table, or a dimension that its mesh axis does not divide, is an error raised
before anything is compiled. `preflight` compares bytes per device with each device's memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grok1.config import ModelConfig

AXES = ("data", "model")

# logical axis -> mesh axis. Experts are split along F (every expert on every device): lowest
# latency at decode. Attention heads and the vocabulary are split over "model".
RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "norm": None,
    "layers": None,
    "q_heads": "model",
    "kv_heads": "model",
    "experts": None,
    "expert_router": None,
    "ffn": "model",
    "groups": None,
    "cache_seq": None,
    "head_dim": None,
}


# Expert parallelism (`grok1.load(..., expert_parallel=True)`): whole experts, split along E over
# "model"; each device runs its own experts for every token (higher throughput at large batches,
# an all-reduce of the MoE output instead of reading a slice of every selected expert).
EXPERT_PARALLEL_RULES: Mapping[str, str | None] = {**RULES, "experts": "model", "ffn": None}


class ShardingError(ValueError):
    pass


def parse_mesh(text: str) -> dict[str, int]:
    """Axis sizes from the command-line form "data=1,model=8" ({"data": 1, "model": 8}).

    Every part is AXIS=SIZE with AXIS one of `AXES`, each axis at most once, SIZE an integer >= 1
    or -1 ("the rest of the devices"). An axis left out also means the rest (`mesh_sizes`).
    """
    form = f"expected AXIS=SIZE[,AXIS=SIZE] with AXIS in {'/'.join(AXES)}, e.g. data=1,model=8"
    if not isinstance(text, str) or not text.strip():
        raise ShardingError(f"mesh {text!r}: empty; {form}")
    out: dict[str, int] = {}
    for part in text.split(","):
        axis, sep, size = (s.strip() for s in part.partition("="))
        if not sep or not axis:
            raise ShardingError(f"mesh {text!r}: {part.strip()!r} is not AXIS=SIZE; {form}")
        if axis in out:
            raise ShardingError(f"mesh {text!r}: axis {axis!r} is given twice")
        try:
            value = int(size)
        except ValueError:
            raise ShardingError(
                f"mesh {text!r}: size {size!r} of axis {axis!r} is not an integer"
            ) from None
        out[axis] = value
    return _checked(out, f"mesh {text!r}")


def _checked(spec: Mapping, what: str) -> dict[str, int]:
    """`spec` as {axis: int}, after checking its axes and sizes."""
    unknown = sorted(set(spec) - set(AXES), key=str)
    if unknown:
        raise ShardingError(f"{what}: unknown axes {unknown}; the axes are {', '.join(AXES)}")
    out = {}
    for axis, size in spec.items():
        if not isinstance(size, int | np.integer) or isinstance(size, bool):
            raise ShardingError(f"{what}: size of axis {axis!r} must be an int, got {size!r}")
        if size < 1 and size != -1:
            raise ShardingError(
                f"{what}: size of axis {axis!r} must be >= 1 (or -1 for the rest of the "
                f"devices), got {size}"
            )
        out[axis] = int(size)
    return out


def mesh_sizes(spec: Mapping | None, num_devices: int) -> dict[str, int]:
    """{axis: size} for every axis of `AXES`, with the one axis left out or given as -1 filled
    with the devices the others leave. None or {} puts every device on "model".

    Checks the axes and sizes and that the filled axis gets a whole number of devices; whether
    the mesh fits the devices is `make_mesh`'s question (the dry run plans larger meshes).
    """
    spec = _checked(spec or {"data": 1}, f"mesh {dict(spec or {})}")
    sizes = {axis: spec.get(axis, -1) for axis in AXES}
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ShardingError(
            f"mesh {spec}: give the size of all axes but one ({', '.join(rest)} are all left "
            f"to the rest of the devices)"
        )
    if rest:
        known = math.prod(s for s in sizes.values() if s != -1)
        if num_devices % known or num_devices < known:
            raise ShardingError(
                f"mesh {spec}: the {num_devices} devices do not split into {known} x N for axis "
                f"{rest[0]!r}; give every axis's size, or a mesh whose sizes divide {num_devices}"
            )
        sizes[rest[0]] = num_devices // known
    return sizes


def make_mesh(spec=None, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh.

    spec: a Mesh (returned as is), a dict such as {"data": 1, "model": 8} (a missing axis gets
    the remaining devices; -1 also means "the rest"), its command-line form "data=1,model=8"
    (`parse_mesh`), or None (all devices on "model").
    """
    if isinstance(spec, Mesh):
        return spec
    if isinstance(spec, str):
        spec = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(spec, len(devices))
    total = math.prod(sizes.values())
    if total > len(devices):
        raise ShardingError(
            f"mesh {sizes} needs {total} devices but only {len(devices)} are available; give "
            f"a mesh of at most {len(devices)} devices"
        )
    grid = np.array(devices[:total], dtype=object).reshape([sizes[a] for a in AXES])
    return Mesh(grid, AXES)


def spec_for(
    axes: Sequence[str], shape: Sequence[int], mesh: Mesh, what: str, rules: Mapping = RULES
) -> PartitionSpec:
    """PartitionSpec of a leaf from its logical axes (mapped by `rules`; an axis given as None is
    kept whole), checking divisibility."""
    if len(axes) != len(shape):
        raise ShardingError(f"{what}: {len(axes)} logical axes for shape {tuple(shape)}")
    parts = []
    for axis, dim in zip(axes, shape, strict=True):
        if axis is None:
            parts.append(None)
            continue
        if axis not in rules:
            raise ShardingError(f"{what}: no sharding rule for logical axis {axis!r}")
        mesh_axis = rules[axis]
        if mesh_axis is not None and mesh.shape[mesh_axis] == 1:
            mesh_axis = None
        if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
            raise ShardingError(
                f"{what}: dimension {axis!r} of size {dim} is not divisible by mesh axis "
                f"{mesh_axis!r} of size {mesh.shape[mesh_axis]} (shape {tuple(shape)})"
            )
        parts.append(mesh_axis)
    return PartitionSpec(*parts)


def named(axes, shape, mesh: Mesh, what: str) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, shape, mesh, what))


def check_mesh(config: ModelConfig, mesh: Mesh, expert_parallel: bool = False) -> None:
    """Errors for meshes the model cannot use, with what to do instead."""
    model = mesh.shape["model"]
    if expert_parallel and config.num_experts % model:
        raise ShardingError(
            f"expert parallelism splits the {config.num_experts} experts over the mesh's model "
            f"axis ({model}), which does not divide them"
        )
    if config.num_q_heads % model:
        raise ShardingError(
            f"the mesh's model axis ({model}) does not divide the {config.num_q_heads} query "
            f"heads; choose a model axis among the divisors of {config.num_q_heads}"
        )
    kv = config.num_kv_heads
    if kv % model and model % kv:
        raise ShardingError(
            f"the mesh's model axis ({model}) neither divides nor is a multiple of the {kv} KV "
            f"heads"
        )


def kv_replication(config: ModelConfig, mesh: Mesh) -> int:
    """How many copies of each KV head a model axis larger than the KV heads needs."""
    model = mesh.shape["model"]
    return model // config.num_kv_heads if model > config.num_kv_heads else 1


def table_shardings(
    table: Mapping, config: ModelConfig, mesh: Mesh, rules: Mapping = RULES
) -> dict:
    """{key: NamedSharding} for a {key: (shape, dtype, logical axes)} table (parameters or the KV
    cache) on `mesh`, each axis placed by `rules`.

    Where the model axis exceeds the KV heads (`kv_replication`), "kv_heads" is kept whole on
    every device.
    """
    whole = ("kv_heads",) if kv_replication(config, mesh) > 1 else ()
    out = {}
    for key, (shape, _, axes) in table.items():
        axes = [None if a in whole else a for a in axes]
        what = key if isinstance(key, str) else "/".join(key)
        out[key] = NamedSharding(mesh, spec_for(axes, shape, mesh, what, rules))
    return out


# -- memory per device ------------------------------------------------------------------------
GB = 1e9


class InsufficientMemoryError(MemoryError):
    pass


def device_memory_limit(device) -> int | None:
    """Bytes a device can hold (`memory_stats()["bytes_limit"]`), None where unknown (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def preflight(needed_bytes_per_device: int, devices: Sequence | None = None) -> None:
    """Raises InsufficientMemoryError if some device cannot hold `needed_bytes_per_device`.

    Devices that report no limit (the CPU) are skipped. Pass this process's devices only: the
    runtime answers memory questions for addressable devices alone.
    """
    devices = list(jax.devices() if devices is None else devices)
    for d in devices:
        limit = device_memory_limit(d)
        if limit is None:
            continue
        if needed_bytes_per_device > limit:
            raise InsufficientMemoryError(
                f"needs {needed_bytes_per_device / GB:.3g} GB per device, this mesh has "
                f"{limit / GB:.3g} GB ({d.device_kind} {d.id}); use a larger model axis, a "
                f"smaller batch or context, or devices with more memory"
            )
