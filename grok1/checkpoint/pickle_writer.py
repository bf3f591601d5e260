"""Writes one release tensor file: the same opcodes, byte for byte, as numpy 1.26 + CPython's
pickler wrote for the March-2024 release (numpy-1 spellings of the globals, protocol 4, CPython's
memo and framing), atomically.

The format is described in `pickle_reader.py`. We write with our own emitter rather than `pickle`
so that the bytes do not depend on the running numpy's spellings or on `__main__`; the golden
files rewrite byte-identically (tests/test_pickle_format.py).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile

import numpy as np

from grok1.checkpoint.tensors import BF16, CheckpointError, QuantizedWeight8bit, fsync_directory

_FRAME_TARGET = 64 * 1024  # CPython's framing: payloads this large are written outside frames
_RECONSTRUCT = ("numpy.core.multiarray", "_reconstruct")
# (dtype argument, byteorder, elsize, alignment, flags) of each dtype's pickled form, as numpy
# 1.26 + ml_dtypes 0.3.2 wrote them for the release.
_DTYPE_PICKLE = {
    np.dtype("<f4"): ("f4", "<", -1, -1, 0),
    np.dtype("i1"): ("i1", "|", -1, -1, 0),
    BF16: (("ml_dtypes", "bfloat16"), "<", 2, 2, 80),
}


class _Emitter:
    """Writes pickle opcodes with CPython's memo and framing behaviour (protocol 4)."""

    def __init__(self, reconstruct=_RECONSTRUCT):
        self.reconstruct = reconstruct
        self.chunks: list = [b"\x80\x04"]
        self.frame = bytearray()
        self.memo: dict = {}
        self.memo_size = 0

    def op(self, *codes: bytes):
        for code in codes:
            self.frame += code

    def memoize(self, key=None) -> int:
        self.frame += b"\x94"
        if key is not None:
            self.memo[key] = self.memo_size
        self.memo_size += 1
        return self.memo_size - 1

    def get(self, key) -> bool:
        """Emits a memo get for `key` if it was memoized; returns whether it did."""
        if key not in self.memo:
            return False
        i = self.memo[key]
        self.op(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))
        return True

    def string(self, s: str):
        if not self.get(("str", s)):
            data = s.encode("utf-8")
            head = (
                b"\x8c" + bytes([len(data)])
                if len(data) < 256
                else b"X" + struct.pack("<I", len(data))
            )
            self.op(head + data)
            self.memoize(("str", s))

    def global_(self, module: str, name: str):
        if not self.get(("global", module, name)):
            self.string(module)
            self.string(name)
            self.op(b"\x93")
            self.memoize(("global", module, name))

    def int_(self, v: int):
        if 0 <= v < 256:
            self.op(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.op(b"M" + struct.pack("<H", v))
        elif -(2**31) <= v < 2**31:
            self.op(b"J" + struct.pack("<i", v))
        else:
            data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.op(b"\x8a" + bytes([len(data)]) + data)

    def tuple_(self, n: int, marked: bool = False):
        """Closes a tuple of the last n items (MARK already emitted when `marked`)."""
        if n == 0 and not marked:
            self.op(b")")
            return
        self.op(b"t" if marked or n > 3 else bytes([0x84 + n]))
        self.memoize()

    def payload(self, data: memoryview, key=None):
        n = len(data)
        if n < 256:
            head = b"C" + bytes([n])
        elif n < 2**32:
            head = b"B" + struct.pack("<I", n)
        else:
            head = b"\x8e" + struct.pack("<Q", n)
        if n >= _FRAME_TARGET:
            self.commit()
            self.chunks += [head, data]
        else:
            self.op(head, bytes(data))
        self.memoize(key)

    def boundary(self):
        if len(self.frame) >= _FRAME_TARGET:
            self.commit()

    def commit(self):
        if len(self.frame) >= 4:
            self.chunks.append(b"\x95" + struct.pack("<Q", len(self.frame)))
        if self.frame:
            self.chunks.append(bytes(self.frame))
        self.frame = bytearray()

    def finish(self) -> list:
        self.op(b".")
        self.commit()
        return self.chunks


def _emit_dtype(e: _Emitter, dtype: np.dtype):
    if e.get(("dtype", dtype.name)):
        return
    arg, byteorder, elsize, alignment, flags = _DTYPE_PICKLE[dtype]
    e.global_("numpy", "dtype")
    if isinstance(arg, tuple):
        e.global_(*arg)
    else:
        e.string(arg)
    e.op(b"\x89\x88")
    e.tuple_(3)
    e.op(b"R")
    e.memoize(("dtype", dtype.name))
    e.op(b"(")
    e.int_(3)
    e.string(byteorder)
    e.op(b"NNN")
    for v in (elsize, alignment, flags):
        e.int_(v)
    e.tuple_(8, marked=True)
    e.op(b"b")


def _emit_array(e: _Emitter, array: np.ndarray):
    e.global_(*e.reconstruct)
    e.global_("numpy", "ndarray")
    e.int_(0)
    e.tuple_(1)
    if not e.get(("bytes", b"b")):
        e.payload(memoryview(b"b"), key=("bytes", b"b"))
    e.tuple_(3)
    e.op(b"R")
    e.memoize()
    e.op(b"(")
    e.int_(1)
    e.op(b"(" if array.ndim > 3 else b"")
    for n in array.shape:
        e.int_(n)
    e.tuple_(array.ndim, marked=array.ndim > 3)
    _emit_dtype(e, array.dtype)
    e.op(b"\x89")
    e.payload(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
    e.tuple_(5, marked=True)
    e.op(b"b")


def _emit_quantized(e: _Emitter, value: QuantizedWeight8bit):
    e.global_("__main__", "QuantizedWeight8bit")
    e.op(b")\x81")
    e.memoize()
    e.op(b"}")
    e.memoize()
    e.op(b"(")
    for key in ("weight", "scales"):
        e.string(key)
        _emit_array(e, getattr(value, key))
        e.boundary()
    e.op(b"u", b"b")


def tensor_pickle_chunks(value, *, reconstruct=_RECONSTRUCT) -> list:
    """The pickle of `value` as a list of byte chunks (large payloads are zero-copy views)."""
    e = _Emitter(reconstruct)
    if isinstance(value, QuantizedWeight8bit):
        value.validate()
        _emit_quantized(e, value)
    elif isinstance(value, np.ndarray) and value.dtype == np.float32:
        _emit_array(e, value.astype("<f4", copy=False))
    else:
        raise CheckpointError(
            f"can only write a float32 ndarray or a QuantizedWeight8bit, got "
            f"{type(value).__name__} {getattr(value, 'dtype', '')}"
        )
    return e.finish()


def write_tensor(path, value: np.ndarray | QuantizedWeight8bit) -> None:
    """Writes one release tensor file atomically (temp file in the same directory, fsync,
    rename); on any failure the previous file, if any, is left untouched."""
    if sys.byteorder != "little":
        raise CheckpointError("writing release files is only supported on little-endian hosts")
    chunks = tensor_pickle_chunks(value)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)
