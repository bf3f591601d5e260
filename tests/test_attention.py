"""grok1.attention against a NumPy reference written here: capped grouped-query attention with
padding, with XLA's reductions and (where built) the native kernels."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from grok1 import attention, kernels
from grok1.config import ModelConfig
from grok1.numerics import Numerics

rng = np.random.default_rng(0)
# both ways of summing a row: XLA's reductions, and the native kernels' fixed order
NUMERICS = [Numerics()] + ([Numerics(kernels=True)] if kernels.available() else [])


def test_capped_gqa_attention_with_padding():
    config = ModelConfig.tiny(num_q_heads=4, num_kv_heads=2, key_size=8, attn_output_multiplier=1)
    b, t, h, k, dh = 2, 5, 4, 2, 8
    q = rng.normal(size=(b, t, h, dh)).astype(np.float32) * 8  # large: the cap is active
    kk = rng.normal(size=(b, t, k, dh)).astype(np.float32) * 8
    v = rng.normal(size=(b, t, k, dh)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    want = np.zeros((b, t, h, dh))
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ kk[bi, :, hi // 2].T
            s = 30 * np.tanh(s / 30)
            s = np.where(mask[bi], s, -1e30)
            p = np.exp(s - s.max(-1, keepdims=True))
            want[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, hi // 2]
    heads_first = lambda a: jnp.asarray(a).transpose(0, 2, 1, 3)  # noqa: E731  [B, K, S, Dh]
    for numerics in NUMERICS:
        got = attention.attend(jnp.asarray(q), heads_first(kk), heads_first(v),
                               jnp.asarray(mask), config, numerics)  # fmt: skip
        got = np.asarray(got).reshape(b, t, h, dh)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(q[0] @ kk[0, :, 0].T).max() > 30  # the cap mattered
