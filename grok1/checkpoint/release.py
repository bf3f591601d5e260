"""The release checkpoint directory: its file order, shapes, name table, and whole-directory io.

A release checkpoint is `<dir>/ckpt-0/tensor{i:05d}_{p:03d}`, one file per parameter leaf
(SPEC.md §3, §5), plus an optional `<dir>/config.json`. File `i` holds the i-th leaf in the
lexicographic order of the Haiku paths, so layers run 0, 1, 10, 11, ..., 19, 2, 20, .... Each
file's format and the reader's safety model are in `pickle_reader.py` (the writer in
`pickle_writer.py`); this module names, checks and opens the files, and maps the release's names
to the model's parameters (`MODULES`, `GLOBALS`).

Shapes (letters as in `grok1.config`): embedding [V, D]; per layer MoE `linear`/`linear_v`
[E, D, F], `linear_1` [E, F, D]; attention `query` [D, H*Dh], `key`/`value` [D, K*Dh], `linear`
[H*Dh, D]; four RMSNorm scales [D]; router [D, E]; final norm [D]. The seven matrices may be
stored as `QuantizedWeight8bit` (int8 weight of that shape + bf16 scales) or as float32 arrays;
everything else is float32.

Per-host files (our layout; the release only has `_000`): a checkpoint written by P processes
(`write_checkpoint(..., num_files=P)`) stores leaf i as `tensor{i:05d}_000` .. `_{P-1:03d}`, file p
holding the p-th of P equal, contiguous slices of the leaf along its LAST axis (the output
columns of a matrix, and of its scales, which share that axis). Every leaf has the same P, and P
divides every leaf's last dimension. `ShardedTensor` presents the P files as one leaf, so any
process reads exactly the column range its devices keep, whatever the mesh.
"""

from __future__ import annotations

import os
import re

import numpy as np

from grok1.checkpoint.pickle_reader import open_tensor, read_tensor
from grok1.checkpoint.pickle_writer import write_tensor
from grok1.checkpoint.tensors import (
    CheckpointError,
    QuantizedWeight8bit,
    TensorReader,
    as_range,
    empty_result,
    is_empty,
    normalize_index,
    relative,
)
from grok1.config import CONFIG_FILE, ModelConfig
from grok1.model import ATTN, MOE, STACK

__all__ = [
    # re-exported for convenience: the error, the quantized leaf, one file's reader and writer
    "CheckpointError", "QuantizedWeight8bit", "open_tensor", "read_tensor", "write_tensor",
    "CKPT_SUBDIR", "EMBEDDING_PATH", "FINAL_NORM_PATH", "LAYER_SUFFIXES", "MATRIX_SUFFIXES",
    "MODULES", "GLOBALS", "release_path", "layer_order", "release_param_paths",
    "parse_release_path", "release_shape", "is_matrix", "tensor_filename", "check_leaf",
    "tensor_file_names", "checkpoint_file_groups", "checkpoint_files", "open_leaf",
    "open_release", "ShardedTensor", "read_checkpoint", "write_checkpoint",
]  # fmt: skip

CKPT_SUBDIR = "ckpt-0"
EMBEDDING_PATH = "language_model/in_out_embed/embeddings"
FINAL_NORM_PATH = "language_model/rms_norm/scale"
LAYER_PREFIX = "transformer/decoder_layer_"
# A layer's 12 leaves, in file order (lexicographic).
LAYER_SUFFIXES = (
    "moe/linear/w",
    "moe/linear_1/w",
    "moe/linear_v/w",
    "multi_head_attention/key/w",
    "multi_head_attention/linear/w",
    "multi_head_attention/query/w",
    "multi_head_attention/value/w",
    "rms_norm/scale",
    "rms_norm_1/scale",
    "rms_norm_2/scale",
    "rms_norm_3/scale",
    "router/w",
)
MATRIX_SUFFIXES = LAYER_SUFFIXES[:7]  # int8 + scales in the release, or plain float32
_LAYER_RE = re.compile(r"transformer/decoder_layer_(0|[1-9][0-9]*)/(.+)")

# The name table: release layer suffix -> (model module, leaf name, matrix name or None). The
# model's parameters (`grok1.model.param_table`) stack the layers: leaf [L, ...] in numeric order.
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
# The two leaves outside the layers: release path -> (model module, leaf name).
GLOBALS = {
    EMBEDDING_PATH: ("grok1/embed", "embeddings"),
    FINAL_NORM_PATH: ("grok1/final_norm", "scale"),
}


def release_path(suffix: str, layer: int) -> str:
    """The release path of a layer's leaf: "transformer/decoder_layer_3/router/w"."""
    return f"{LAYER_PREFIX}{layer}/{suffix}"


def layer_order(num_layers: int) -> list[int]:
    """Layer indices in file order: lexicographic by decimal name (0, 1, 10, 11, ..., 2, ...)."""
    return sorted(range(num_layers), key=str)


def release_param_paths(config: ModelConfig) -> list[str]:
    """Leaf paths (without "params/") in file order: file i holds `release_param_paths(c)[i]`."""
    paths = [EMBEDDING_PATH, FINAL_NORM_PATH]
    for layer in layer_order(config.num_layers):
        paths += [release_path(suffix, layer) for suffix in LAYER_SUFFIXES]
    return paths


def parse_release_path(path: str) -> tuple[int | None, str]:
    """(layer, suffix) of a leaf path: (None, path) for the two top-level leaves."""
    if path in (EMBEDDING_PATH, FINAL_NORM_PATH):
        return None, path
    match = _LAYER_RE.fullmatch(path)
    if not match or match.group(2) not in LAYER_SUFFIXES:
        raise CheckpointError(
            f"{path!r} is not a release parameter path; expected {EMBEDDING_PATH}, "
            f"{FINAL_NORM_PATH} or {LAYER_PREFIX}<N>/<one of {LAYER_SUFFIXES}>"
        )
    return int(match.group(1)), match.group(2)


def is_matrix(suffix: str) -> bool:
    """Whether a layer suffix (e.g. "moe/linear/w") names one of the seven weight matrices."""
    return suffix in MATRIX_SUFFIXES


def release_shape(config: ModelConfig, path: str) -> tuple[int, ...]:
    """The full (unsharded) shape of a leaf; raises for a layer beyond `config.num_layers`."""
    layer, suffix = parse_release_path(path)
    if layer is not None and layer >= config.num_layers:
        raise CheckpointError(f"{path}: layer {layer} but the config has {config.num_layers}")
    d, f, e = config.emb_size, config.ffn_size, config.num_experts
    hq, hk = config.num_q_heads * config.key_size, config.num_kv_heads * config.key_size
    shapes = {
        EMBEDDING_PATH: (config.vocab_size, d), FINAL_NORM_PATH: (d,),
        "moe/linear/w": (e, d, f), "moe/linear_1/w": (e, f, d), "moe/linear_v/w": (e, d, f),
        "multi_head_attention/key/w": (d, hk), "multi_head_attention/linear/w": (hq, d),
        "multi_head_attention/query/w": (d, hq), "multi_head_attention/value/w": (d, hk),
        "rms_norm/scale": (d,), "rms_norm_1/scale": (d,), "rms_norm_2/scale": (d,),
        "rms_norm_3/scale": (d,), "router/w": (d, e),
    }  # fmt: skip
    return shapes[suffix]


def tensor_filename(index: int, process: int = 0) -> str:
    """The file name of leaf `index` written by host `process`: "tensor00042_000"."""
    return f"tensor{index:05d}_{process:03d}"


# ---------------------------------------------------------------------------------------------
# Checking leaves against the config.
# ---------------------------------------------------------------------------------------------
def _describe(value) -> tuple:
    """(kind, shape, dtype, scales_shape) of an ndarray, QuantizedWeight8bit or TensorReader."""
    if isinstance(value, TensorReader):
        return value.kind, value.shape, value.dtype, value.scales_shape
    if isinstance(value, QuantizedWeight8bit):
        value.validate()
        return "quantized", value.weight.shape, value.weight.dtype, value.scales.shape
    if isinstance(value, np.ndarray):
        return "array", value.shape, value.dtype, None
    return type(value).__name__, None, None, None


def _found_text(kind, shape, dtype, scales_shape) -> str:
    if kind == "quantized":
        return f"QuantizedWeight8bit weight {dtype} {tuple(shape)} + scales {tuple(scales_shape)}"
    if kind == "array":
        return f"{dtype} array {tuple(shape)}"
    return f"a {kind}"


def check_leaf(config: ModelConfig, path: str, value, *, where: str = "") -> None:
    """Raises `CheckpointError` unless `value` (ndarray, QuantizedWeight8bit or TensorReader) is a
    valid leaf `path` for `config`. `where` (e.g. the file) prefixes the message."""
    want, matrix = release_shape(config, path), is_matrix(parse_release_path(path)[1])
    prefix = f"{where}: " if where else ""
    try:
        kind, shape, dtype, scales_shape = _describe(value)
    except CheckpointError as e:
        raise CheckpointError(f"{prefix}parameter {path}: {e}") from None
    ok = kind == "array" and tuple(shape) == want and dtype == np.float32
    if matrix and kind == "quantized":
        ok = tuple(shape) == want  # dtypes and scale groups were checked by QuantizedWeight8bit
    if not ok:
        allowed = "float32"
        if matrix:
            allowed = "int8 QuantizedWeight8bit (bf16 scales, groups dividing dim -2) or float32"
        found = _found_text(kind, shape, dtype, scales_shape)
        raise CheckpointError(
            f"{prefix}parameter {path}: expected {allowed} of shape {want}, "
            f"found {found}. Does the config (config.json) match this checkpoint?"
        )


# ---------------------------------------------------------------------------------------------
# Whole directories.
# ---------------------------------------------------------------------------------------------
class ShardedTensor(TensorReader):
    """One leaf stored as per-host files split along the last axis (see the module docstring);
    reads touch only the files whose columns the index selects."""

    def __init__(self, files: list[TensorReader]):
        first, meta = files[0], {}
        for part, (shape, dtype) in first.meta.items():
            for f in files[1:]:
                other = f.meta.get(part)
                if (
                    f.kind != first.kind
                    or other is None
                    or (other[0][:-1], other[1]) != (shape[:-1], dtype)
                ):
                    raise CheckpointError(
                        f"{f.path}: per-host file does not match {first.path} (found {f.kind} "
                        f"{other}, expected {first.kind} {dtype} {shape[:-1]} + [columns])"
                    )
            meta[part] = ((*shape[:-1], sum(f.meta[part][0][-1] for f in files)), dtype)
        super().__init__(first.path, first.kind, meta)
        self.files = list(files)
        self.widths = [f.shape[-1] for f in files]

    def read_part(self, part: str, index=None) -> np.ndarray:
        shape, dtype = self.part_meta(part)
        sel = normalize_index(index, shape)
        if is_empty(sel):
            return empty_result(sel, dtype)
        cols = as_range(sel[-1])
        lo, hi = min(cols), max(cols) + 1
        lead = tuple(relative(s, 0) for s in sel[:-1])
        pieces, offset = [], 0
        for f, width in zip(self.files, self.widths, strict=True):
            a, b = max(lo, offset), min(hi, offset + width)
            if a < b:
                pieces.append(f.read_part(part, lead + (slice(a - offset, b - offset),)))
            offset += width
        out = np.concatenate(pieces, axis=-1)  # columns lo .. hi-1
        return np.ascontiguousarray(out[..., relative(sel[-1], lo)])

    def __repr__(self) -> str:
        return f"ShardedTensor({self.path!r} + {len(self.files) - 1} more, {self.meta})"


def tensor_file_names(directory) -> list[str]:
    """The `tensor*` file names in `<directory>/ckpt-0/`; one-line errors naming the path when
    ckpt-0 is missing, is a file, or holds no tensor files."""
    ckpt = os.path.join(os.fspath(directory), CKPT_SUBDIR)
    if not os.path.isdir(ckpt):
        problem = "is a file" if os.path.exists(ckpt) else "does not exist"
        raise CheckpointError(
            f"{ckpt} {problem}; expected a directory holding the release's tensor files "
            f"({tensor_filename(0)}, {tensor_filename(1)}, ...): put the release's ckpt-0/ there"
        )
    names = sorted(n for n in os.listdir(ckpt) if n.startswith("tensor"))
    if not names:
        raise CheckpointError(
            f"{ckpt} holds no tensor files ({tensor_filename(0)}, {tensor_filename(1)}, ...); "
            f"copy the release's ckpt-0/ files into it (or download them again)"
        )
    return names


def _missing_config_message(directory: str, ckpt: str, expected: int, present: int) -> str:
    return (
        f"{CONFIG_FILE} is missing from {directory}, so the Grok-1 release config is assumed "
        f"({expected} tensor files), but {ckpt} holds {present}; put this checkpoint's "
        f"{CONFIG_FILE} in {directory}"
    )


def checkpoint_file_groups(directory, config: ModelConfig) -> list[tuple[str, list[str]]]:
    """[(parameter path, [file of process 0, 1, ...])] in file order, after checking that
    `<directory>/ckpt-0` holds exactly files `_000` .. `_{P-1}` of every expected leaf."""
    directory = os.fspath(directory)
    ckpt = os.path.join(directory, CKPT_SUBDIR)
    present = set(tensor_file_names(directory))
    suffixes = {n.rsplit("_", 1)[-1] for n in present}
    processes = sum(1 for p in range(len(suffixes)) if f"{p:03d}" in suffixes) or 1
    paths = release_param_paths(config)
    expected = {tensor_filename(i, p): path for i, path in enumerate(paths)
                for p in range(processes)}  # fmt: skip
    missing = sorted(set(expected) - present)
    no_config = not os.path.exists(os.path.join(directory, CONFIG_FILE))
    if missing and no_config and config == ModelConfig.grok1() and len(present) < len(paths) // 2:
        raise CheckpointError(_missing_config_message(directory, ckpt, len(paths), len(present)))
    if missing:
        raise CheckpointError(
            f"{ckpt}: missing {len(missing)} file(s), first {missing[0]} (parameter "
            f"{expected[missing[0]]}); a {config.num_layers}-layer config written by "
            f"{processes} process(es) expects {len(paths) * processes} files "
            f"{tensor_filename(0)} .. {tensor_filename(len(paths) - 1, processes - 1)}"
        )
    extra = sorted(present - set(expected))
    if extra:
        raise CheckpointError(
            f"{ckpt}: unexpected file(s) {extra[:5]}; a {config.num_layers}-layer config expects "
            f"exactly {tensor_filename(0)} .. {tensor_filename(len(paths) - 1, processes - 1)}. "
            f"Is config.json right for this checkpoint?"
        )
    return [
        (path, [os.path.join(ckpt, tensor_filename(i, p)) for p in range(processes)])
        for i, path in enumerate(paths)
    ]


def open_leaf(files: list[str]) -> TensorReader:
    """A reader for one leaf: `open_tensor` of its file, or a `ShardedTensor` of per-host files."""
    opened = [open_tensor(f) for f in files]
    return opened[0] if len(opened) == 1 else ShardedTensor(opened)


def open_release(directory, config: ModelConfig) -> dict[str, TensorReader]:
    """{release path: reader} for every leaf of a release directory, each checked against
    `config`; nothing is read but the files' opcodes."""
    readers = {}
    for path, filenames in checkpoint_file_groups(directory, config):
        try:
            reader = open_leaf(filenames)
        except CheckpointError as e:
            raise CheckpointError(f"parameter {path}: {e}") from None
        check_leaf(config, path, reader, where=filenames[0])
        readers[path] = reader
    return readers


def checkpoint_files(directory, config: ModelConfig) -> list[tuple[str, str]]:
    """[(parameter path, file path)] of a single-file-per-leaf checkpoint (the release's), checked
    by `checkpoint_file_groups`."""
    groups = checkpoint_file_groups(directory, config)
    if len(groups[0][1]) > 1:
        raise CheckpointError(
            f"{os.path.dirname(groups[0][1][0])}: holds per-host files (_000 .. "
            f"_{len(groups[0][1]) - 1:03d}); open it with open_release"
        )
    return [(path, files[0]) for path, files in groups]


def read_checkpoint(directory, config: ModelConfig) -> dict:
    """Reads and checks every leaf: {release path: ndarray | QuantizedWeight8bit}.

    Holds the whole model in memory; sharded loaders use `open_release` and read slices.
    """
    leaves = {}
    for path, files in checkpoint_file_groups(directory, config):
        value = read_tensor(files[0]) if len(files) == 1 else open_leaf(files).read()
        check_leaf(config, path, value, where=files[0])
        leaves[path] = value
    return leaves


def write_checkpoint(directory, config: ModelConfig, leaves: dict, num_files: int = 1) -> None:
    """Writes `<directory>/ckpt-0/tensorNNNNN_MMM` for every leaf, then `config.json`.

    `num_files` > 1 writes the per-host layout (module docstring): P files per leaf, split along
    the last axis. All leaves are checked before anything is written; each file atomically.
    """
    paths = release_param_paths(config)
    missing, extra = sorted(set(paths) - set(leaves)), sorted(set(leaves) - set(paths))
    if missing or extra:
        raise CheckpointError(
            f"write_checkpoint: leaves do not match the {config.num_layers}-layer config: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for i, path in enumerate(paths):
        check_leaf(config, path, leaves[path], where=tensor_filename(i))
        last = release_shape(config, path)[-1]
        if last % num_files:
            raise CheckpointError(
                f"write_checkpoint: {num_files} files per leaf do not divide the last dimension "
                f"({last}) of parameter {path}"
            )
    ckpt = os.path.join(os.fspath(directory), CKPT_SUBDIR)
    os.makedirs(ckpt, exist_ok=True)
    names = {tensor_filename(i, p) for i in range(len(paths)) for p in range(num_files)}
    stale = sorted(n for n in os.listdir(ckpt) if n.startswith("tensor") and n not in names)
    if stale:
        raise CheckpointError(f"{ckpt}: holds other tensor files {stale[:5]}; use an empty dir")
    for i, path in enumerate(paths):
        for p, part in enumerate(_split_last(leaves[path], num_files)):
            write_tensor(os.path.join(ckpt, tensor_filename(i, p)), part)
    config.save(os.fspath(directory))


def _split_last(value, n: int) -> list:
    """n equal slices of a leaf along its last axis (weight and scales alike)."""
    if n == 1:
        return [value]
    if isinstance(value, QuantizedWeight8bit):
        ws = np.split(value.weight, n, axis=-1)
        ss = np.split(value.scales, n, axis=-1)
        return [QuantizedWeight8bit(np.ascontiguousarray(w), np.ascontiguousarray(s))
                for w, s in zip(ws, ss, strict=True)]  # fmt: skip
    return [np.ascontiguousarray(v) for v in np.split(value, n, axis=-1)]
