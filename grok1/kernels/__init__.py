"""Native CPU kernels, built on first use with the system C++ compiler.

XLA:CPU turns an int8 weight into float32 in memory before multiplying it, which moves several
bytes per one-byte weight; `q8_matmul.cc` dequantises in registers instead (see that file). It
also widens (and transposes) a layer of the bf16 KV cache into float32 before attention's
products, and reads the tied embedding in float32; `bf16_dots.cc` reads bf16 in place. They are
XLA FFI custom calls, compiled once per machine into one library in a cache directory and
registered with JAX. Everything here is optional: without a compiler, on a non-CPU backend, or
with `GROK1_CPU_KERNELS=0`, `available()` is False and the model uses its pure-JAX paths, which
compute the same values (up to float32 summation order).

Environment: `GROK1_CPU_KERNELS=0` disables the kernels; `GROK1_CACHE_DIR` (default
`$XDG_CACHE_HOME/grok1` or `~/.cache/grok1`) holds the built library; `CXX` names the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32

_HERE = Path(__file__).parent
SOURCES = (_HERE / "q8_matmul.cc", _HERE / "bf16_dots.cc", _HERE / "rows.cc")
HEADERS = (_HERE / "common.h", _HERE / "parallel.h")
TARGETS = {  # custom-call target: the library's handler symbol
    "grok1_q8_matmul": "Grok1Q8Matmul",
    "grok1_attend_scores": "Grok1AttendScores",
    "grok1_attend_values": "Grok1AttendValues",
    "grok1_dot_rows": "Grok1DotRows",
    "grok1_row_sums": "Grok1RowSums",
    "grok1_f32_matmul": "Grok1F32Matmul",
    "grok1_rms_norm": "Grok1RmsNorm",
    "grok1_softmax": "Grok1Softmax",
    "grok1_log_softmax": "Grok1LogSoftmax",
    "grok1_attend_probs": "Grok1AttendProbs",
}

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "library": ctypes.CDLL


def _cache_dir() -> Path:
    if os.environ.get("GROK1_CACHE_DIR"):
        return Path(os.environ["GROK1_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grok1"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux) or the platform string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(cxx: str) -> Path:
    compiler = shlex.split(cxx)  # CXX may carry a launcher or flags, e.g. "ccache g++"
    include = jax.ffi.include_dir()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.read_bytes())
    for part in (include, jax.__version__, version.stdout, _cpu_signature()):
        key.update(part.encode())
    target = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():  # a one-time pause of several seconds: say why
        print(f"[grok1] building the CPU kernels into {target.parent} (once)", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # -ffp-contract=off: the kernel's rounding is a float split that a fused multiply-add
        # would silently undo (GCC contracts even intrinsics by default)
        cmd = [*compiler, "-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared",
               "-fPIC", "-w", "-I", include, *map(str, SOURCES), "-o", tmp]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never see a partial library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for pattern in ("kernels-*.so", "q8_matmul-*.so"):  # builds of older sources or compilers
        for stale in target.parent.glob(pattern):
            if stale != target:
                stale.unlink(missing_ok=True)
    return target


def _load() -> None:
    if os.environ.get("GROK1_CPU_KERNELS", "1") == "0":
        raise RuntimeError("disabled by GROK1_CPU_KERNELS=0")
    library = ctypes.cdll.LoadLibrary(str(_build(os.environ.get("CXX", "c++"))))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    _state["library"] = library


def available() -> bool:
    """Whether the CPU kernels are built and registered (builds them on the first call)."""
    with _lock:
        if "ok" not in _state:
            try:
                _load()
                _state.update(ok=True, reason="")
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                _state.update(ok=False, reason=f"{type(e).__name__}: {e}")
        return _state["ok"]


def status() -> str:
    """A line saying whether the kernels are in use, and why not."""
    return "built and registered" if available() else f"not available ({_state['reason']})"


def q8_matmul(x: jax.Array, q: jax.Array, scales: jax.Array, sel: jax.Array, rounded: bool):
    """Row r of the result is `x[r] @ W[sel[r]]` in float32, `W[m] = q[m] * scales[m]` per group.

    x: [R, I] float32; q: [M, I, O] int8; scales: [M, G, O] bfloat16, G dividing I; sel: [R]
    int32 in [0, M). `rounded` rounds each dequantised weight to bfloat16 first (SPEC.md §4).
    Rows that select the same matrix share one pass over its bytes. CPU only; call
    `available()` first.
    """
    r, o = x.shape[0], q.shape[-1]
    call = jax.ffi.ffi_call("grok1_q8_matmul", jax.ShapeDtypeStruct((r, o), jnp.float32))
    # two-dimensional [M·G, O]: a size-1 group axis (G = 1) would let XLA give the scales a
    # layout of its own choosing and copy them into the call's default one at every step
    scales = scales.reshape(-1, o)
    return call(x.astype(jnp.float32), q, scales, sel.astype(jnp.int32), rounded=bool(rounded))


def _cache_rows(rows, batch: int, cache: jax.Array) -> jax.Array:
    """The cache row of each of `batch` rows, clipped into the cache (default: the identity)."""
    if rows is None:
        return jnp.arange(batch, dtype=jnp.int32)
    return jnp.minimum(jnp.asarray(rows, jnp.int32), cache.shape[1] - 1)


def attend_scores(q: jax.Array, cache: jax.Array, layer, kv_len: int, rows=None) -> jax.Array:
    """`s[b, k, r, j] = q[b, k, r] . K[layer, rows[b], k, j]` for j < kv_len, in float32.

    q: [B, Kv, R, Dh] (cast to float32); cache: [L, Bc, Kv, Sc, Dh] uint16 (bf16 bits, see
    `grok1.cache.storage_dtype`), read in place; layer: int32 scalar; kv_len <= Sc (static);
    rows: [B] cache rows (clipped to [0, Bc); default: b). Returns [B, Kv, R, kv_len]. CPU only;
    call `available()` first.
    """
    b, kv, r, _ = q.shape
    call = jax.ffi.ffi_call("grok1_attend_scores", jax.ShapeDtypeStruct((b, kv, r, kv_len), F32))
    return call(q.astype(F32), cache, jnp.asarray(layer, jnp.int32), _cache_rows(rows, b, cache))


def attend_values(p: jax.Array, cache: jax.Array, layer, rows=None) -> jax.Array:
    """`o[b, k, r] = sum_j p[b, k, r, j] V[layer, rows[b], k, j]` in float32, j < p.shape[-1].

    p: [B, Kv, R, S] (cast to float32); cache: [L, Bc, Kv, Sc, Dh] uint16 (bf16 bits), read in
    place, S <= Sc; layer: int32 scalar; rows as for `attend_scores`. Returns [B, Kv, R, Dh].
    CPU only.
    """
    b, kv, r, _ = p.shape
    dh = cache.shape[-1]
    call = jax.ffi.ffi_call("grok1_attend_values", jax.ShapeDtypeStruct((b, kv, r, dh), F32))
    return call(p.astype(F32), cache, jnp.asarray(layer, jnp.int32), _cache_rows(rows, b, cache))


def dot_rows(x: jax.Array, table: jax.Array) -> jax.Array:
    """`x @ table.T` in float32: x [R, D] (cast to float32), table [V, D] uint16 (bf16 bits) or
    float32.

    The tied unembedding over `Grok1.embedding_table`. CPU only; call `available()` first.
    """
    call = jax.ffi.ffi_call(
        "grok1_dot_rows", jax.ShapeDtypeStruct((x.shape[0], table.shape[0]), F32)
    )
    return call(x.astype(F32), table)


def row_sums(x: jax.Array) -> jax.Array:
    """`x.sum(-1)` in float32 for x [..., N], each row summed in one fixed order (lanes by
    index mod 8, then a fixed tree): a row's sum does not depend on the other rows, and zeros
    appended to a row do not change it. CPU only; call `available()` first."""
    lead, n = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    call = jax.ffi.ffi_call("grok1_row_sums", jax.ShapeDtypeStruct((rows,), F32))
    return call(x.reshape(rows, n).astype(F32)).reshape(lead)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`scale * (x * (1 / sqrt(mean(x**2) + eps)))` over the last axis of x [..., N], in float32,
    each row's sum of squares in `row_sums`' fixed order and every product rounded as written.
    CPU only; call `available()` first."""
    lead, n = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    call = jax.ffi.ffi_call("grok1_rms_norm", jax.ShapeDtypeStruct((rows, n), F32))
    return call(x.reshape(rows, n).astype(F32), scale.astype(F32), eps=np.float32(eps)).reshape(
        x.shape
    )


def _each_row(target: str, x: jax.Array) -> jax.Array:
    lead, n = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), F32))
    return call(x.reshape(rows, n).astype(F32)).reshape(x.shape)


def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis in float32, `exp(x - max) / sum`, the sum in `row_sums`' order.
    CPU only; call `available()` first."""
    return _each_row("grok1_softmax", x)


def log_softmax(x: jax.Array) -> jax.Array:
    """`x - max - log(sum(exp(x - max)))` over the last axis in float32, the sum in `row_sums`'
    order. CPU only; call `available()` first."""
    return _each_row("grok1_log_softmax", x)


def attend_probs(s, mask, mult: float, cap: float, rounded: bool) -> jax.Array:
    """Attention's probabilities from raw scores s [B, Kv, T * G, S] (as `attend_scores` gives
    them: row t * G + g is query token t, head g of the group) and mask [B, T, S] (True: the key
    is seen): `softmax(where(mask, cap * tanh(s' * mult / cap), -1e30))` with s' = bf16(s) and
    the probabilities rounded to bf16 when `rounded` (the release's bf16 mode), in float32
    (SPEC.md §2). CPU only; call `available()` first."""
    b, kv, r, n = s.shape
    call = jax.ffi.ffi_call("grok1_attend_probs", jax.ShapeDtypeStruct(s.shape, F32))
    return call(
        s.astype(F32), mask.astype(bool), mult=np.float32(mult), cap=np.float32(cap),
        round=bool(rounded), group=np.int64(r // mask.shape[1]),
    )  # fmt: skip


def f32_matmul(x: jax.Array, w: jax.Array, sel: jax.Array, rounded: bool) -> jax.Array:
    """Row r of the result is `x[r] @ W[sel[r]]` in float32 (zero where sel[r] < 0), each output
    summed over the inputs in order. x: [R, I]; w: [M, I, O] float32; `rounded` uses each weight
    as bf16(w). CPU only; call `available()` first."""
    call = jax.ffi.ffi_call(
        "grok1_f32_matmul", jax.ShapeDtypeStruct((x.shape[0], w.shape[-1]), F32)
    )
    return call(x.astype(F32), w.astype(F32), sel.astype(jnp.int32), rounded=bool(rounded))
