"""The KV cache: a small pytree, donated into every jitted step.

Slot s of row b holds the key/value of that row's token at position s, so a row's first
`lengths[b]` slots are its context and everything past them is masked. On a mesh, rows are split
over "data" and KV heads over "model" (`grok1.sharding`'s rules, also for the planner's abstract
cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grok1 import sharding
from grok1.config import ModelConfig

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


def storage_dtype(dtype):
    """How keys and values of the activation dtype are stored: bf16 as its uint16 bits.

    XLA:CPU scatters into a bf16 array by widening the whole array to float32 and back; into
    uint16 it writes in place. `grok1.attention` converts on write and read (bitcasts, exact).
    """
    return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, Dh] keys after RoPE, activation dtype (bf16 as uint16 bits);
    v: jax.Array  # [L, B, K, S, Dh]   heads before slots: attention's dots need no transpose
    lengths: jax.Array  # [B] int32: tokens of context held per row

    @classmethod
    def shapes(cls, config: ModelConfig, batch: int, length: int, dtype, mesh=None) -> KVCache:
        """Each leaf's shape and storage dtype and, given a mesh, its sharding there."""
        kv = (config.num_layers, batch, config.num_kv_heads, length, config.key_size)
        table = {
            "k": (kv, storage_dtype(dtype), CACHE_AXES),
            "v": (kv, storage_dtype(dtype), CACHE_AXES),
            "lengths": ((batch,), jnp.dtype(jnp.int32), ("batch",)),
        }
        placed = {} if mesh is None else sharding.table_shardings(table, config, mesh)
        leaves = {
            key: jax.ShapeDtypeStruct(shape, leaf_dtype, sharding=placed.get(key))
            for key, (shape, leaf_dtype, _) in table.items()
        }
        return cls(**leaves)

    @classmethod
    def shardings(cls, config: ModelConfig, dtype, mesh) -> KVCache:
        """Each leaf's sharding on `mesh`, which does not depend on the cache's size (any batch
        that the mesh's "data" axis divides)."""
        shapes = cls.shapes(config, mesh.shape["data"], 1, dtype, mesh)
        return jax.tree.map(lambda s: s.sharding, shapes)

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int, dtype, mesh=None) -> KVCache:
        """An empty cache, placed on `mesh` as `shapes` says (None: the default device)."""

        def zeros(s: jax.ShapeDtypeStruct) -> jax.Array:
            out = jnp.zeros(s.shape, s.dtype)
            return out if s.sharding is None else jax.device_put(out, s.sharding)

        return jax.tree.map(zeros, cls.shapes(config, batch, length, dtype, mesh))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def attention_mask(self, positions: jax.Array, new_lengths: jax.Array, kv_len: int):
        """[B, T, kv_len] mask: query at `positions` sees slots s <= its position that are
        within the row's context after this step (`new_lengths`)."""
        slots = jnp.arange(kv_len)[None, None, :]
        return (slots <= positions[:, :, None]) & (slots < new_lengths[:, None, None])


def insert_row(cache: KVCache, row: KVCache, slot: jax.Array) -> KVCache:
    """Copies a 1-row cache into row `slot` of a batch cache (jit with the batch cache donated)."""
    put = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, slot, axis=1)
    return KVCache(
        k=put(cache.k, row.k),
        v=put(cache.v, row.v),
        lengths=jax.lax.dynamic_update_slice_in_dim(cache.lengths, row.lengths, slot, axis=0),
    )
