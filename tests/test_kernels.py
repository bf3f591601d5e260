"""The native CPU kernels (`grok1.kernels`: int8 matrix products, attention over the KV cache)
against NumPy references, and the model and engine with and without them."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok1 import kernels
from grok1.config import ModelConfig
from grok1.model import Grok1, WeightFormats
from grok1.numerics import Numerics

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels unavailable: {kernels.status()}"
)


def bf16_round(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def reference(x, q, scales, sel, rounded):
    """x @ W[sel] row by row in float64, W = q * scales per group (rounded to bf16 or not)."""
    m, n_in, n_out = q.shape
    groups = scales.shape[1]
    w = q.astype(np.float32).reshape(m, groups, n_in // groups, n_out)
    w = (w * scales.astype(np.float32)[:, :, None, :]).reshape(m, n_in, n_out)
    if rounded:
        w = bf16_round(w)
    return np.stack([x[r].astype(np.float64) @ w[s].astype(np.float64) for r, s in enumerate(sel)])


def assert_float32_sums_close(actual, expected: np.ndarray):
    """A kernel's float32 sums of exact products against the float64 reference: only the
    rounding of the running sums differs."""
    atol = 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=atol)


def random_problem(rng, rows, m, n_in, n_out, groups):
    x = bf16_round(rng.standard_normal((rows, n_in)))
    q = rng.integers(-127, 128, (m, n_in, n_out)).astype(np.int8)
    scales = rng.uniform(0.004, 0.02, (m, groups, n_out)).astype(ml_dtypes.bfloat16)
    return x, q, scales


@pytest.mark.parametrize(
    "rows,m,n_in,n_out,groups",
    [
        (1, 4, 64, 200, 1),  # one row: 32-column register blocks plus an 8-wide tail
        (2, 4, 96, 64, 8),  # several scale groups, distinct matrices
        (7, 3, 40, 77, 2),  # rows sharing matrices (groups of 4 + remainders), odd widths
        (16, 8, 128, 300, 4),  # more rows than one register group, several tasks per matrix
    ],
)
@pytest.mark.parametrize("rounded", [True, False])
def test_matches_numpy_reference(rows, m, n_in, n_out, groups, rounded):
    rng = np.random.default_rng(rows * 1000 + n_out)
    x, q, scales = random_problem(rng, rows, m, n_in, n_out, groups)
    sel = rng.integers(0, m, rows).astype(np.int32)
    out = jax.jit(kernels.q8_matmul, static_argnames="rounded")(
        jnp.asarray(x), jnp.asarray(q), jnp.asarray(scales), jnp.asarray(sel), rounded=rounded
    )
    assert_float32_sums_close(out, reference(x, q, scales, sel, rounded))


def test_rounding_is_round_to_nearest_even_for_every_int8_and_scale():
    """Every int8 value times every bf16 significand (at several exponents), read back through
    one-hot rows: each dequantised weight must equal bf16(q * s) as XLA's convert rounds it
    (to nearest, ties to even), exhaustively, since the kernel rounds by a float split."""
    q_values = np.arange(-128, 128)
    significands = np.arange(128, 256) / 128.0
    scales = np.concatenate([significands * 2.0**e for e in (-14, -7, 0, 5)])
    q = np.broadcast_to(q_values[:, None], (256, scales.size)).astype(np.int8)[None]
    s = scales.astype(ml_dtypes.bfloat16)[None, None, :]
    x = np.eye(256, dtype=np.float32)
    out = np.asarray(kernels.q8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s),
                                       jnp.zeros((256,), jnp.int32), True))  # fmt: skip
    exact = q_values[:, None].astype(np.float32) * s[0].astype(np.float32)
    np.testing.assert_array_equal(out, bf16_round(exact))
    unrounded = kernels.q8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s),
                                  jnp.zeros((256,), jnp.int32), False)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(unrounded), exact)


def test_selection_past_the_matrices_is_an_error_and_negative_gives_zeros():
    x, q, scales = random_problem(np.random.default_rng(0), 2, 2, 8, 8, 1)
    call = lambda sel: kernels.q8_matmul(  # noqa: E731
        jnp.asarray(x), jnp.asarray(q), jnp.asarray(scales), jnp.array(sel, jnp.int32), True
    )
    with pytest.raises(Exception, match="sel\\[1\\] = 2 is not below 2"):
        jax.block_until_ready(call([0, 2]))
    out = np.asarray(call([-1, 1]))
    np.testing.assert_array_equal(out[0], 0.0)
    assert_float32_sums_close(out[1:], reference(x[1:], q, scales, [1], True))


def random_cache(rng, shape):
    """bf16 values and their uint16 bits, as `grok1.cache` stores them."""
    values = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    return values.astype(np.float32), values.view(np.uint16)


@pytest.mark.parametrize(
    "b,kv,r,s,sc,dh",
    [
        (1, 2, 4, 37, 64, 64),  # one decode step: groups of eight keys plus a remainder
        (3, 1, 6, 128, 130, 16),  # several rows: row blocks of four plus two
        (2, 2, 5, 70, 96, 24),  # a head size with a scalar tail past 16 columns
    ],
)
def test_attention_products_match_numpy(b, kv, r, s, sc, dh):
    rng = np.random.default_rng(s)
    layers, layer = 3, 1
    keys, k_bits = random_cache(rng, (layers, b, kv, sc, dh))
    values, v_bits = random_cache(rng, (layers, b, kv, sc, dh))
    q = bf16_round(rng.standard_normal((b, kv, r, dh)))
    p = bf16_round(rng.uniform(0, 1, (b, kv, r, s)))
    scores = kernels.attend_scores(jnp.asarray(q), jnp.asarray(k_bits), jnp.int32(layer), s)
    expected = np.einsum("bkrd,bksd->bkrs", q.astype(np.float64), keys[layer, :, :, :s])
    assert_float32_sums_close(scores, expected)
    out = kernels.attend_values(jnp.asarray(p), jnp.asarray(v_bits), jnp.int32(layer))
    expected = np.einsum("bkrs,bksd->bkrd", p.astype(np.float64), values[layer, :, :, :s])
    assert_float32_sums_close(out, expected)


@pytest.mark.parametrize("rows,vocab,d", [(1, 700, 64), (9, 300, 20)])
def test_dot_rows_matches_numpy(rows, vocab, d):
    """The unembedding: blocks of table rows per task, eight rows at a time plus remainders; a
    width that is not a multiple of eight takes the scalar path."""
    rng = np.random.default_rng(vocab)
    table, bits = random_cache(rng, (vocab, d))
    x = bf16_round(rng.standard_normal((rows, d)))
    out = kernels.dot_rows(jnp.asarray(x), jnp.asarray(bits))
    expected = x.astype(np.float64) @ table.T.astype(np.float64)
    assert_float32_sums_close(out, expected)


def test_attention_reads_the_named_cache_rows_of_either_dtype():
    """`rows` maps each batch row to a cache row; a float32 cache is read as it is."""
    rng = np.random.default_rng(7)
    layers_, bc, kv, sc, dh, s = 2, 5, 2, 32, 16, 24
    cache = rng.standard_normal((layers_, bc, kv, sc, dh)).astype(np.float32)
    rows = np.array([3, 0, 3], np.int32)
    q = rng.standard_normal((3, kv, 4, dh)).astype(np.float32)
    p = rng.random((3, kv, 4, s)).astype(np.float32)
    for stored in (cache, bf16_round(cache).astype(ml_dtypes.bfloat16).view(np.uint16)):
        values = bf16_round(cache) if stored.dtype == np.uint16 else cache
        got_s = kernels.attend_scores(jnp.asarray(q), jnp.asarray(stored), 1, s, jnp.asarray(rows))
        got_o = kernels.attend_values(jnp.asarray(p), jnp.asarray(stored), 1, jnp.asarray(rows))
        layer = values[1, rows].astype(np.float64)  # [3, Kv, Sc, Dh]
        want_s = np.einsum("bkrd,bksd->bkrs", q, layer[:, :, :s])
        want_o = np.einsum("bkrs,bksd->bkrd", p, layer[:, :, :s])
        assert_float32_sums_close(got_s, want_s)
        assert_float32_sums_close(got_o, want_o)
    table = rng.standard_normal((40, dh)).astype(np.float32)
    x = rng.standard_normal((3, dh)).astype(np.float32)
    assert_float32_sums_close(kernels.dot_rows(jnp.asarray(x), jnp.asarray(table)),
                              x.astype(np.float64) @ table.T)  # fmt: skip


def test_row_sums_and_float32_products_depend_on_each_row_alone():
    """A row's sum or product is the same bits whatever the other rows and with zeros appended;
    and they equal NumPy's up to float32 summation order."""
    rng = np.random.default_rng(8)
    row = rng.standard_normal(37).astype(np.float32)
    alone = kernels.row_sums(jnp.asarray(row[None]))[0]
    others = rng.standard_normal((9, 64)).astype(np.float32)
    others[4, :37], others[4, 37:] = row, 0.0
    np.testing.assert_array_equal(kernels.row_sums(jnp.asarray(others))[4], alone)
    np.testing.assert_allclose(float(alone), row.astype(np.float64).sum(), rtol=1e-6)
    w = rng.standard_normal((3, 37, 20)).astype(np.float32)
    x = rng.standard_normal((6, 37)).astype(np.float32)
    sel = np.array([0, 2, 1, -1, 2, 0], np.int32)
    for rounded in (False, True):
        got = np.asarray(kernels.f32_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sel),
                                            rounded))  # fmt: skip
        ww = bf16_round(w) if rounded else w
        want = np.stack([x[r] @ ww[m] if m >= 0 else np.zeros(20) for r, m in enumerate(sel)])
        assert_float32_sums_close(got, want)
        one = kernels.f32_matmul(jnp.asarray(x[1:2]), jnp.asarray(w), jnp.asarray(sel[1:2]),
                                 rounded)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(one)[0], got[1])


def test_attention_layer_out_of_range_is_an_error():
    cache = jnp.zeros((2, 1, 1, 8, 16), jnp.uint16)
    with pytest.raises(Exception, match="layer 2 is outside"):
        jax.block_until_ready(kernels.attend_scores(jnp.zeros((1, 1, 1, 16)), cache, 2, 8))


CONFIG = ModelConfig.preset("tiny")


@pytest.mark.parametrize("dtype,rounding", [("bfloat16", "release"), ("float32", "release"),
                                            ("bfloat16", "fast")])  # fmt: skip
def test_model_with_kernels_equals_model_without(dtype, rounding):
    formats = WeightFormats.release(CONFIG)
    with_k = Grok1(CONFIG, formats, Numerics(dtype, rounding, kernels=True))
    without = Grok1(CONFIG, formats, Numerics(dtype, rounding))
    assert len(with_k.kernel_matrices()) == 7 and not without.kernel_matrices()
    params = with_k.init(jax.random.PRNGKey(1))
    rng = np.random.default_rng(2)
    # few rows and many; cached steps are below and in tests/test_engine.py, test_golden.py
    shapes = [(3, 5), (2, 40)] if (dtype, rounding) == ("bfloat16", "release") else [(3, 5)]
    for batch, length in shapes:
        tokens = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (batch, length)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
        a = jax.jit(with_k.apply)(params, tokens, positions, mask)[0].astype(jnp.float32)
        b = jax.jit(without.apply)(params, tokens, positions, mask)[0].astype(jnp.float32)
        # the same values up to float32 summation order, which can move a bf16 rounding by 1 ulp
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05, rtol=0.02)
        assert (np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)).mean() > 0.95
        if rounding == "fast":  # unrounded weights: not the release's numbers
            release = Grok1(CONFIG, formats, Numerics(dtype))
            r = jax.jit(release.apply)(params, tokens, positions, mask)[0].astype(jnp.float32)
            assert not np.array_equal(np.asarray(a), np.asarray(r))


def test_cached_steps_with_kernels_equal_steps_without():
    """Prefill then decode through the KV cache: the attention kernel reads the stacked cache
    in place (and the int8 kernel computes the projections); XLA slices and widens it."""
    from grok1.cache import KVCache

    with_k = Grok1(CONFIG, WeightFormats.release(CONFIG), Numerics(kernels=True))
    without = Grok1(CONFIG, WeightFormats.release(CONFIG), Numerics())
    params = with_k.init(jax.random.PRNGKey(3))
    rng = np.random.default_rng(4)
    batch, prompt, capacity, kv_len = 2, 6, 32, 16
    tokens = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (batch, prompt + 2)), jnp.int32)
    results = []
    for model in (with_k, without):
        cache = KVCache.zeros(CONFIG, batch, capacity, model.compute_dtype)
        kv = (cache.k, cache.v)
        step = jax.jit(model.apply, static_argnames="kv_len")
        logits = []
        for start, stop in ((0, prompt), (prompt, prompt + 1), (prompt + 1, prompt + 2)):
            positions = jnp.broadcast_to(jnp.arange(start, stop), (batch, stop - start))
            mask = positions[:, :, None] >= jnp.arange(kv_len)[None, None, :]
            args = (params, tokens[:, start:stop], positions, mask, kv)
            if start == prompt:  # the first decode step
                hlo = step.lower(*args, kv_len=kv_len).as_text()
                assert ("grok1_attend_scores" in hlo) == (model is with_k)
            out, kv = step(*args, kv_len=kv_len)
            logits.append(np.asarray(out.astype(jnp.float32)))
        results.append(np.concatenate(logits, axis=1))
    np.testing.assert_allclose(results[0], results[1], atol=0.05, rtol=0.02)
    assert (results[0].argmax(-1) == results[1].argmax(-1)).mean() > 0.95


def test_disabled_by_environment():
    code = "from grok1 import kernels; print(kernels.available(), kernels.status())"
    env = {**os.environ, "GROK1_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.startswith("False") and "GROK1_CPU_KERNELS=0" in out


def test_unavailable_without_compiler(tmp_path):
    code = "from grok1 import kernels; print(kernels.available(), kernels.status())"
    compiler = str(tmp_path / "no-such-compiler")
    env = {**os.environ, "CXX": compiler, "GROK1_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.startswith("False") and "no-such-compiler" in out
