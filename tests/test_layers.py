"""grok1.layers against NumPy references written here: RMSNorm, RoPE, the grouped int8
dequantisation (SPEC.md §4), the int8 matrix products, and the random initialisers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok1 import kernels, layers
from grok1.numerics import Numerics

BF16 = ml_dtypes.bfloat16
rng = np.random.default_rng(0)
CPU = Numerics()  # XLA's own dots and reductions
# both ways of summing a row: XLA's reductions, and the native kernels' fixed order
NUMERICS = [CPU] + ([Numerics(kernels=True)] if kernels.available() else [])


def test_rms_norm_matches_numpy():
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    scale = rng.normal(size=16).astype(np.float32)
    want = scale * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    for numerics in NUMERICS:
        got = layers.rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-5, numerics)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        got_bf16 = layers.rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale), 1e-5, numerics)
        assert got_bf16.dtype == jnp.bfloat16


def test_rope_half_split_at_an_offset():
    x = rng.normal(size=(1, 3, 2, 8)).astype(np.float32)
    positions = np.array([[5, 6, 7]])
    inv = 1.0 / 10000 ** (np.arange(4) * 2 / 8)
    phase = positions[..., None] * inv
    phase = np.concatenate([phase, phase], -1)[:, :, None, :]
    rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    want = x * np.cos(phase) + rot * np.sin(phase)
    got = layers.rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_grouped_dequantisation_rounds_to_bf16():
    w = rng.integers(-127, 128, size=(3, 8, 5)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, size=(3, 4, 5)).astype(BF16)
    groups = np.repeat(scales.astype(np.float32), 2, axis=1)  # group g covers rows 2g, 2g+1
    want = (w.astype(np.float32) * groups).astype(BF16)
    got = layers.dequantize(jnp.asarray(w), jnp.asarray(scales), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want.astype(np.float32))


def test_row_blocked_matmul_equals_one_block():
    w = rng.integers(-127, 128, size=(64, 24)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, size=(8, 24)).astype(BF16)
    params = {"w": jnp.asarray(w), "scales": jnp.asarray(scales)}
    x = jnp.asarray(rng.normal(size=(3, 64)).astype(np.float32))
    one = layers.matmul(x, params, jnp.float32, jnp.float32, CPU, rounded=True, blocks=1)
    many = layers.matmul(x, params, jnp.float32, jnp.float32, CPU, rounded=True, blocks=16)
    want = np.asarray(x) @ np.asarray(layers.dequantize(params["w"], params["scales"], jnp.float32,
                                                        rounded=True))  # fmt: skip
    np.testing.assert_allclose(np.asarray(one), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(many), want, rtol=1e-5, atol=1e-5)


FOLDED = [(1, 1, jnp.bfloat16), (8, 1, jnp.float32), (8, 16, jnp.bfloat16), (1, 16, jnp.float32)]


@pytest.mark.parametrize("groups,blocks,x_dtype", FOLDED)
def test_unrounded_int8_matmul_applies_the_scales_to_the_sums(groups, blocks, x_dtype):
    """An int8 weight wanted in bf16 but unrounded (rounding="fast") is q * s exactly, and its
    scales multiply each group's sums: no dequantised copy of the weight is formed."""
    w = rng.integers(-127, 128, size=(64, 24)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, size=(groups, 24)).astype(BF16)
    params = {"w": jnp.asarray(w), "scales": jnp.asarray(scales)}
    x = jnp.asarray(rng.normal(size=(3, 64)), x_dtype)
    fn = lambda x: layers.matmul(x, params, jnp.float32, jnp.bfloat16, CPU, False, blocks)  # noqa: E731
    got = np.asarray(fn(x), np.float64)
    exact = np.repeat(scales.astype(np.float64), 64 // groups, axis=0) * w
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    want = x64 @ exact
    rounded = x64 @ exact.astype(np.float32).astype(BF16).astype(np.float64)
    err = np.abs(got - want).max()
    assert err <= 1e-5 * np.abs(want).max(), err
    assert err < np.abs(rounded - want).max() / 10  # the weights really are unrounded
    for eqn in jax.make_jaxpr(fn)(x).eqns:  # the scales multiply the groups' sums only
        if eqn.primitive.name == "mul":
            assert eqn.outvars[0].aval.shape == ((3, 24) if groups == 1 else (3, groups, 24))


def test_large_random_leaves_are_generated_in_slices(monkeypatch):
    """Leaves over `_INIT_SLICE` values (full-width benchmarks) are generated slice by slice:
    same shape, dtype and spread, independent slices (smaller leaves are generated whole)."""
    import haiku as hk

    def init(shape, initializer, dtype):
        f = hk.transform(lambda: hk.get_parameter("w", shape, dtype, init=initializer))
        return np.asarray(jax.jit(f.init)(jax.random.PRNGKey(2))["~"]["w"]).astype(np.float32)

    whole = init((6, 40, 50), layers._int8_init, jnp.int8)
    monkeypatch.setattr(layers, "_INIT_SLICE", 1000)
    sliced = {}
    for shape in [(6, 40, 50), (3, 4, 30, 50)]:  # leading axis split in parts; then recursion
        w = sliced[shape] = init(shape, layers._int8_init, jnp.int8)
        assert w.shape == shape and np.all(np.abs(w) <= 127)
        assert abs(w.std() - layers._INT8_STD) < 1.5 and abs(w.mean()) < 1.0
        first, second = w.reshape(shape[0], -1)[:2]
        assert abs(np.corrcoef(first, second)[0, 1]) < 0.1  # not one slice repeated
    assert not np.array_equal(sliced[(6, 40, 50)], whole)  # the sliced path did run
    table = init((64, 32), layers.normal_init(0.5), jnp.float32)  # 2048 values: two slices
    assert table.shape == (64, 32) and abs(table.std() - 0.5) < 0.05
    assert abs(np.corrcoef(table[:32].ravel(), table[32:].ravel())[0, 1]) < 0.1
