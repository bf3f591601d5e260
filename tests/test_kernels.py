"""The native CPU int8 kernel (`grok1.kernels`) against a NumPy reference, and the model and
engine with and without it."""

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


def random_problem(rng, rows, m, n_in, n_out, groups):
    x = bf16_round(rng.standard_normal((rows, n_in)))
    q = rng.integers(-127, 128, (m, n_in, n_out)).astype(np.int8)
    scales = rng.uniform(0.004, 0.02, (m, groups, n_out)).astype(ml_dtypes.bfloat16)
    return x, q, scales


@pytest.mark.parametrize(
    "rows,m,n_in,n_out,groups",
    [
        (1, 4, 64, 200, 1),  # one row: 64-column register blocks plus 8-wide and scalar tails
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
    expected = reference(x, q, scales, sel, rounded)
    # float32 accumulation of exact products: only rounding of the running sum differs
    atol = 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=atol)


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


def test_selection_out_of_range_is_an_error():
    x, q, scales = random_problem(np.random.default_rng(0), 1, 2, 8, 8, 1)
    with pytest.raises(Exception, match="outside"):
        jax.block_until_ready(
            kernels.q8_matmul(
                jnp.asarray(x), jnp.asarray(q), jnp.asarray(scales), jnp.array([2], jnp.int32), True
            )  # fmt: skip
        )


CONFIG = ModelConfig.preset("tiny")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_model_with_kernels_equals_model_without(dtype):
    with_k = Grok1(CONFIG, WeightFormats.release(CONFIG), dtype=dtype)
    without = Grok1(CONFIG, WeightFormats.release(CONFIG), dtype=dtype, cpu_kernels=False)
    assert len(with_k.kernel_matrices()) == 7 and not without.kernel_matrices()
    params = with_k.init(jax.random.PRNGKey(1))
    rng = np.random.default_rng(2)
    # rows within KERNEL_MAX_ROWS (the kernel), and past it (XLA on the whole stacks' slices);
    # one-token decode steps go through the kernel in tests/test_engine.py and test_golden.py
    shapes = [(3, 5), (2, 40)] if dtype == "bfloat16" else [(3, 5)]
    for batch, length in shapes:
        tokens = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (batch, length)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
        a = jax.jit(with_k.apply)(params, tokens, positions, mask)[0].astype(jnp.float32)
        b = jax.jit(without.apply)(params, tokens, positions, mask)[0].astype(jnp.float32)
        # the same values up to float32 summation order, which can move a bf16 rounding by 1 ulp
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05, rtol=0.02)
        assert (np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)).mean() > 0.95


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
