"""Numerical building blocks: RMSNorm, RoPE, int8 weights with grouped scales, and dots.

Every function reproduces one rounding rule of the release (SPEC.md §2). Shape letters are those of
`grok1.config`; `...` stands for leading axes such as [L] or [E].
"""

from __future__ import annotations

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grok1 import kernels
from grok1.kernels import sharded
from grok1.numerics import Numerics

F32 = jnp.float32
BF16 = jnp.bfloat16


def per_row(kernel, x: jax.Array, numerics: Numerics, *whole: jax.Array) -> jax.Array:
    """`kernel(x, *whole)`, a kernel of x [..., N]'s rows; where the model's kernels run on a
    mesh, every device runs it on all the rows (`grok1.kernels.sharded.each_row`)."""
    if numerics.mesh is None:
        return kernel(x, *whole)
    return sharded.each_row(kernel, x, numerics.mesh, *whole)


def row_sum(x: jax.Array, numerics: Numerics) -> jax.Array:
    """Float32 sums over the last axis of x [..., N]: in the native kernel's fixed order per row
    (batch invariant; `grok1.numerics`) when the kernels are in use, else XLA's reduction."""
    if numerics.kernels:
        return per_row(kernels.row_sums, x, numerics)
    return jnp.sum(x.astype(F32), axis=-1)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, numerics: Numerics, dtype=None):
    """`scale * x / rms(x)` computed in float32 and cast to `dtype` (default: x's). x: [..., D].

    With the kernels (batch invariance) it runs whole in the native kernel: XLA:CPU contracts a
    multiply into the addition that consumes it (a fused multiply-add) only where it fuses the
    two, which depends on the shapes of the whole program, so the residual add that reads a
    norm's output must get it as written."""
    if numerics.kernels:
        norm = lambda x, scale: kernels.rms_norm(x, scale, eps)  # noqa: E731
        return per_row(norm, x, numerics, scale).astype(dtype or x.dtype)
    xf = x.astype(F32)
    mean = (row_sum(jnp.square(xf), numerics) / jnp.float32(x.shape[-1]))[..., None]
    y = xf * jax.lax.rsqrt(mean + eps)
    scale = jnp.expand_dims(scale.astype(F32), tuple(range(y.ndim - 1)))  # [1, ..., 1, D]
    return (scale * y).astype(dtype or x.dtype)


def softmax(x: jax.Array, numerics: Numerics) -> jax.Array:
    """Softmax over the last axis in float32, `exp(x - max) / sum`: whole in the native kernel
    (a fixed order per row) when the kernels are in use."""
    if numerics.kernels:
        return per_row(kernels.softmax, x, numerics)
    x = x.astype(F32)
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def log_softmax(x: jax.Array, numerics: Numerics) -> jax.Array:
    """log(softmax(x)) over the last axis in float32, `x - max - log(sum(exp(x - max)))`: whole
    in the native kernel when the kernels are in use (then the same bits inside any program and
    outside one)."""
    if numerics.kernels:
        return per_row(kernels.log_softmax, x, numerics)
    x = x.astype(F32)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return shifted - jnp.log(row_sum(jnp.exp(shifted), numerics))[..., None]


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding, half-split layout, computed in float32.

    x: [B, T, N, Dh]; positions: [B, T] absolute positions (token index + cache offset).
    """
    dh = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, dh // 2, dtype=F32) * 2.0 / dh))  # [Dh/2]
    phase = positions.astype(F32)[:, :, None] * inv_freq[None, None, :]  # [B, T, Dh/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    xf = x.astype(F32)
    rotated = jnp.concatenate([-xf[..., dh // 2 :], xf[..., : dh // 2]], axis=-1)
    return (xf * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def round_bf16(x: jax.Array) -> jax.Array:
    """bf16(x) (round to nearest even) kept in float32. x: float32, finite.

    Done on the bits, so that no compiler rewrite can drop the rounding (XLA removes an
    f32 -> bf16 -> f32 convert pair when excess precision is allowed, its default).
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, F32)


def to_bf16_bits(x: jax.Array) -> jax.Array:
    """bf16(x) as its uint16 bits: how the KV cache and the kernels' embedding table hold bf16
    (see `grok1.cache.storage_dtype`)."""
    return jax.lax.bitcast_convert_type(x.astype(BF16), jnp.uint16)


def from_bf16_bits(x: jax.Array) -> jax.Array:
    """The bf16 values of uint16 bits (`to_bf16_bits`); any other dtype is returned as is."""
    return jax.lax.bitcast_convert_type(x, BF16) if x.dtype == jnp.uint16 else x


def round_to(x: jax.Array, dtype) -> jax.Array:
    """x (float32) rounded to `dtype`'s precision but kept in float32: `round_bf16` for bf16."""
    return round_bf16(x) if dtype == BF16 else x


def dot(subscripts: str, a: jax.Array, b: jax.Array, out_dtype, widen: bool = False):
    """An einsum accumulated in float32 and rounded once to `out_dtype`.

    Float32 operands use full precision (no TF32 / bf16 passes on accelerators). With `widen`
    (`Numerics.dots_in_f32`), bf16 operands are widened to float32 first: the products of bf16
    values are exact in float32 and the accumulation is float32 either way, so only the
    summation order can differ.
    """
    if widen:
        a, b = a.astype(F32), b.astype(F32)
    precision = jax.lax.Precision.HIGHEST if F32 in (a.dtype, b.dtype) else None
    out = jnp.einsum(subscripts, a, b, preferred_element_type=F32, precision=precision)
    return out.astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class MatrixFormat:
    """How one weight matrix is stored: int8 with `groups` scale groups, or plain float32.

    Attributes:
      groups: number of scale groups along the contracting (second to last) axis; None for a
        plain float32 matrix.
    """

    groups: int | None = 1

    @property
    def quantized(self) -> bool:
        return self.groups is not None


def dequantize(weight: jax.Array, scales: jax.Array, dtype=BF16, rounded=None) -> jax.Array:
    """int8 weight times grouped scales, in `dtype`.

    weight: [..., In, Out] int8; scales: [..., Gs, Out] bf16 with Gs dividing In. For bf16 the
    product is rounded to bfloat16 as in the release (SPEC.md §4). For float32 it is kept exact:
    that is what the release's compiled float32 run computes (XLA drops the intermediate bf16
    rounding there; SPEC.md §2), and what its golden float32 logits show. `rounded` overrides
    this (the bf16 model's float32 expert down-projection uses the rounded weight).
    """
    *lead, n_in, n_out = weight.shape
    groups = scales.shape[-2]
    if n_in % groups:
        raise ValueError(f"{groups} scale groups do not divide the input dimension {n_in}")
    rounded = _rounds(dtype, rounded)
    w = weight.astype(F32).reshape(*lead, groups, n_in // groups, n_out)
    w = w * scales.astype(F32)[..., :, None, :]  # exact: 8-bit x 8-bit significands
    w = w.reshape(*lead, n_in, n_out)
    return (round_bf16(w) if rounded else w).astype(dtype)


def _rounds(dtype, rounded: bool | None) -> bool:
    """Whether an int8 weight wanted in `dtype` is rounded to bf16 (`rounded` overrides)."""
    return dtype != F32 if rounded is None else rounded


def matrix(params: dict, dtype, rounded=None) -> jax.Array:
    """The usable weight in `dtype` from a matrix leaf dict ({"w", "scales"} or {"w"})."""
    if "scales" in params:
        return dequantize(params["w"], params["scales"], dtype, rounded)
    w = params["w"]
    rounded = (dtype != F32 or w.dtype == BF16) if rounded is None else rounded
    if rounded and w.dtype == F32:
        w = round_bf16(w)  # a plain float32 matrix acts as bf16(W) in bf16 mode
    return w.astype(dtype)


def folds_scales(params: dict, weight_dtype, rounded=None) -> bool:
    """Whether `matmul` applies this matrix's scales to the sums: an int8 weight wanted in bf16
    but unrounded (`Numerics.rounded_for`), which is q * s exactly, not a bf16 value."""
    return "scales" in params and weight_dtype != F32 and rounded is False


def matmul(
    x: jax.Array, params: dict, out_dtype, weight_dtype, numerics: Numerics, rounded=None,
    blocks: int = 1,
):  # fmt: skip
    """`x @ matrix(params, weight_dtype, rounded)` accumulated in float32, rounded to out_dtype.

    x: [N, In]. An int8 weight wanted in bf16 but unrounded (`folds_scales`) is not dequantised:
    each scale group's rows multiply x as int8 values (exact in bf16), in one product batched
    over the groups (a plain product for one group: XLA:CPU runs a size-1 batch axis slowly),
    and the group's scales multiply the float32 sums, `sum_g (x_g @ q_g) * s_g`: the products
    with q * s in another summation order (as the CPU kernel computes them).

    With `blocks` > 1 (a multiple of the scale groups, dividing In), any other weight is
    dequantised and multiplied `In / blocks` rows at a time and the partial products summed: on
    CPU each block's float32 copy stays in cache instead of a whole float32 copy of the matrix
    going through memory. Only the float32 summation order differs from `blocks=1`.
    """
    w = params["w"]
    n, n_in = x.shape
    if folds_scales(params, weight_dtype, rounded):
        scales = params["scales"]  # [Gs, Out]
        groups, n_out = scales.shape
        widen = numerics.dots_in_f32(n)
        q = w.astype(F32 if widen else BF16)  # int8 values: exact either way
        if groups == 1:
            return (dot("nd,df->nf", x, q, F32, widen) * scales.astype(F32)).astype(out_dtype)
        q = q.reshape(groups, n_in // groups, n_out)
        xg = x.reshape(n, groups, n_in // groups)
        sums = dot("ngi,gio->ngo", xg, q, F32, widen)  # [N, Gs, Out]
        return jnp.sum(sums * scales[None].astype(F32), axis=1).astype(out_dtype)
    widen = numerics.dots_in_f32(n)
    groups = params["scales"].shape[-2] if "scales" in params else 1
    if blocks <= 1 or n_in % blocks or blocks % groups:
        return dot("nd,df->nf", x, matrix(params, weight_dtype, rounded), out_dtype, widen)
    rows, acc = n_in // blocks, None
    for b in range(blocks):
        part = {"w": w[b * rows : (b + 1) * rows]}
        if "scales" in params:
            g = b * groups // blocks
            part["scales"] = params["scales"][g : g + 1]
        partial = dot("nd,df->nf", x[:, b * rows : (b + 1) * rows],
                      matrix(part, weight_dtype, rounded), F32, widen)  # fmt: skip
        acc = partial if acc is None else acc + partial
    return acc.astype(out_dtype)


def kernel_product(
    x: jax.Array, w: jax.Array, scales: jax.Array | None, sel: jax.Array, rounded: bool,
    numerics: Numerics, spec=None,
) -> jax.Array:  # fmt: skip
    """Row r of the result is `x[r] @ W[sel[r]]` in float32, in the native kernel: W the
    [In, Out] matrices of w [..., In, Out] (int8 with grouped scales [..., Gs, Out], or float32
    with scales None) with the leading axes flattened, each used as bf16 where `rounded`.
    On a mesh (`Numerics.mesh`), `spec` is w's PartitionSpec there (`grok1.kernels.sharded`).
    """

    def product(x, w, scales, sel):
        flat = w.reshape(-1, *w.shape[-2:])
        if scales is None:
            return kernels.f32_matmul(x, flat, sel, rounded)
        return kernels.q8_matmul(x, flat, scales.reshape(-1, *scales.shape[-2:]), sel, rounded)

    x = x.astype(F32)
    if numerics.mesh is None:
        return product(x, w, scales, sel)
    return sharded.matmul(product, x, w, scales, sel, numerics.mesh, spec)


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Matrices handed whole to a layer inside the layer scan, for the native kernels (see
    `Grok1.apply`).

    Attributes:
      leaves: {matrix name: {"w", "scales"} (int8) or {"w"} (float32)} with the leading
        [L, ...] axes of the stack.
      layer: this layer's index (a traced scalar).
      numerics: the model's (`Numerics.mesh`: the kernels run on a mesh).
      specs: on a mesh, {matrix name: the PartitionSpec of its "w"} (else empty).
    """

    leaves: dict
    layer: jax.Array
    numerics: Numerics
    specs: dict = dataclasses.field(default_factory=dict)

    def layer_params(self, name: str) -> dict:
        """This layer's raw leaves of one matrix (a slice read inside the fusions that use it)."""
        return {leaf: a[self.layer] for leaf, a in self.leaves[name].items()}

    def matmul(
        self, x: jax.Array, name: str, index, out_dtype, weight_dtype, rounded=None
    ) -> jax.Array:
        """`layers.matmul` in the native kernel: row r of x [R, In] times this layer's matrix
        `index[r]` (into the axes between [L] and [In, Out]; None for a plain [L, In, Out]
        stack) used in `weight_dtype` (`rounded` as in `dequantize` and `matrix`), accumulated
        in float32 and rounded to out_dtype."""
        leaves = self.leaves[name]
        w = leaves["w"]
        per_layer = int(np.prod(w.shape[1:-2], dtype=np.int64))
        sel = self.layer * per_layer + (0 if index is None else index)
        sel = jnp.broadcast_to(sel, (x.shape[0],)).astype(jnp.int32)
        if "scales" not in leaves:  # a float32 matrix, used as bf16(W) where `matrix` says so
            rounded = (weight_dtype != F32) if rounded is None else rounded
        else:
            rounded = _rounds(weight_dtype, rounded)
        spec = self.specs.get(name)
        y = kernel_product(x, w, leaves.get("scales"), sel, rounded, self.numerics, spec)
        return y.astype(out_dtype)


def compute_constant(value: float, dtype) -> jax.Array:
    """A Python-float multiplier as the release applies it: rounded to the activation dtype."""
    return jnp.asarray(value, dtype=dtype)


class Matrix(hk.Module):
    """A weight matrix parameter: {"w": int8, "scales": bf16} or {"w": float32}.

    `lead` prepends axes such as [E] for stacked experts. Calling returns the weight in a dtype;
    `params()` returns the raw leaves (to gather experts before dequantising them).
    """

    def __init__(self, n_in: int, n_out: int, fmt: MatrixFormat, lead=(), name=None):
        super().__init__(name=name)
        self.shape = (*lead, n_in, n_out)
        self.fmt = fmt

    def params(self) -> dict:
        *lead, n_in, n_out = self.shape
        if not self.fmt.quantized:
            init = hk.initializers.VarianceScaling(1.0, "fan_in", "normal")
            return {"w": hk.get_parameter("w", self.shape, F32, init=init)}
        w = hk.get_parameter("w", self.shape, jnp.int8, init=_int8_init)
        scales_shape = (*lead, self.fmt.groups, n_out)
        scales = hk.get_parameter("scales", scales_shape, BF16, init=_scale_init(n_in))
        return {"w": w, "scales": scales}

    def __call__(self, dtype) -> jax.Array:
        return matrix(self.params(), dtype)


# Random initialisation (tests, demos, benchmarks): int8 values of spread ~42 and scales that give
# each output unit variance for unit-variance inputs.
_INT8_STD = 42.0


# Values generated at once: a larger leaf is generated one slice of its leading axis at a time, so
# that XLA's float32 temporaries (XLA:CPU keeps several copies of what is generated at once) stay a
# few GiB instead of several times the leaf: full-width Grok-1 benchmarks on one device. Every leaf
# of the small configs is generated whole, as before.
_INIT_SLICE = 1 << 28


def _sliced(generate, key, shape: tuple) -> jax.Array:
    """generate(key, shape), or for a large `shape` the same kind of values produced slice by
    slice along the leading axis (recursively) under `lax.map`."""
    size = int(np.prod(shape))
    if size <= _INIT_SLICE or len(shape) < 2:
        return generate(key, shape)
    n = shape[0]
    parts = next((p for p in range(1, n + 1) if n % p == 0 and size // p <= _INIT_SLICE), n)
    keys = jax.random.split(key, parts)
    if parts == n:  # even one index of the leading axis is too large: slice the next axis
        return jax.lax.map(lambda k: _sliced(generate, k, shape[1:]), keys)
    part = (n // parts, *shape[1:])
    return jax.lax.map(lambda k: generate(k, part), keys).reshape(shape)


def normal_init(std: float):
    """A Haiku initializer: N(0, std²) values, generated slice by slice when large."""

    def init(shape, dtype):
        def generate(key, shape):
            return (jax.random.normal(key, shape, F32) * std).astype(dtype)

        return _sliced(generate, hk.next_rng_key(), tuple(shape))

    return init


def _int8_init(shape, dtype):
    def generate(key, shape):
        x = jax.random.normal(key, shape) * _INT8_STD
        return jnp.clip(jnp.round(x), -127, 127).astype(dtype)

    return _sliced(generate, hk.next_rng_key(), tuple(shape))


def _scale_init(n_in: int):
    def init(shape, dtype):  # shape [..., Gs, Out]
        jitter = jax.random.uniform(hk.next_rng_key(), shape, minval=0.8, maxval=1.2)
        return (jitter / (_INT8_STD * n_in**0.5)).astype(dtype)

    return init
