"""The converted checkpoint: sharded safetensors files plus `model.safetensors.index.json`.

Layout (the ecosystem's sharded layout, readable by any safetensors tool):

    <dir>/model-00001-of-00080.safetensors, ...   about `shard_bytes` each (4 GiB by default)
    <dir>/model.safetensors.index.json  {"metadata": {"format": "grok1", "version": 1,
                                           "total_size": tensor bytes, "files": {file: bytes}},
                                         "weight_map": {tensor name: file}}
    <dir>/config.json                   the architecture (`grok1.ModelConfig`)

Tensor names are the release's leaf paths (SPEC.md §3). A float32 leaf is stored under its path
(`language_model/in_out_embed/embeddings`, `transformer/decoder_layer_0/router/w`, dtype F32); an
int8 matrix under `<path>.weight` (I8) and `<path>.scales` (BF16, the release's bits), the two
attributes of the release's `QuantizedWeight8bit`. A leaf's tensors share one file; files follow
the release's file order.

Safety: a safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte
range) and raw little-endian bytes. The `safetensors` library parses and checks the header (it
has no code path that runs anything from the file); we then check every name, dtype and shape
against the config before reading. Reads go through `safe_open(file, framework="numpy")` and
`get_slice(name)[...]`, which copies only the requested region out of a memory map of the file, so
a host reads only its devices' slices; BF16 comes back as `ml_dtypes.bfloat16`, bit for bit.

`convert` writes into a temporary directory beside the destination, fsyncs, and renames it into
place, so the destination is either absent or complete. On any exception, KeyboardInterrupt
included, it removes the temporary directory; one left by a conversion killed outright is
removed by the next conversion into the same destination (a running conversion holds a lock on
its own, so it is never taken for stale).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import struct
import sys
import tempfile

import numpy as np
from safetensors import safe_open

from grok1.checkpoint import release
from grok1.checkpoint.tensors import (
    BF16,
    CheckpointError,
    TensorReader,
    as_range,
    empty_result,
    fsync_directory,
    is_empty,
    normalize_index,
    relative,
)
from grok1.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
FORMAT, VERSION = "grok1", 1
SHARD_BYTES = 4 << 30  # default size of one file
DTYPES = {"F32": np.dtype("<f4"), "I8": np.dtype("i1"), "BF16": BF16}  # safetensors name -> ours
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_CHUNK_BYTES = 64 << 20  # conversion copies at most this much at a time
_STAGING = ".converting-"  # temporary directory: .<destination name>.converting-XXXX


def is_converted(directory) -> bool:
    """Whether `directory` holds a converted checkpoint (a `model.safetensors.index.json`)."""
    return os.path.isfile(os.path.join(os.fspath(directory), INDEX_FILE))


def tensor_names(path: str, kind: str) -> dict[str, str]:
    """{part: tensor name} of a leaf: {"array": path} or {"weight": path.weight, ...}."""
    if kind == "array":
        return {"array": path}
    return {"weight": f"{path}.weight", "scales": f"{path}.scales"}


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _errors_name(file: str):
    """Turns a failure of the safetensors library on `file` into a one-line `CheckpointError`."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; convert the checkpoint again") from None
    except Exception as e:  # SafetensorError and friends: a bad header, a short file
        reason = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise CheckpointError(
            f"{file} is not a valid safetensors file ({reason}); convert the checkpoint again"
        ) from None


class SafetensorsTensor(TensorReader):
    """One leaf of a converted checkpoint. Each read opens its file, checks that the tensor
    still has the shape and dtype it had when opened, and copies out only the selected region."""

    def __init__(self, kind: str, parts: dict):
        """`parts`: {part: (file, tensor name, shape, dtype)}."""
        first = next(iter(parts.values()))[0]
        super().__init__(first, kind, {p: (v[2], v[3]) for p, v in parts.items()})
        self.locations = {p: (v[0], v[1]) for p, v in parts.items()}

    def read_part(self, part: str, index=None) -> np.ndarray:
        shape, dtype = self.part_meta(part)
        sel = normalize_index(index, shape)
        if is_empty(sel):
            return empty_result(sel, dtype)
        file, name = self.locations[part]
        box = tuple(slice(min(as_range(s)), max(as_range(s)) + 1) for s in sel)  # step 1
        with _errors_name(file), safe_open(file, framework="numpy") as f:
            view = f.get_slice(name)
            if (tuple(view.get_shape()), view.get_dtype()) != (shape, DTYPE_NAMES[dtype]):
                raise CheckpointError(f"{file}: tensor {name} changed since it was opened")
            data = view[box]
        if data.dtype != dtype:
            raise CheckpointError(f"{file}: tensor {name} read as {data.dtype}, expected {dtype}")
        out = data[tuple(relative(s, min(as_range(s))) for s in sel)]
        return np.ascontiguousarray(out)


def _load_index(directory: str) -> dict[str, str]:
    """The index's weight_map, after checking its format and the files' names and sizes."""
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the index ({e})") from None
    meta = index.get("metadata") if isinstance(index, dict) else None
    found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else None
    if found != (FORMAT, VERSION):
        raise CheckpointError(
            f"{path}: format {found}; this reader understands ({FORMAT!r}, {VERSION}). "
            f"Convert the release checkpoint again with this version of grok1"
        )
    weight_map, sizes = index.get("weight_map"), meta.get("files")
    ok = isinstance(weight_map, dict) and isinstance(sizes, dict)
    if not ok or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: weight_map and metadata.files must map names to files")
    for name, size in sizes.items():
        if not (isinstance(name, str) and name == os.path.basename(name)) or name[:1] in ("", "."):
            raise CheckpointError(f"{path}: file name {name!r} is not a plain file name")
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (listed in {INDEX_FILE}); convert again")
        if os.path.getsize(file) != size:
            raise CheckpointError(
                f"{file} is truncated or damaged: it holds {os.path.getsize(file)} bytes, the "
                f"index records {size}; convert the checkpoint again"
            )
    unknown = sorted(set(weight_map.values()) - set(sizes))
    if unknown:
        raise CheckpointError(f"{path}: weight_map names files {unknown[:3]} not in metadata.files")
    return weight_map


def _leaf_kinds(index_file: str, weight_map: dict, config: ModelConfig) -> dict[str, str]:
    """{release path: kind} from the tensor names, which must be exactly the config's leaves."""
    kinds, names = {}, set(weight_map)
    for path in release.release_param_paths(config):
        for kind in ("array", "quantized"):
            if set(tensor_names(path, kind).values()) <= names:
                kinds[path] = kind
    expected = {n for p, k in kinds.items() for n in tensor_names(p, k).values()}
    missing = sorted(set(release.release_param_paths(config)) - set(kinds))
    extra = sorted(names - expected)
    if missing or extra:
        raise CheckpointError(
            f"{index_file}: tensors do not match the {config.num_layers}-layer config: missing "
            f"{missing[:3]}, unexpected {extra[:3]}. Is config.json right for this checkpoint?"
        )
    return kinds


def _file_headers(directory: str, weight_map: dict) -> dict[str, tuple]:
    """{tensor name: (file, shape, dtype)} read from the files' headers, which must list exactly
    the index's tensors in supported dtypes."""
    by_file: dict[str, set] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    out = {}
    for name_of_file, names in by_file.items():
        file = os.path.join(directory, name_of_file)
        with _errors_name(file), safe_open(file, framework="numpy") as f:
            if set(f.keys()) != names:
                raise CheckpointError(
                    f"{file}: holds tensors {sorted(set(f.keys()) ^ names)[:3]} that differ from "
                    f"{INDEX_FILE}; convert the checkpoint again"
                )
            for name in names:
                view = f.get_slice(name)
                dtype = view.get_dtype()
                if dtype not in DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}")
                out[name] = (file, tuple(view.get_shape()), DTYPES[dtype])
    return out


def check_index(directory, config: ModelConfig) -> None:
    """Checks the index against `config` and the files' sizes, without opening the files."""
    directory = os.fspath(directory)
    _leaf_kinds(os.path.join(directory, INDEX_FILE), _load_index(directory), config)


def open_converted(directory, config: ModelConfig) -> dict[str, SafetensorsTensor]:
    """{release path: SafetensorsTensor} for a converted checkpoint, checked against `config`.

    Raises `CheckpointError` naming the file (and the parameter) for a missing, truncated or
    damaged file, a wrong dtype or shape, or an index that does not match the config.
    """
    directory = os.fspath(directory)
    weight_map = _load_index(directory)
    kinds = _leaf_kinds(os.path.join(directory, INDEX_FILE), weight_map, config)
    headers = _file_headers(directory, weight_map)
    readers = {}
    for path, kind in kinds.items():
        parts = {part: (*headers[name][:1], name, *headers[name][1:])
                 for part, name in tensor_names(path, kind).items()}  # fmt: skip
        try:
            reader = SafetensorsTensor(kind, parts)
        except CheckpointError as e:
            raise CheckpointError(f"parameter {path}: {e}") from None
        release.check_leaf(config, path, reader, where=reader.path)
        readers[path] = reader
    return readers


# ---------------------------------------------------------------------------------------------
# Converting.
# ---------------------------------------------------------------------------------------------
def _nbytes(reader: TensorReader, part: str) -> int:
    shape, dtype = reader.part_meta(part)
    return math.prod(shape) * dtype.itemsize


def plan_shards(readers: dict, shard_bytes: int = SHARD_BYTES) -> list[list[tuple]]:
    """Leaves in file order packed into files of at most `shard_bytes` (a larger leaf gets a file
    of its own): [[(tensor name, reader, part), ...] per file]."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for path, reader in readers.items():
        entries = [(name, reader, part) for part, name in tensor_names(path, reader.kind).items()]
        leaf = sum(_nbytes(reader, part) for _, _, part in entries)
        if shards[-1] and size + leaf > shard_bytes:
            shards.append([])
            size = 0
        shards[-1] += entries
        size += leaf
    return shards


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


def _header(entries: list) -> bytes:
    """The 8-byte length and the JSON header of a file holding `entries`, padded to 8 bytes."""
    header: dict = {"__metadata__": {"format": "np"}}
    offset = 0
    for name, reader, part in entries:
        shape, dtype = reader.part_meta(part)
        end = offset + _nbytes(reader, part)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, end]}  # fmt: skip
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_file(file: str, entries: list, progress) -> int:
    """Writes one safetensors file, copying each tensor chunk by chunk; returns its size."""
    with open(file, "wb") as f:
        f.write(_header(entries))
        for _, reader, part in entries:
            shape, dtype = reader.part_meta(part)
            for index in _chunks(shape, dtype.itemsize):
                chunk = reader.read_part(part, index)
                f.write(chunk.reshape(-1).view(np.uint8).data)
                progress(chunk.nbytes)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _remove_stale(path: str, out_dir: str) -> None:
    """Removes a temporary directory left by an earlier conversion into `out_dir`, unless a
    running conversion holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CheckpointError(
            f"another conversion into {out_dir} is running (it is writing {path}); wait for it "
            f"to finish or stop it"
        ) from None
    finally:
        os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _staging_directory(out_dir: str):
    """A fresh temporary directory beside `out_dir`, locked while this conversion runs and
    removed if the block raises anything; stale ones of earlier conversions are removed first."""
    parent, base = os.path.split(out_dir)
    prefix = f".{base}{_STAGING}"
    for name in sorted(os.listdir(parent)):
        if name.startswith(prefix):
            _remove_stale(os.path.join(parent, name), out_dir)
    tmp = tempfile.mkdtemp(dir=parent, prefix=prefix)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _check_space(directory: str, total: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < total:
        raise CheckpointError(
            f"{directory}: {free / 1e9:.1f} GB free, the converted checkpoint needs "
            f"{total / 1e9:.1f} GB; free some space or choose another destination"
        )


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def convert(
    release_dir,
    out_dir,
    config: ModelConfig | None = None,
    *,
    shard_bytes: int = SHARD_BYTES,
    progress=None,
) -> str:
    """Converts a release checkpoint (`<release_dir>/ckpt-0/`) into `out_dir`; returns out_dir.

    Every release file is validated (opcodes walked, shapes checked against the config) before
    anything is written. `out_dir` must not exist (an empty directory is replaced); the write is
    atomic (module docstring). `config` defaults to `<release_dir>/config.json`; `shard_bytes`
    bounds each file (a larger leaf gets a file of its own); `progress` (a callable or a
    `grok1.progress.Progress`, whose total is set if unset; the caller closes it) is called with
    the bytes copied.
    """
    release_dir, out_dir = os.fspath(release_dir), os.path.abspath(os.fspath(out_dir))
    if sys.byteorder != "little":
        raise CheckpointError("converting is only supported on little-endian hosts")
    if is_converted(release_dir):
        raise CheckpointError(f"{release_dir} is already a converted checkpoint ({INDEX_FILE})")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    config = config or ModelConfig.load(release_dir)
    readers = release.open_release(release_dir, config)
    shards = plan_shards(readers, shard_bytes)
    total = sum(_nbytes(r, part) for shard in shards for _, r, part in shard)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{out_dir} already exists; choose a new directory or remove it")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    if getattr(progress, "total", 0) is None:
        progress.total = total
    report = progress or (lambda n: None)
    with _staging_directory(out_dir) as tmp:
        _check_space(tmp, total)
        weight_map, sizes = {}, {}
        for k, entries in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            sizes[name] = _write_file(os.path.join(tmp, name), entries, report)
            weight_map.update({tensor: name for tensor, _, _ in entries})
        meta = {"format": FORMAT, "version": VERSION, "total_size": total, "files": sizes}
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": meta, "weight_map": weight_map}, f, indent=1)
        _fsync_file(os.path.join(tmp, INDEX_FILE))
        _fsync_file(config.save(tmp))
        fsync_directory(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(tmp, out_dir)
    fsync_directory(os.path.dirname(out_dir))
    return out_dir
