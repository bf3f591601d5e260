"""What every checkpoint format shares: the error type, the quantized weight, and the reader
interface each format's tensors implement.

A `TensorReader` is one release leaf (SPEC.md §3) opened for partial reads: a plain array
(`kind` "array", one part "array") or an int8 matrix with bf16 scales (`kind` "quantized", parts
"weight" and "scales"). The release's pickle files (`pickle_reader.PickleTensor`), per-host files
(`release.ShardedTensor`), converted safetensors files (`safetensors_format.SafetensorsTensor`)
and in-memory values (`MemoryTensor`) all read the same way, so the loader and the converter do
not care where a leaf comes from.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import os

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
KINDS = {"array": ("array",), "quantized": ("weight", "scales")}  # kind -> its parts


class CheckpointError(ValueError):
    """A checkpoint file or directory is malformed, unsafe, or does not match the config."""


class QuantizedWeight8bit:
    """An int8 matrix with bf16 scales per group of input rows (SPEC.md §4).

    `weight`: int8 [..., In, Out]. `scales`: bfloat16 [..., Gs, Out] where Gs divides In; group g
    covers input rows [g * In/Gs, (g+1) * In/Gs). Our own plain class: nothing is imported from
    `__main__` when reading.
    """

    def __init__(self, weight: np.ndarray, scales: np.ndarray):
        self.weight = weight
        self.scales = scales
        self.validate()

    @staticmethod
    def check(weight_shape, weight_dtype, scales_shape, scales_dtype) -> None:
        """Raises `CheckpointError` unless the shapes/dtypes form a valid quantized weight."""
        w, s = tuple(weight_shape), tuple(scales_shape)
        problem = None
        if np.dtype(weight_dtype) != np.int8 or np.dtype(scales_dtype) != BF16:
            problem = f"dtypes {weight_dtype}/{scales_dtype}; expected int8 weight, bfloat16 scales"
        elif len(w) < 2 or len(s) != len(w):
            problem = "weight and scales must have the same rank >= 2"
        elif s[:-2] != w[:-2] or s[-1] != w[-1]:
            problem = "scales must equal weight's shape except the second-to-last axis"
        elif s[-2] < 1 or w[-2] % s[-2]:
            problem = f"scale groups {s[-2]} do not divide the input dim {w[-2]}"
        if problem:
            raise CheckpointError(f"QuantizedWeight8bit weight {w}, scales {s}: {problem}")

    def validate(self) -> None:
        for name in ("weight", "scales"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise CheckpointError(f"QuantizedWeight8bit.{name} must be a numpy array")
        self.check(self.weight.shape, self.weight.dtype, self.scales.shape, self.scales.dtype)

    @property
    def shape(self) -> tuple:
        return self.weight.shape

    @property
    def num_groups(self) -> int:
        """Gs, the number of scale groups along the input (second-to-last) axis."""
        return self.scales.shape[-2]

    def __repr__(self) -> str:
        return f"QuantizedWeight8bit(weight={self.weight.shape}, scales={self.scales.shape})"


class TensorReader(abc.ABC):
    """One leaf opened for partial reads.

    Attributes:
      path: the file (the first one, for a leaf stored in several), for messages.
      kind: "array" (a plain ndarray) or "quantized" (a QuantizedWeight8bit).
      parts: the arrays inside: ("array",) or ("weight", "scales").
      shape / dtype: of the array, or of the quantized weight.
      scales_shape: the scales' shape (quantized only, else None).

    `read_part(part, index)` returns `part[index]`; `index` is an int, a slice, or a tuple of them
    (NumPy basic indexing, no Ellipsis), and the result is a fresh C-contiguous array holding only
    what was asked for. `read()` returns the whole leaf (an ndarray or a QuantizedWeight8bit).
    """

    def __init__(self, path, kind: str, meta: dict):
        """`meta`: {part: (shape, dtype)} with the parts of `kind`, in order."""
        if kind not in KINDS or tuple(meta) != KINDS[kind]:
            raise CheckpointError(f"{path}: a {kind!r} leaf with parts {list(meta)}")
        self.path, self.kind = os.fspath(path), kind
        self.meta = {part: (tuple(shape), np.dtype(dtype)) for part, (shape, dtype) in meta.items()}
        if kind == "quantized":
            QuantizedWeight8bit.check(*self.meta["weight"], *self.meta["scales"])

    @abc.abstractmethod
    def read_part(self, part: str, index=None) -> np.ndarray:
        """`part[index]` as a fresh C-contiguous array."""

    @property
    def parts(self) -> tuple:
        return tuple(self.meta)

    @property
    def shape(self) -> tuple:
        return self.meta[self.parts[0]][0]

    @property
    def dtype(self) -> np.dtype:
        return self.meta[self.parts[0]][1]

    @property
    def scales_shape(self) -> tuple | None:
        return self.meta["scales"][0] if self.kind == "quantized" else None

    def part_meta(self, part: str) -> tuple:
        """(shape, dtype) of a part; KeyError naming the file for an unknown part."""
        if part not in self.meta:
            raise KeyError(f"{self.path}: no part {part!r}; parts are {self.parts}")
        return self.meta[part]

    def read(self, index=None):
        """`array[index]` for an "array" leaf; the whole QuantizedWeight8bit (index None)."""
        if self.kind == "array":
            return self.read_part("array", index)
        if index is not None:
            raise IndexError(f"{self.path} is quantized: index it with read_weight / read_scales")
        return QuantizedWeight8bit(self.read_part("weight"), self.read_part("scales"))

    def read_weight(self, index=None) -> np.ndarray:
        return self.read_part("weight", index)

    def read_scales(self, index=None) -> np.ndarray:
        return self.read_part("scales", index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.kind}, {self.meta})"


class MemoryTensor(TensorReader):
    """A leaf already held in memory (an ndarray or a QuantizedWeight8bit), read by slicing."""

    def __init__(self, path, value):
        if isinstance(value, QuantizedWeight8bit):
            self.arrays = {"weight": value.weight, "scales": value.scales}
        else:
            self.arrays = {"array": value}
        kind = "quantized" if isinstance(value, QuantizedWeight8bit) else "array"
        super().__init__(path, kind, {k: (v.shape, v.dtype) for k, v in self.arrays.items()})

    def read_part(self, part: str, index=None) -> np.ndarray:
        shape, _ = self.part_meta(part)
        sel = normalize_index(index, shape)
        return np.ascontiguousarray(self.arrays[part][tuple(relative(s, 0) for s in sel)])


# ---------------------------------------------------------------------------------------------
# Index helpers shared by the readers.
# ---------------------------------------------------------------------------------------------
def normalize_index(index, shape: tuple) -> list:
    """Per axis, a `range` of selected positions or an int (a squeezed axis)."""
    if index is None:
        index = ()
    elif not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"index {index} has more entries than the shape {shape}")
    out = []
    for item, n in itertools.zip_longest(index, shape, fillvalue=slice(None)):
        if isinstance(item, slice):
            out.append(range(*item.indices(n)))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item) + (n if item < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {item} is out of bounds for an axis of size {n}")
            out.append(i)
        else:
            raise IndexError(f"only ints and slices may index a tensor, got {item!r}")
    return out


def as_range(sel) -> range:
    """A normalized selection as a range (an int selects one position)."""
    return range(sel, sel + 1) if isinstance(sel, int) else sel


def relative(sel, lo: int):
    """`sel` shifted down by `lo`, as an int or a slice usable on a buffer starting at `lo`."""
    if isinstance(sel, int):
        return sel - lo
    stop = sel.stop - lo
    return slice(sel.start - lo, stop if stop >= 0 else None, sel.step)


def is_empty(sel: list) -> bool:
    return any(isinstance(s, range) and len(s) == 0 for s in sel)


def empty_result(sel: list, dtype) -> np.ndarray:
    return np.empty([len(s) for s in sel if isinstance(s, range)], dtype)


def fsync_directory(directory: str) -> None:
    """Makes a rename or a new file in `directory` durable (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
