"""KVCache: its leaves' shapes and storage dtypes, its attention mask against NumPy, its place on a
mesh (abstract meshes: no devices needed), and the row insert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from grok1 import sharding
from grok1.cache import KVCache, insert_row, storage_dtype
from grok1.config import ModelConfig

CONFIG = ModelConfig.tiny(num_layers=3, num_q_heads=16, num_kv_heads=4, key_size=8)


@pytest.mark.parametrize(
    "dtype, stored", [("bfloat16", np.uint16), ("float32", np.float32), (jnp.float16, np.float16)]
)
def test_shapes_and_storage_dtypes(dtype, stored):
    """[L, B, K, S, Dh] keys and values (bf16 kept as its uint16 bits), [B] int32 lengths."""
    cache = KVCache.shapes(CONFIG, 5, 24, dtype)
    assert cache.k.shape == cache.v.shape == (3, 5, 4, 24, 8)
    assert cache.k.dtype == cache.v.dtype == storage_dtype(dtype) == stored
    assert cache.lengths.shape == (5,) and cache.lengths.dtype == np.int32
    assert cache.k.sharding is None and cache.capacity == 24


def test_zeros_is_an_empty_cache_of_those_shapes():
    cache = KVCache.zeros(CONFIG, 2, 16, "bfloat16")
    want = KVCache.shapes(CONFIG, 2, 16, "bfloat16")
    for leaf, spec in zip(jax.tree.leaves(cache), jax.tree.leaves(want), strict=True):
        assert (leaf.shape, leaf.dtype) == (spec.shape, spec.dtype)
        assert not np.asarray(leaf).any()
    assert cache.capacity == 16


def test_attention_mask_matches_numpy():
    """Query at position p of row b sees slot s iff s <= p and s < the row's new length."""
    b, t, kv_len = 4, 3, 12
    new_lengths = np.array([12, 7, 3, 1], np.int32)
    positions = np.stack([n - t + np.arange(t) for n in new_lengths]).astype(np.int32)
    positions[1] += 2  # a chunk of one real token and two padding ones, past the length
    positions[3] = [0, 0, 0]  # a row padded in this step: all its queries at position 0
    want = np.zeros((b, t, kv_len), bool)
    for row in range(b):
        for q in range(t):
            for s in range(kv_len):
                want[row, q, s] = s <= positions[row, q] and s < new_lengths[row]
    cache = KVCache.shapes(CONFIG, b, kv_len, "float32")
    got = cache.attention_mask(jnp.asarray(positions), jnp.asarray(new_lengths), kv_len)
    assert got.shape == (b, t, kv_len) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got), want)
    shorter = cache.attention_mask(jnp.asarray(positions), jnp.asarray(new_lengths), 8)
    np.testing.assert_array_equal(np.asarray(shorter), want[:, :, :8])


@pytest.mark.parametrize(
    "data, model, kv",
    [(1, 1, None), (2, 1, None), (2, 2, "model"), (1, 4, "model"), (2, 8, None), (1, 16, None)],
)
def test_placement_on_a_mesh(data, model, kv):
    """Rows over "data"; the 4 KV heads over "model" while it divides them, whole on every
    device of a larger model axis (each device then holds all heads its query heads read)."""
    mesh = AbstractMesh((data, model), ("data", "model"))
    batch = 4
    cache = KVCache.shapes(CONFIG, batch, 32, "bfloat16", mesh)
    rows = "data" if data > 1 else None
    assert tuple(cache.k.sharding.spec) == (None, rows, kv, None, None)
    assert cache.v.sharding == cache.k.sharding
    assert tuple(cache.lengths.sharding.spec) == (rows,)
    heads = 4 // model if kv else 4
    assert cache.k.sharding.shard_shape(cache.k.shape) == (3, batch // data, heads, 32, 8)
    assert cache.lengths.sharding.shard_shape((batch,)) == (batch // data,)


def test_rows_that_do_not_divide_the_data_axis_are_an_error():
    mesh = AbstractMesh((2, 1), ("data", "model"))
    with pytest.raises(sharding.ShardingError, match=r"k: dimension 'batch' of size 3 .* 'data'"):
        KVCache.shapes(CONFIG, 3, 32, "bfloat16", mesh)


def test_insert_row_copies_one_row_and_leaves_the_others():
    rng = np.random.default_rng(1)
    big = KVCache(
        k=jnp.asarray(rng.normal(size=(3, 4, 4, 6, 8)), jnp.float32),
        v=jnp.asarray(rng.normal(size=(3, 4, 4, 6, 8)), jnp.float32),
        lengths=jnp.asarray([1, 2, 3, 4], jnp.int32),
    )
    row = KVCache(
        k=jnp.asarray(rng.normal(size=(3, 1, 4, 6, 8)), jnp.float32),
        v=jnp.asarray(rng.normal(size=(3, 1, 4, 6, 8)), jnp.float32),
        lengths=jnp.asarray([9], jnp.int32),
    )
    out = jax.jit(insert_row)(big, row, jnp.int32(2))
    for name in ("k", "v"):
        want = np.asarray(getattr(big, name)).copy()
        want[:, 2] = np.asarray(getattr(row, name))[:, 0]
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), want)
    assert np.asarray(out.lengths).tolist() == [1, 2, 9, 4]
