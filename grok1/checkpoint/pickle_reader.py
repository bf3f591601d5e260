"""One release tensor file: a protocol-4 pickle of a NumPy array or a `QuantizedWeight8bit`.

The format (SPEC.md §4, §5). Each `ckpt-0/tensorNNNNN_000` file is a pickle whose object graph is

    array  := numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b"b")
              BUILD (1, shape, dtype, False, <raw C-order bytes>)
    dtype  := numpy.dtype("f4" | "i1" | ml_dtypes.bfloat16, False, True)
              BUILD (3, "<" | "|", None, None, None, elsize, alignment, flags)
    file   := array  |  __main__.QuantizedWeight8bit() BUILD {"weight": array, "scales": array}

The raw bytes of each array sit in one BINBYTES / SHORT_BINBYTES / BINBYTES8 payload, so an array's
data is a contiguous byte range of the file.

Safety model. These files come from the internet; plain `pickle.load` would run whatever they
name. We never let a file choose code to run:

1. `_walk` reads the opcodes with our own code, executing nothing and seeking past large
   payloads. It refuses any opcode outside the small set the release uses, any global outside
   `ALLOWED_GLOBALS`, payloads that reach past the end of the file, trailing bytes and streams
   that end early. Its result is an inert tree (`_Global`, `_Apply`, `_Bytes`, tuples, ...).
2. `read_tensor` then unpickles with `_RestrictedUnpickler`, whose `find_class` maps the allowed
   names to our own shims (never to NumPy's functions). The shims check every argument and every
   BUILD state, and rebuild arrays from the raw bytes with `np.frombuffer` into fresh arrays of
   canonical dtypes. NumPy's `dtype.__setstate__` never sees the pickled state, which is what
   corrupts the process-wide bfloat16 dtype under numpy>=2 + ml_dtypes>=0.6 (SPEC.md §5).
3. `open_tensor` matches the inert tree against the grammar above and records each array's
   shape, dtype and byte offset, so that a host can read just its slices (`PickleTensor`).

A file that fails any check raises `CheckpointError`, one line naming the file: "not a valid Grok-1
release tensor file" with the reason, or "truncated" with the bytes it holds and needs.
`pickle_writer.py` writes the format; `release.py` names the files of a checkpoint directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
import os
import pickle
import pickletools
import struct

import numpy as np

from grok1.checkpoint.tensors import (
    BF16,
    CheckpointError,
    MemoryTensor,
    QuantizedWeight8bit,
    TensorReader,
    as_range,
    empty_result,
    is_empty,
    normalize_index,
    relative,
)


class _Refused(Exception):
    """Internal: a reason to refuse a file; `_errors_name` turns it into a `CheckpointError`."""


class _Truncated(_Refused):
    """Internal: the file ends before its contents do."""

    def __init__(self, size: int, needed: int, what: str):
        super().__init__(f"it holds {size} bytes but needs at least {needed} ({what})")


# The globals a release tensor file may name, and the role each plays.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",  # numpy-2 spelling
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("ml_dtypes", "bfloat16"): "bfloat16",
    ("__main__", "QuantizedWeight8bit"): "quantized",
}
# dtype codes `numpy.dtype(code, False, True)` may be called with (plain numeric types only).
_DTYPE_CODES = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")
_DTYPE_BY_CODE = {code: np.dtype(code).newbyteorder("<") for code in _DTYPE_CODES}


def _canonical_dtype(code, *, bfloat16: bool = False) -> np.dtype:
    """A fresh canonical dtype for `numpy.dtype(code)`, or bf16 when the argument was the
    `ml_dtypes.bfloat16` global."""
    if bfloat16:
        return BF16
    if isinstance(code, str) and code in _DTYPE_BY_CODE:
        return _DTYPE_BY_CODE[code]
    shown = code if isinstance(code, (str, int, bytes, type(None))) else type(code).__name__
    raise _Refused(f"numpy.dtype({shown!r}) is not an allowed dtype {_DTYPE_CODES} or bfloat16")


def _check_dtype_args(align, copy) -> None:
    if align is not False or copy is not True:
        raise _Refused(
            f"numpy.dtype called with align={align!r}, copy={copy!r}; expected False, True"
        )


def _check_dtype_state(dtype: np.dtype, state) -> None:
    """Validates a pickled dtype state; its `flags` entry is ignored, never applied."""
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3):
        raise _Refused(f"dtype state {state!r} is not (3, byteorder, None, None, None, ...)")
    _, byteorder, subdescr, names, fields, elsize, alignment, flags = state
    want_order = "|" if dtype.itemsize == 1 else "<"
    if byteorder != want_order or (subdescr, names, fields) != (None, None, None):
        raise _Refused(
            f"dtype {dtype} state {state!r}: expected byteorder {want_order!r}, no fields"
        )
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (elsize, alignment, flags))
    if not ints or elsize not in (-1, dtype.itemsize) or alignment not in (-1, dtype.alignment):
        raise _Refused(f"dtype {dtype} state {state!r} has inconsistent size/alignment")


def _check_array_state(version, shape, fortran, nbytes: int, dtype: np.dtype) -> tuple:
    """Validates the ndarray BUILD state except the dtype; returns the shape as a tuple."""
    if type(version) is not int or version != 1:
        raise _Refused(f"ndarray state version {version!r}; expected 1")
    ok = isinstance(shape, tuple) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    )
    if not ok:
        raise _Refused(f"ndarray shape {shape!r} is not a tuple of non-negative ints")
    if not isinstance(fortran, bool):
        raise _Refused(f"ndarray fortran flag {fortran!r} is not a bool")
    want = math.prod(shape) * dtype.itemsize
    if nbytes != want:
        raise _Refused(
            f"array declares shape {shape} of {dtype} ({want} bytes) but holds {nbytes} bytes"
        )
    return shape


# ---------------------------------------------------------------------------------------------
# 1. The opcode walker: reads the stream, executes nothing, builds an inert tree.
# ---------------------------------------------------------------------------------------------
_MAX_OPS = 10_000  # a release file has < 200 opcodes
_MAX_STR = 1024
_SMALL_BYTES = 256  # payloads up to this size are kept in the tree; larger ones are skipped


@dataclasses.dataclass(eq=False)
class _Global:
    module: str
    name: str

    @property
    def role(self) -> str:
        return ALLOWED_GLOBALS[(self.module, self.name)]


@dataclasses.dataclass(eq=False)
class _Bytes:
    offset: int  # of the first payload byte in the file
    length: int
    value: bytes | None  # kept only for small payloads


@dataclasses.dataclass(eq=False)
class _Apply:
    kind: str  # "call" (REDUCE) or "new" (NEWOBJ)
    func: _Global
    args: tuple
    state: object = None
    built: bool = False


@dataclasses.dataclass(eq=False)
class _Dict:
    items: dict


class _Mark:
    pass


class _Walker:
    """A symbolic pickle machine over the opcodes release files use."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.stack: list = []
        self.memo: dict = {}

    # -- low-level reads --
    def take(self, n: int) -> bytes:
        pos = self.f.tell()
        if pos + n > self.size:
            raise _Truncated(self.size, pos + n, f"the pickle stream ends early, at byte {pos}")
        return self.f.read(n)

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def pop(self):
        if not self.stack or isinstance(self.stack[-1], _Mark):
            raise _Refused("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if isinstance(self.stack[i], _Mark):
                items = self.stack[i + 1 :]
                del self.stack[i:]
                return items
        raise _Refused("MARK expected but not found")

    # -- opcode handlers (return True on STOP) --
    def op_proto(self):
        if not 2 <= self.uint(1) <= 5:
            raise _Refused("unsupported pickle protocol")

    def op_frame(self):
        length, pos = self.uint(8), self.f.tell()
        if pos + length > self.size:
            raise _Truncated(self.size, pos + length, f"a {length}-byte frame at byte {pos}")

    def op_string(self, width: int):
        n = self.uint(width)
        if n > _MAX_STR:
            raise _Refused(f"string of {n} bytes; release files hold only short names")
        try:
            self.stack.append(self.take(n).decode("utf-8"))
        except UnicodeDecodeError:
            raise _Refused("string is not valid UTF-8") from None

    def op_bytes(self, width: int):
        n = self.uint(width)
        offset = self.f.tell()
        if offset + n > self.size:
            raise _Truncated(self.size, offset + n, f"a {n}-byte payload at byte {offset}")
        value = self.take(n) if n <= _SMALL_BYTES else None
        if value is None:
            self.f.seek(n, os.SEEK_CUR)
        self.stack.append(_Bytes(offset, n, value))

    def op_int(self, fmt: str):
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        self.stack.append(value)

    def op_long1(self):
        n = self.uint(1)
        if n > 16:
            raise _Refused("LONG1 integer too large")
        self.stack.append(int.from_bytes(self.take(n), "little", signed=True))

    def op_global_text(self):
        module = self.f.readline(_MAX_STR).rstrip(b"\n")
        name = self.f.readline(_MAX_STR).rstrip(b"\n")
        self.push_global(module.decode("ascii", "replace"), name.decode("ascii", "replace"))

    def op_stack_global(self):
        name, module = self.pop(), self.pop()
        if not (isinstance(module, str) and isinstance(name, str)):
            raise _Refused("STACK_GLOBAL on non-string operands")
        self.push_global(module, name)

    def push_global(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            allowed = sorted(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise _Refused(
                f"refused global {module}.{name}; a release file may only name {allowed}"
            )
        self.stack.append(_Global(module, name))

    def op_apply(self, kind: str):
        args, func = self.pop(), self.pop()
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            raise _Refused(
                f"{'REDUCE' if kind == 'call' else 'NEWOBJ'} on a non-global or non-tuple"
            )
        self.stack.append(_Apply(kind, func, args))

    def op_build(self):
        state = self.pop()
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, _Apply) or target.built:
            raise _Refused(f"BUILD (setstate) on an unexpected object {type(target).__name__}")
        target.state, target.built = state, True

    def op_setitems(self, marked: bool):
        items = self.pop_mark() if marked else [self.pop(), self.pop()][::-1]
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, _Dict) or len(items) % 2:
            raise _Refused("SETITEM(S) on a non-dict")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if not isinstance(key, str):
                raise _Refused("dict key is not a string")
            target.items[key] = value

    def op_memo_put(self, width: int | None):
        index = len(self.memo) if width is None else self.uint(width)
        if not self.stack or isinstance(self.stack[-1], _Mark):
            raise _Refused("memo put with an empty stack")
        self.memo[index] = self.stack[-1]

    def op_memo_get(self, width: int):
        index = self.uint(width)
        if index not in self.memo:
            raise _Refused(f"memo key {index} missing")
        self.stack.append(self.memo[index])

    def op_tuple(self, n: int | None):
        if n is None:
            self.stack.append(tuple(self.pop_mark()))
        else:
            items = [self.pop() for _ in range(n)][::-1]
            self.stack.append(tuple(items))

    def run(self):
        first = self.f.read(8)
        if not first:
            raise _Refused("the file is empty")
        if first[:1] != b"\x80":  # PROTO: every pickle of protocol >= 2 starts with it
            raise _Refused(f"it does not start with a pickle header (first bytes {first!r})")
        self.f.seek(0)
        handlers = _HANDLERS
        for _ in range(_MAX_OPS):
            pos = self.f.tell()
            code = self.take(1)
            if code == b".":
                return self.stop()
            if code not in handlers:
                raise _Refused(f"opcode {_opname(code)} at byte {pos} is not allowed")
            handlers[code](self)
        raise _Refused(f"more than {_MAX_OPS} opcodes; release files have a few hundred")

    def stop(self):
        if len(self.stack) != 1 or isinstance(self.stack[0], _Mark):
            raise _Refused(f"STOP with {len(self.stack)} items on the stack; expected 1")
        if self.f.tell() != self.size:
            raise _Refused(f"{self.size - self.f.tell()} unexpected bytes after STOP")
        return self.stack[0]


def _opname(code: bytes) -> str:
    op = pickletools.code2op.get(code.decode("latin-1"))
    return f"{op.name} ({code!r})" if op else repr(code)


def _handlers() -> dict:
    W = _Walker
    return {
        b"\x80": W.op_proto, b"\x95": W.op_frame, b"\x8c": lambda w: w.op_string(1),
        b"X": lambda w: w.op_string(4), b"C": lambda w: w.op_bytes(1),
        b"B": lambda w: w.op_bytes(4), b"\x8e": lambda w: w.op_bytes(8),
        b"J": lambda w: w.op_int("<i"), b"K": lambda w: w.op_int("<B"),
        b"M": lambda w: w.op_int("<H"), b"\x8a": W.op_long1,
        b"N": lambda w: w.stack.append(None), b"\x88": lambda w: w.stack.append(True),
        b"\x89": lambda w: w.stack.append(False), b"(": lambda w: w.stack.append(_Mark()),
        b")": lambda w: w.stack.append(()), b"\x85": lambda w: w.op_tuple(1),
        b"\x86": lambda w: w.op_tuple(2), b"\x87": lambda w: w.op_tuple(3),
        b"t": lambda w: w.op_tuple(None), b"}": lambda w: w.stack.append(_Dict({})),
        b"s": lambda w: w.op_setitems(False), b"u": lambda w: w.op_setitems(True),
        b"\x94": lambda w: w.op_memo_put(None), b"q": lambda w: w.op_memo_put(1),
        b"r": lambda w: w.op_memo_put(4), b"h": lambda w: w.op_memo_get(1),
        b"j": lambda w: w.op_memo_get(4), b"\x93": W.op_stack_global,
        b"c": W.op_global_text, b"R": lambda w: w.op_apply("call"),
        b"\x81": lambda w: w.op_apply("new"), b"b": W.op_build,
    }  # fmt: skip


_HANDLERS = _handlers()


def _open_raw(path):
    """Every read of a tensor file goes through here (a seam for tests that count bytes)."""
    return open(path, "rb", buffering=0)


def _open_buffered(path):
    return io.BufferedReader(_open_raw(path))


def _walk(f, size: int):
    """Walks the whole stream from the start; returns the inert tree or raises `_Refused`."""
    f.seek(0)
    return _Walker(f, size).run()


# ---------------------------------------------------------------------------------------------
# 2. The restricted unpickler: allowed names resolve to checking shims, never to NumPy.
# ---------------------------------------------------------------------------------------------
class _Shim:
    """Base of every object a file can reach; refuses BUILD (setstate) by default."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"BUILD (setstate) on {type(self).__name__[1:]} is not allowed")


class _Token(_Shim):
    """Stands for `numpy.ndarray` or `ml_dtypes.bfloat16`: can be passed, not called."""

    __slots__ = ("role",)

    def __init__(self, role: str):
        self.role = role


class _DtypeStub(_Shim):
    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        _check_dtype_state(self.dtype, state)  # validated, then dropped


class _ArrayStub(_Shim):
    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if self.array is not None or not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("ndarray state must be applied once, as a 5-tuple")
        version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, bytes):
            raise _Refused("ndarray state needs a numpy.dtype and raw bytes")
        shape = _check_array_state(version, shape, fortran, len(raw), dtype.dtype)
        flat = np.frombuffer(raw, dtype=dtype.dtype)
        self.array = np.array(flat.reshape(shape, order="F" if fortran else "C"), order="C")


class _Reconstruct(_Shim):
    __slots__ = ()

    def __call__(self, cls=None, shape=None, typecode=None):
        if not (isinstance(cls, _Token) and cls.role == "ndarray"):
            raise _Refused(f"_reconstruct called with class {cls!r}; only numpy.ndarray is allowed")
        if shape != (0,) or typecode != b"b":
            raise _Refused(f"_reconstruct called with ({shape!r}, {typecode!r})")
        return _ArrayStub()


class _DtypeShim(_Shim):
    __slots__ = ()

    def __call__(self, obj=None, align=None, copy=None):
        _check_dtype_args(align, copy)
        bf16 = isinstance(obj, _Token) and obj.role == "bfloat16"
        return _DtypeStub(_canonical_dtype(obj, bfloat16=bf16))


class _QuantizedStub:
    """What `__main__.QuantizedWeight8bit` resolves to: NEWOBJ makes it, BUILD fills it."""

    __slots__ = ("value",)

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _Refused("QuantizedWeight8bit takes no constructor arguments")
        self = object.__new__(cls)
        self.value = None
        return self

    def __setstate__(self, state):
        if self.value is not None or not isinstance(state, dict):
            raise _Refused("QuantizedWeight8bit state must be one dict, applied once")
        if set(state) != {"weight", "scales"}:
            raise _Refused(
                f"QuantizedWeight8bit state keys {sorted(state)}; expected weight, scales"
            )
        arrays = [state[k] for k in ("weight", "scales")]
        if not all(isinstance(a, _ArrayStub) and a.array is not None for a in arrays):
            raise _Refused("QuantizedWeight8bit weight/scales must be numpy arrays")
        self.value = QuantizedWeight8bit(arrays[0].array, arrays[1].array)


_SHIMS = {
    "reconstruct": _Reconstruct(),
    "ndarray": _Token("ndarray"),
    "dtype": _DtypeShim(),
    "bfloat16": _Token("bfloat16"),
    "quantized": _QuantizedStub,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        role = ALLOWED_GLOBALS.get((module, name))
        if role is None:
            raise _Refused(f"refused global {module}.{name}")
        return _SHIMS[role]

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not allowed")


def _finalize(obj):
    if isinstance(obj, _ArrayStub) and obj.array is not None:
        return obj.array
    if isinstance(obj, _QuantizedStub) and obj.value is not None:
        return obj.value
    raise _Refused(
        f"top-level object is {type(obj).__name__}; expected a numpy array or QuantizedWeight8bit"
    )


@contextlib.contextmanager
def _errors_name(path):
    """Turns any failure while reading `path` into a one-line `CheckpointError` naming the file."""
    try:
        yield
    except (OSError, MemoryError):
        raise
    except _Truncated as e:
        raise CheckpointError(f"{os.fspath(path)} is truncated: {e}. Re-download it") from None
    except Exception as e:  # _Refused, CheckpointError, or anything the unpickler raises
        known = isinstance(e, (_Refused, CheckpointError))
        reason = str(e) if known else f"{type(e).__name__}: {e}"
        raise CheckpointError(_not_a_tensor_file(path, reason)) from None


def _not_a_tensor_file(path, reason: str) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    reason = reason.replace("\n", " ")
    return (
        f"{path} is not a valid Grok-1 release tensor file (a protocol-4 pickle of a NumPy array "
        f"or QuantizedWeight8bit): {reason}. Re-download it, or check that {folder} holds the "
        f"release's tensor files"
    )


def read_tensor(path) -> np.ndarray | QuantizedWeight8bit:
    """Reads a whole tensor file safely: a fresh ndarray or a `QuantizedWeight8bit`.

    Holds the file's payload in memory twice for a moment; for large files prefer
    `open_tensor(path).read(...)`, which reads straight into the result.
    """
    with _errors_name(path), _open_buffered(path) as f:
        _walk(f, os.fstat(f.fileno()).st_size)
        f.seek(0)
        return _finalize(_RestrictedUnpickler(f).load())


# ---------------------------------------------------------------------------------------------
# 3. Lazy, sliced reading from the walked tree.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ArrayLayout:
    """Where one array's raw C-order bytes are in a tensor file."""

    shape: tuple
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Unsupported(Exception):
    """Internal: the tree is not the simple layout; fall back to a full read."""


def _need(condition: bool):
    if not condition:
        raise _Unsupported


def _is_role(node, role: str) -> bool:
    return isinstance(node, _Global) and node.role == role


def _match_dtype(node) -> np.dtype:
    _need(isinstance(node, _Apply) and node.kind == "call" and _is_role(node.func, "dtype"))
    _need(len(node.args) == 3)
    obj, align, copy = node.args
    _check_dtype_args(align, copy)
    dtype = _canonical_dtype(obj, bfloat16=_is_role(obj, "bfloat16"))
    if node.built:
        _check_dtype_state(dtype, node.state)
    return dtype


def _match_array(node) -> ArrayLayout:
    _need(isinstance(node, _Apply) and node.kind == "call" and _is_role(node.func, "reconstruct"))
    _need(len(node.args) == 3 and _is_role(node.args[0], "ndarray") and node.args[1] == (0,))
    _need(isinstance(node.args[2], _Bytes) and node.args[2].value == b"b")
    _need(isinstance(node.state, tuple) and len(node.state) == 5)
    version, shape, dtype_node, fortran, raw = node.state
    _need(fortran is False and isinstance(raw, _Bytes))
    dtype = _match_dtype(dtype_node)
    shape = _check_array_state(version, shape, fortran, raw.length, dtype)
    return ArrayLayout(shape, dtype, raw.offset)


def _match_file(tree) -> tuple[str, dict]:
    """(kind, {part: ArrayLayout}) for the simple layouts, else `_Unsupported`."""
    if isinstance(tree, _Apply) and _is_role(tree.func, "reconstruct"):
        return "array", {"array": _match_array(tree)}
    _need(isinstance(tree, _Apply) and tree.kind == "new" and _is_role(tree.func, "quantized"))
    _need(tree.args == () and isinstance(tree.state, _Dict))
    _need(set(tree.state.items) == {"weight", "scales"})
    parts = {k: _match_array(tree.state.items[k]) for k in ("weight", "scales")}
    w, s = parts["weight"], parts["scales"]
    QuantizedWeight8bit.check(w.shape, w.dtype, s.shape, s.dtype)
    return "quantized", parts


_READ_COST = 8 * 1024  # one positioned read costs about as much as reading this many bytes


def _plan(layout: ArrayLayout, sel: list) -> int:
    """Chooses the axis c: loop over the selected indices of axes < c and read, for each, the
    span of axis c that covers its selection (with all later axes whole).

    c = the last axis not selected whole reads exactly the needed bytes; a smaller c reads
    extra bytes in fewer, longer reads. We take the c of least `reads * (_READ_COST + span)`.
    """
    shape, item = layout.shape, layout.dtype.itemsize
    full = [
        isinstance(s, range) and s.step == 1 and len(s) == n
        for s, n in zip(sel, shape, strict=True)
    ]
    last = max([i for i, f in enumerate(full) if not f], default=0)

    def cost(c: int) -> int:
        reads = math.prod(len(as_range(s)) for s in sel[:c])
        r = as_range(sel[c])
        return reads * (_READ_COST + (max(r) - min(r) + 1) * math.prod(shape[c + 1 :]) * item)

    return min(range(last + 1), key=lambda c: (cost(c), c))


def _read_region(f, layout: ArrayLayout, sel: list) -> np.ndarray:
    """Reads the selected region of one array with positioned reads; returns a fresh array."""
    shape, dtype = layout.shape, layout.dtype
    if not shape:
        buf = np.empty((), dtype)
        _read_into(f, layout.offset, buf.reshape(1).view(np.uint8))
        return buf
    c = _plan(layout, sel)
    ranges = [as_range(s) for s in sel]
    lo, hi = min(ranges[c]), max(ranges[c]) + 1
    strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
    buf = np.empty([len(r) for r in ranges[:c]] + [hi - lo] + list(shape[c + 1 :]), dtype)
    rows = buf.reshape(max(1, math.prod(buf.shape[:c])), -1).view(np.uint8)
    for k, combo in enumerate(itertools.product(*ranges[:c])):
        start = sum(i * s for i, s in zip(combo, strides[:c], strict=True)) + lo * strides[c]
        _read_into(f, layout.offset + start * dtype.itemsize, rows[k])
    rest = tuple(relative(s, 0) for s in sel[c + 1 :])
    lead = tuple(0 if isinstance(s, int) else slice(None) for s in sel[:c])
    return np.ascontiguousarray(buf[lead + (relative(sel[c], lo),) + rest])


def _read_into(f, offset: int, out: np.ndarray) -> None:
    view, done = memoryview(out), 0
    f.seek(offset)
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            size = os.fstat(f.fileno()).st_size
            raise _Truncated(size, offset + len(view), f"an array read at byte {offset}")
        done += n


class PickleTensor(TensorReader):
    """A release tensor file mapped by `open_tensor`: each read reopens the file, refuses it if
    it changed since, and reads only the spans of the file its index needs."""

    def __init__(self, path, kind: str, layouts: dict, stamp: tuple):
        super().__init__(path, kind, {k: (v.shape, v.dtype) for k, v in layouts.items()})
        self.layouts, self.stamp = layouts, stamp

    def layout(self, part: str) -> ArrayLayout:
        """Where a part's bytes are in the file."""
        self.part_meta(part)
        return self.layouts[part]

    def read_part(self, part: str, index=None) -> np.ndarray:
        shape, dtype = self.part_meta(part)
        sel = normalize_index(index, shape)
        if is_empty(sel):
            return empty_result(sel, dtype)
        with _errors_name(self.path), _open_raw(self.path) as f:
            if _stamp(f) != self.stamp:
                raise CheckpointError(f"{self.path}: changed since open_tensor; open it again")
            return _read_region(f, self.layouts[part], sel)


def _stamp(f) -> tuple:
    """Identifies one version of an open file (a rewrite changes the inode or mtime)."""
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def open_tensor(path) -> TensorReader:
    """Validates a tensor file's opcodes without running anything and maps its arrays.

    Large payloads are skipped, not read. Files in an unusual but valid layout (e.g. Fortran
    order) are read whole with `read_tensor` and sliced in memory (a `MemoryTensor`).
    """
    with _errors_name(path), _open_buffered(path) as f:
        tree = _walk(f, os.fstat(f.fileno()).st_size)
        stamp = _stamp(f)
        try:
            kind, layouts = _match_file(tree)
        except _Unsupported:
            kind, layouts = None, None
    if layouts is not None:
        return PickleTensor(path, kind, layouts, stamp)
    return MemoryTensor(path, read_tensor(path))
