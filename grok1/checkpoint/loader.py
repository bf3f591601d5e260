"""From checkpoint files to model parameters placed on devices, and back.

`load_params` is one pass in one direction:
  1. open the checkpoint's readers (`directory.open_readers`: the release's `ckpt-0/` pickles or a
     converted safetensors checkpoint, every leaf checked against the config) and read each
     matrix's format off them (`read_formats`: int8 with grouped scales, or float32);
  2. build the parameter table once (`grok1.model.param_table`: shape, dtype, logical axes);
  3. derive every leaf's sharding once from that table (`grok1.sharding.table_shardings`);
  4. check each of this host's devices can hold its share, before any weight is read;
  5. place the leaves: every (layer-stacked) parameter is built with
     `jax.make_array_from_callback`; each device's callback reads only the slice of each layer's
     leaf that the device keeps (`TensorReader.read_part` reads just those bytes), and devices
     holding the same shard share one read, so a host materialises only its own shards and never
     the whole checkpoint. Leaves are read in parallel, largest first.

Host memory. A small leaf's host slice is built whole ([L, ...] at once). A stacked leaf whose
host bytes exceed `layerwise_bytes` (256 MiB by default; Grok-1's MoE leaves are ~100 GB) is
placed one layer at a time into a pre-placed zeros array (`_build_layered`), so the host holds
about one layer's slice per worker. Both paths give identical arrays.

The release's names map to the model's parameters through `release.MODULES` / `release.GLOBALS`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import threading
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from grok1 import layers
from grok1.checkpoint import directory as checkpoint_dir
from grok1.checkpoint import release
from grok1.checkpoint.release import GLOBALS, MODULES, release_path
from grok1.checkpoint.tensors import CheckpointError, QuantizedWeight8bit
from grok1.config import ModelConfig
from grok1.model import STACK, WeightFormats, param_table
from grok1.progress import Progress
from grok1.sharding import RULES, preflight, table_shardings

BF16_NP = np.dtype(ml_dtypes.bfloat16)
LAYERWISE_BYTES = 256 << 20  # stacked leaves above this many host bytes are placed layer by layer


def dequantize_np(q: QuantizedWeight8bit) -> np.ndarray:
    """Host-side `bf16(bf16(w) * scales)` widened to float32 (exact)."""
    w = q.weight.astype(np.float32)
    *lead, n_in, n_out = w.shape
    g = q.scales.shape[-2]
    s = q.scales.astype(np.float32)[..., :, None, :]
    prod = (w.reshape(*lead, g, n_in // g, n_out) * s).astype(BF16_NP).astype(np.float32)
    return prod.reshape(w.shape)


def read_formats(config: ModelConfig, files: dict) -> WeightFormats:
    """Each matrix's format; int8 only when every layer stores it int8 with the same groups."""
    found = {}
    for suffix in release.MATRIX_SUFFIXES:
        name = MODULES[suffix][2]
        kinds = set()
        for layer in range(config.num_layers):
            tf = files[release_path(suffix, layer)]
            kinds.add(tf.scales_shape[-2] if tf.kind == "quantized" else None)
        groups = kinds.pop() if len(kinds) == 1 else None  # mixed: dequantise to float32
        found[name] = layers.MatrixFormat(groups)
    return WeightFormats(**found)


class _Cancelled(Exception):
    """Internal: another leaf failed; stop reading."""


class _LeafReader:
    """Reads slices of one model leaf ([L, ...] stacked or global) from the checkpoint files.

    `report(nbytes)` is called after each read; `stop` (a threading.Event) aborts reading.
    """

    def __init__(self, files: dict, config: ModelConfig, key: tuple, dtype, report, stop):
        module, leaf = key
        self.files, self.dtype, self.report, self.stop = files, dtype, report, stop
        self.name = f"{module}/{leaf}"
        self.part = "scales" if leaf == "scales" else "weight"
        self.paths = next((path for path, k in GLOBALS.items() if k == key), None)
        if self.paths is None:  # per-layer release paths in numeric layer order
            suffix = next(s for s, (m, n, _) in MODULES.items() if m == module and n in (leaf, "w"))
            self.paths = [release_path(suffix, i) for i in range(config.num_layers)]

    def _read_one(self, path: str, index: tuple) -> np.ndarray:
        if self.stop.is_set():
            raise _Cancelled
        tf = self.files[path]
        try:
            if tf.kind == "array":
                out = tf.read(index)
            elif self.dtype == np.float32 and self.part == "weight":
                out = dequantize_np(tf.read())[index]  # mixed formats across layers
            else:
                out = tf.read_part(self.part, index)
        except (CheckpointError, OSError) as e:
            raise CheckpointError(f"parameter {path} (model {self.name}): {e}") from None
        return out.astype(self.dtype, copy=False)

    def __call__(self, index: tuple) -> np.ndarray:
        """`leaf[index]`; a stacked leaf's layers are read one by one into one buffer."""
        if isinstance(self.paths, str):
            out = self._read_one(self.paths, index)
        else:
            rows, out = range(len(self.paths))[index[0]], None
            for k, layer in enumerate(rows):
                part = self._read_one(self.paths[layer], index[1:])
                if out is None:
                    out = np.empty((len(rows), *part.shape), part.dtype)
                out[k] = part
        self.report(out.nbytes)
        return out

    def layer(self, layer: int) -> Callable:
        """A callback reading `leaf[layer][index]`."""

        def read(index: tuple) -> np.ndarray:
            out = self._read_one(self.paths[layer], index)
            self.report(out.nbytes)
            return out

        return read


def _index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def _once_per_index(read: Callable) -> Callable:
    """JAX calls the callback once per device; devices holding the same shard share one read."""
    cache: dict = {}

    def cached(index: tuple) -> np.ndarray:
        key = _index_key(index)
        if key not in cache:
            cache[key] = read(index)
        return cache[key]

    return cached


def _slice_bytes(key: tuple, shape: tuple, itemsize: int) -> int:
    sizes = [len(range(*slice(*k).indices(n))) for k, n in zip(key, shape, strict=True)]
    return math.prod(sizes) * itemsize


def host_bytes(sharding: jax.sharding.Sharding, shape: tuple, itemsize: int) -> int:
    """Bytes this host reads for a leaf: each distinct shard of its devices, once."""
    indices = {_index_key(i) for i in sharding.addressable_devices_indices_map(shape).values()}
    return sum(_slice_bytes(key, shape, itemsize) for key in indices)


def check_fits(plans: Mapping) -> None:
    """Raises `grok1.sharding.InsufficientMemoryError` if one of this host's devices cannot hold
    its shards of every leaf ({key: (shape, dtype, sharding, ...)}); reads nothing."""
    held: collections.Counter = collections.Counter()
    for shape, np_dtype, placement, *_ in plans.values():
        for device, index in placement.addressable_devices_indices_map(shape).items():
            held[device] += _slice_bytes(_index_key(index), shape, np_dtype.itemsize)
    for device in sorted(held, key=lambda d: d.id):
        preflight(held[device], [device])


def _layer_sharding(sharding: jax.sharding.Sharding, ndim: int):
    """The sharding of one layer of a stacked [L, ...] leaf; None if L itself is split."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        if spec[0] is None:
            return jax.sharding.NamedSharding(
                sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]),
                memory_kind=sharding.memory_kind,
            )  # fmt: skip
    return None


def _set_layer(stacked: jax.Array, layer: jax.Array, index) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, index, 0)


def _build_layered(shape, dtype, sharding, layer_sharding, reader: _LeafReader) -> jax.Array:
    """A stacked leaf placed one layer at a time: each layer becomes a sharded array, then is
    written in place (donated) into a zeros array created with the target sharding. The host
    holds one layer's slices of this leaf at a time."""
    stacked = jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)()
    set_layer = jax.jit(_set_layer, donate_argnums=0, out_shardings=sharding)
    for i in range(shape[0]):
        read = _once_per_index(reader.layer(i))
        layer = jax.make_array_from_callback(shape[1:], layer_sharding, read)
        stacked = set_layer(stacked, layer, i)
        del layer, read
        stacked.block_until_ready()  # bounds the layers in flight to one
    return stacked


def _reporter(progress, total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(report(nbytes), finish()) for `progress`: None/False, True, a Progress or a callable."""
    if progress is None or progress is False:
        return (lambda n: None), (lambda: None)
    if progress is True:
        progress = Progress(total)
    if isinstance(progress, Progress):
        if progress.total is None:
            progress.total = total
        return progress.update, progress.close
    if not callable(progress):
        raise TypeError(f"progress must be a callable, a Progress or a bool, got {progress!r}")
    return progress, (lambda: None)


def load_params(
    directory: str,
    config: ModelConfig,
    *,
    dtype: str = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping = RULES,
    max_workers: int = 8,
    progress: Callable[[int], None] | Progress | bool | None = None,
    layerwise_bytes: int = LAYERWISE_BYTES,
) -> tuple[dict, WeightFormats]:
    """Reads, validates and places a checkpoint (release `ckpt-0/` or converted safetensors), in
    the steps of the module docstring.

        Args:
          directory: holds `ckpt-0/` (release) or `model.safetensors.index.json` (converted by
            `grok1.convert`).
          config: the architecture the files must match.
          dtype: activation dtype; in "bfloat16" mode the embedding is kept as bf16 (the model only
            ever uses bf16(Emb)), halving its memory.
          mesh: the mesh the leaves are split over, each by its logical axes and `rules`
            (`grok1.sharding`); None puts every leaf whole on this host's first device.
          rules: logical axis -> mesh axis (`grok1.sharding.RULES` or `EXPERT_PARALLEL_RULES`).
          max_workers: leaves read in parallel.
          progress: a callable, called with the bytes of each slice read (they sum to the bytes this
            host reads, each distinct shard once); or a `grok1.progress.Progress` (its total is set
            if unset, and it is closed at the end); or True for a fresh Progress on stderr.
          layerwise_bytes: a stacked leaf whose host bytes exceed this is placed one layer at a
            time (`_build_layered`), bounding host memory to one layer's slice per worker.
        Returns: (params, formats). Raises `CheckpointError` naming the file and the parameter on a
        missing, truncated or mismatched file, `grok1.sharding.ShardingError` on a leaf the mesh
        does not divide, and `InsufficientMemoryError` (before reading any weight) when a device
        cannot hold its share; nothing is returned then.
    """
    files = checkpoint_dir.open_readers(directory, config)
    formats = read_formats(config, files)
    table = param_table(config, formats)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = dict.fromkeys(table, device)
    else:
        shardings = table_shardings(table, config, mesh, rules)
    plans = {}
    for key, (shape, leaf_dtype, _) in table.items():
        np_dtype = BF16_NP if leaf_dtype == layers.BF16 else np.dtype(leaf_dtype)
        if key == ("grok1/embed", "embeddings") and dtype == "bfloat16":
            np_dtype = BF16_NP
        placement = shardings[key]
        plans[key] = (shape, np_dtype, placement, host_bytes(placement, shape, np_dtype.itemsize))
    check_fits(plans)
    report, finish = _reporter(progress, sum(p[3] for p in plans.values()))
    stop = threading.Event()

    def build(key):
        shape, np_dtype, sharding, nbytes = plans[key]
        reader = _LeafReader(files, config, key, np_dtype, report, stop)
        layered = _layer_sharding(sharding, len(shape)) if key[0].startswith(STACK) else None
        if layered is not None and nbytes > layerwise_bytes:
            return _build_layered(shape, np_dtype, sharding, layered, reader)
        return jax.make_array_from_callback(shape, sharding, _once_per_index(reader))

    try:
        built = _run_all(build, sorted(plans, key=lambda k: -plans[k][3]), max_workers, stop)
    finally:
        finish()
    params: dict = {}
    for module, leaf in table:
        params.setdefault(module, {})[leaf] = built[(module, leaf)]
    return params, formats


def _run_all(fn: Callable, keys: list, max_workers: int, stop: threading.Event) -> dict:
    """{key: fn(key)} on a thread pool; the first error cancels the rest and is raised."""
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        futures = {pool.submit(fn, key): key for key in keys}
        try:
            return {futures[f]: f.result() for f in concurrent.futures.as_completed(futures)}
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise


def params_to_release(params: dict, config: ModelConfig) -> dict:
    """The release leaves {path: ndarray | QuantizedWeight8bit} of a parameter tree."""
    get = lambda module, leaf: np.asarray(jax.device_get(params[module][leaf]))  # noqa: E731
    leaves = {path: get(*key).astype(np.float32) for path, key in GLOBALS.items()}
    for suffix, (module, leaf, matrix) in MODULES.items():
        stacked = get(module, leaf)
        scales = get(module, "scales") if matrix and "scales" in params[module] else None
        for layer in range(config.num_layers):
            if scales is not None:
                value = QuantizedWeight8bit(stacked[layer], scales[layer])
            else:
                value = stacked[layer].astype(np.float32)
            leaves[release_path(suffix, layer)] = value
    return leaves


def save_params(directory: str, config: ModelConfig, params: dict, num_files: int = 1) -> None:
    """Writes params as a release checkpoint (`ckpt-0/` + `config.json`); `num_files` > 1 uses
    the per-host layout (`grok1.checkpoint.release`: P files per leaf, split by columns)."""
    leaves = params_to_release(params, config)
    release.write_checkpoint(directory, config, leaves, num_files=num_files)
