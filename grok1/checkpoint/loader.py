"""From release files to model parameters, and back.

`load_params` validates a release checkpoint against the config, then builds every (layer-stacked)
parameter with `jax.make_array_from_callback`: each device's callback reads only the slice of
each layer's file that the device keeps (`TensorFile.read_*` seeks to the bytes it needs), so a
host materialises only its own shards and never the whole checkpoint. Leaves are read in parallel.

The table `MODULES` maps a release leaf suffix (SPEC.md §3) to the model's parameter
(`grok1.model.param_table`); nothing else in the package knows the release's names.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np

from grok1 import layers
from grok1.checkpoint import release
from grok1.config import ModelConfig
from grok1.model import ATTN, MOE, STACK, WeightFormats, param_table

BF16_NP = np.dtype(ml_dtypes.bfloat16)

# release suffix -> (module, leaf name, matrix name or None)
MODULES = {
    "moe/linear/w": (f"{MOE}/gate", "w", "gate"),
    "moe/linear_1/w": (f"{MOE}/down", "w", "down"),
    "moe/linear_v/w": (f"{MOE}/up", "w", "up"),
    "multi_head_attention/key/w": (f"{ATTN}/key", "w", "key"),
    "multi_head_attention/linear/w": (f"{ATTN}/linear", "w", "linear"),
    "multi_head_attention/query/w": (f"{ATTN}/query", "w", "query"),
    "multi_head_attention/value/w": (f"{ATTN}/value", "w", "value"),
    "rms_norm/scale": (f"{STACK}/decoder_layer/attn_norm", "scale", None),
    "rms_norm_1/scale": (f"{STACK}/decoder_layer/attn_out_norm", "scale", None),
    "rms_norm_2/scale": (f"{STACK}/decoder_layer/moe_norm", "scale", None),
    "rms_norm_3/scale": (f"{STACK}/decoder_layer/moe_out_norm", "scale", None),
    "router/w": (MOE, "router", None),
}
GLOBALS = {
    release.EMBEDDING_PATH: ("grok1/embed", "embeddings"),
    release.FINAL_NORM_PATH: ("grok1/final_norm", "scale"),
}
assert set(MODULES) == set(release.LAYER_SUFFIXES)


def release_path(suffix: str, layer: int) -> str:
    return f"{release.LAYER_PREFIX}{layer}/{suffix}"


def dequantize_np(q: release.QuantizedWeight8bit) -> np.ndarray:
    """Host-side `bf16(bf16(w) * scales)` widened to float32 (exact)."""
    w = q.weight.astype(np.float32)
    *lead, n_in, n_out = w.shape
    g = q.scales.shape[-2]
    s = q.scales.astype(np.float32)[..., :, None, :]
    prod = (w.reshape(*lead, g, n_in // g, n_out) * s).astype(BF16_NP).astype(np.float32)
    return prod.reshape(w.shape)


def _formats(config: ModelConfig, files: dict) -> WeightFormats:
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


class _LeafReader:
    """Reads slices of one model leaf ([L, ...] stacked or global) from the release files."""

    def __init__(self, files: dict, config: ModelConfig, module: str, leaf: str, dtype):
        self.files, self.config, self.dtype = files, config, dtype
        self.paths = None  # per-layer release paths, or a single global path
        self.part = "scales" if leaf == "scales" else "weight"
        for path, (mod, name) in GLOBALS.items():
            if (mod, name) == (module, leaf):
                self.paths = path
        if self.paths is None:
            suffix = next(s for s, (m, n, _) in MODULES.items() if m == module and n in (leaf, "w"))
            self.paths = [release_path(suffix, i) for i in range(config.num_layers)]

    def _read_one(self, path: str, index: tuple) -> np.ndarray:
        tf = self.files[path]
        if tf.kind == "array":
            out = tf.read(index)
        elif self.dtype == np.float32 and self.part == "weight":
            out = dequantize_np(release.read_tensor(tf.path))[index]  # mixed formats
        else:
            out = tf.read_part(self.part, index)
        return out.astype(self.dtype, copy=False)

    def __call__(self, index: tuple) -> np.ndarray:
        if isinstance(self.paths, str):
            return self._read_one(self.paths, index)
        layers_idx = range(len(self.paths))[index[0]]
        return np.stack([self._read_one(self.paths[i], index[1:]) for i in layers_idx])


def load_params(
    directory: str,
    config: ModelConfig,
    *,
    dtype: str = "bfloat16",
    shardings: Callable | None = None,
    max_workers: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict, WeightFormats]:
    """Reads, validates and places a release checkpoint.

    Args:
      directory: holds `ckpt-0/`.
      config: the architecture the files must match.
      dtype: activation dtype; in "bfloat16" mode the embedding is kept as bf16 (the model only
        ever uses bf16(Emb)), halving its memory.
      shardings: `(module, leaf, shape) -> jax.sharding.Sharding`; default: the first device.
      progress: called with the number of bytes each finished leaf held on this host.
    Returns: (params, formats).
    """
    ckpt = os.path.join(directory, release.CKPT_SUBDIR)
    files = {}
    for path, filename in release.checkpoint_files(directory, config):
        tf = release.open_tensor(filename)
        release.check_leaf(config, path, tf, where=filename)
        files[path] = tf
    formats = _formats(config, files)
    table = param_table(config, formats)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = lambda module, leaf, shape: device  # noqa: E731

    def build(key):
        module, leaf = key
        shape, leaf_dtype, _ = table[key]
        np_dtype = BF16_NP if leaf_dtype == layers.BF16 else np.dtype(leaf_dtype)
        if key == ("grok1/embed", "embeddings") and dtype == "bfloat16":
            np_dtype = BF16_NP
        reader = _LeafReader(files, config, module, leaf, np_dtype)
        arr = jax.make_array_from_callback(shape, shardings(module, leaf, shape), reader)
        if progress is not None:
            progress(sum(s.data.nbytes for s in arr.addressable_shards))
        return key, arr

    params: dict = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        for (module, leaf), arr in pool.map(build, table):
            params.setdefault(module, {})[leaf] = arr
    del ckpt
    return params, formats


def params_to_release(params: dict, config: ModelConfig) -> dict:
    """The release leaves {path: ndarray | QuantizedWeight8bit} of a parameter tree."""
    get = lambda module, leaf: np.asarray(jax.device_get(params[module][leaf]))  # noqa: E731
    leaves = {path: get(*key).astype(np.float32) for path, key in GLOBALS.items()}
    for suffix, (module, leaf, matrix) in MODULES.items():
        stacked = get(module, leaf)
        scales = get(module, "scales") if matrix and "scales" in params[module] else None
        for layer in range(config.num_layers):
            if scales is not None:
                value = release.QuantizedWeight8bit(stacked[layer], scales[layer])
            else:
                value = stacked[layer].astype(np.float32)
            leaves[release_path(suffix, layer)] = value
    return leaves


def save_params(directory: str, config: ModelConfig, params: dict) -> None:
    """Writes params as a release checkpoint (`ckpt-0/` + `config.json`)."""
    release.write_checkpoint(directory, config, params_to_release(params, config))
