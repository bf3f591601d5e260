"""A converted checkpoint that is safe and mmap-able: one `.npy` file per array plus a JSON index.

The release's pickles (`npy_format.py`) need a careful opcode walker to read safely. `convert`
rewrites them once into plain `.npy` files, which NumPy reads with `allow_pickle=False` and maps
with `mmap_mode="r"`, so a host reading its slices touches only the pages it needs. Layout:

    <dir>/index.json   {"format": "grok1-npy", "version": 1, "config": {...},
                        "tensors": {release path: {"kind": "array" | "quantized",
                                    "parts": {part: {"file", "shape", "dtype", "stored_as"}}}}}
    <dir>/config.json  the architecture (`grok1.ModelConfig`)
    <dir>/t00000.npy, <dir>/t00002.weight.npy, <dir>/t00002.scales.npy, ...

File `tNNNNN` holds release leaf NNNNN (SPEC.md §3). A plain leaf has one part "array"; an int8
matrix has "weight" (int8) and "scales" (bfloat16, stored as uint16 because `.npy` has no bf16:
`dtype` is the true dtype, `stored_as` the file's). `open_checkpoint` returns `NpyTensor`s, which
have `TensorFile`'s interface, so the loader reads either format the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile

import numpy as np

from grok1.checkpoint import release
from grok1.checkpoint.npy_format import BF16, CheckpointError, QuantizedWeight8bit, TensorFile
from grok1.config import ModelConfig
from grok1.progress import Progress

INDEX_FILE = "index.json"
FORMAT, VERSION = "grok1-npy", 1
# true dtype -> dtype of the .npy file
STORED_AS = {"float32": np.dtype("<f4"), "int8": np.dtype("i1"), "bfloat16": np.dtype("<u2")}
DTYPES = {"float32": np.dtype("<f4"), "int8": np.dtype("i1"), "bfloat16": BF16}
_CHUNK_BYTES = 64 << 20  # conversion copies at most this much at a time


def is_converted(directory) -> bool:
    """Whether `directory` holds a converted checkpoint (an `index.json`)."""
    return os.path.isfile(os.path.join(os.fspath(directory), INDEX_FILE))


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------
def _map(file: str, shape: tuple, stored: np.dtype) -> np.memmap:
    """Maps one `.npy` read-only after checking its header against the index."""
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (ValueError, OSError, EOFError) as e:  # bad header, short file, object dtype
        raise CheckpointError(f"{file}: not a valid .npy file or truncated ({e})") from None
    if arr.shape != shape or arr.dtype != stored or not arr.flags.c_contiguous:
        raise CheckpointError(
            f"{file}: holds {arr.dtype} {arr.shape} "
            f"({'C' if arr.flags.c_contiguous else 'Fortran'} order); the index expects "
            f"C-order {stored} {shape}. Re-run the conversion."
        )
    return arr


class NpyTensor(TensorFile):
    """One release leaf stored as `.npy` part files; read through a fresh read-only mmap.

    Same interface as `TensorFile` (`kind`, `parts`, `shape`, `dtype`, `scales_shape`, `read`,
    `read_part`); `path` is the first part's file. Each read maps the file, copies out the
    selected slice and unmaps it, so no descriptors or mappings stay open between reads.
    """

    def __init__(self, kind: str, parts: dict):
        # parts: {part: (file, shape, true dtype, stored dtype)}
        self.path, self.kind = next(iter(parts.values()))[0], kind
        self._layouts, self._value, self._stamp = None, None, None
        self._parts = parts
        self._meta = {part: (shape, dtype) for part, (_, shape, dtype, _) in parts.items()}
        for file, shape, _, stored in parts.values():
            _map(file, shape, stored)  # check the header and size now, not mid-load
        if kind == "quantized":
            (w, dw), (s, ds) = self._meta["weight"], self._meta["scales"]
            QuantizedWeight8bit.check(w, dw, s, ds)

    def read_part(self, part: str, index=None) -> np.ndarray:
        if part not in self._parts:
            raise KeyError(f"{self.path}: no part {part!r}; parts are {self.parts}")
        file, shape, dtype, stored = self._parts[part]
        arr = _map(file, shape, stored)
        out = np.array(arr[() if index is None else index], order="C")
        return out.view(dtype) if dtype != stored else out


def _load_index(directory: str) -> dict:
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the index ({e})") from None
    found = (index.get("format"), index.get("version")) if isinstance(index, dict) else None
    if found != (FORMAT, VERSION):
        raise CheckpointError(
            f"{path}: format {found}; this reader understands ({FORMAT!r}, {VERSION}). "
            f"Convert the release checkpoint again with this version of grok1."
        )
    return index


def _open_entry(directory: str, path: str, entry) -> NpyTensor:
    """An index entry -> NpyTensor, refusing anything but plain files in `directory`."""
    try:
        kind, parts = entry["kind"], entry["parts"]
        want = {"array": ["array"], "quantized": ["weight", "scales"]}[kind]
        if list(parts) != want:
            raise ValueError(f"parts {list(parts)}; expected {want}")
        opened = {}
        for part, info in parts.items():
            name = info["file"]
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".."):
                raise ValueError(f"file name {name!r} is not a plain file name")
            dtype = info["dtype"]
            if STORED_AS[dtype] != np.dtype(info["stored_as"]):
                raise ValueError(f"{dtype} stored as {info['stored_as']}")
            shape = tuple(int(n) for n in info["shape"])
            opened[part] = (os.path.join(directory, name), shape, DTYPES[dtype], STORED_AS[dtype])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{os.path.join(directory, INDEX_FILE)}: bad entry for parameter {path} "
            f"({type(e).__name__}: {e})"
        ) from None
    return NpyTensor(kind, opened)


def open_checkpoint(directory, config: ModelConfig) -> dict:
    """{release path: NpyTensor} for a converted checkpoint, checked against `config`.

    Raises `CheckpointError` naming the file and the parameter for a missing, truncated or
    wrong-shaped file, or an index that does not match the config.
    """
    directory = os.fspath(directory)
    tensors = _load_index(directory).get("tensors", {})
    paths = release.release_param_paths(config)
    missing, extra = sorted(set(paths) - set(tensors)), sorted(set(tensors) - set(paths))
    if missing or extra:
        raise CheckpointError(
            f"{os.path.join(directory, INDEX_FILE)}: lists parameters that do not match the "
            f"{config.num_layers}-layer config: missing {missing[:3]}, unexpected {extra[:3]}. "
            f"Is config.json right for this checkpoint?"
        )
    files = {}
    for path in paths:
        try:
            tensor = _open_entry(directory, path, tensors[path])
        except CheckpointError as e:
            raise CheckpointError(f"parameter {path}: {e}") from None
        release.check_leaf(config, path, tensor, where=tensor.path)
        files[path] = tensor
    return files


# ---------------------------------------------------------------------------------------------
# Converting.
# ---------------------------------------------------------------------------------------------
def _chunks(shape: tuple, itemsize: int, limit: int = _CHUNK_BYTES):
    """Index tuples covering a C-order array in order, each a contiguous block <= `limit`
    bytes (or one row of the last axis when that alone is larger)."""
    if not shape:
        yield ()
        return
    k = 0
    while k < len(shape) - 1 and math.prod(shape[k + 1 :]) * itemsize > limit:
        k += 1
    step = max(1, limit // max(1, math.prod(shape[k + 1 :]) * itemsize))
    for lead in np.ndindex(*shape[:k]):
        for start in range(0, shape[k], step):
            yield (*lead, slice(start, min(start + step, shape[k])))


def _write_npy(file: str, tf: TensorFile, part: str, progress) -> dict:
    """Copies one part of a release file into a `.npy`, chunk by chunk; returns its entry."""
    shape, dtype = (tf.scales_shape, BF16) if part == "scales" else (tf.shape, tf.dtype)
    name = {np.dtype("<f4"): "float32", np.dtype("i1"): "int8", BF16: "bfloat16"}[dtype]
    stored = STORED_AS[name]
    header = {"descr": np.lib.format.dtype_to_descr(stored), "fortran_order": False,
              "shape": tuple(shape)}  # fmt: skip
    with open(file, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for index in _chunks(tuple(shape), stored.itemsize):
            chunk = tf.read_part(part, index).view(stored)
            f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            if progress is not None:
                progress(chunk.nbytes)
        f.flush()
        os.fsync(f.fileno())
    return {"file": os.path.basename(file), "shape": list(shape), "dtype": name,
            "stored_as": stored.str}  # fmt: skip


def convert(release_dir, out_dir, config: ModelConfig | None = None, *, progress=None) -> str:
    """Converts a release checkpoint (`<release_dir>/ckpt-0/`) into `out_dir`; returns out_dir.

    Everything is written into a temporary directory next to `out_dir` and renamed into place at
    the end, so `out_dir` either does not exist or is complete. `out_dir` must not exist (an
    empty directory is replaced). `config` defaults to `<release_dir>/config.json`; `progress`
    (callable or `grok1.progress.Progress`) is called with bytes copied.
    """
    release_dir, out_dir = os.fspath(release_dir), os.path.abspath(os.fspath(out_dir))
    config = config or ModelConfig.load(release_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{out_dir}: already exists; choose a new directory")
    files = release.checkpoint_files(release_dir, config)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        tensors = {}
        for i, (path, filename) in enumerate(files):
            tf = release.open_tensor(filename)
            release.check_leaf(config, path, tf, where=filename)
            parts = {}
            for part in tf.parts:
                suffix = "" if part == "array" else f".{part}"
                parts[part] = _write_npy(os.path.join(tmp, f"t{i:05d}{suffix}.npy"), tf, part,
                                         progress)  # fmt: skip
            tensors[path] = {"kind": tf.kind, "parts": parts}
        index = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
                 "tensors": tensors}  # fmt: skip
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        config.save(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    if isinstance(progress, Progress):
        progress.close()
    return out_dir
