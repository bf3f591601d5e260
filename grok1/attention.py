"""Grouped-query attention with RoPE, the 30·tanh logit cap, and KV-cache writes.

Shapes: B batch, T new tokens, S attended key slots, H query heads, K KV heads, G = H // K,
Dh head size. Query head j = k * G + g reads KV head k (SPEC.md §1).
"""

from __future__ import annotations

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp

from grok1 import kernels, layers
from grok1.cache import KVCache
from grok1.config import ModelConfig
from grok1.kernels import sharded
from grok1.numerics import Numerics

MASKED_LOGIT = -1e30


def attend(
    q: jax.Array, k, v, mask: jax.Array, config: ModelConfig, numerics: Numerics,
    cached: CachedLayer | None = None,
) -> jax.Array:  # fmt: skip
    """Capped softmax attention. Rounds where the release rounds (SPEC.md §2).

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh], or None with `cached` (the native kernels compute
    the whole attention over one layer of the stacked cache); mask: [B, T, S] bool (True = may
    attend). Returns [B, T, H * Dh] in q's dtype, heads in query-head order.
    """
    b, t, h, dh = q.shape
    kv = config.num_kv_heads
    dtype = q.dtype
    if cached is not None:
        return cached.attend(q, mask, config).astype(dtype)
    widen = numerics.dots_in_f32()
    q = q.reshape(b, t, kv, h // kv, dh)  # [B, T, K, G, Dh]
    s = layers.dot("btkgd,bksd->bkgts", q, k, dtype, widen)  # [B, K, G, T, S]
    s = s.astype(layers.F32) * jnp.float32(config.attn_output_multiplier)
    cap = jnp.float32(config.attn_logit_cap)
    s = cap * jnp.tanh(s / cap)
    s = jnp.where(mask[:, None, None, :, :], s, MASKED_LOGIT)
    p = layers.softmax(s, numerics).astype(dtype)
    o = layers.dot("bkgts,bksd->btkgd", p, v, dtype, widen)  # [B, T, K, G, Dh]
    return o.reshape(b, t, h * dh)


@dataclasses.dataclass(frozen=True)
class CachedLayer:
    """Attention over one layer of the stacked cache in the native CPU kernels: the scores and
    the weighted values read the cache in place (bf16 as its bits, or float32) instead of
    slicing, widening and transposing the layer first (`kernels.attend_scores` /
    `attend_values`), and the probabilities between them are computed whole
    (`kernels.attend_probs`), each row in a fixed order: a query's result depends on its own
    keys only (batch invariance). The values equal XLA's up to float32 summation order and the
    last bit of tanh and exp.

    Attributes: k_cache, v_cache: [L, Bc, K, Sc, Dh] uint16 or float32; layer: scalar; kv_len:
    static; rows: [B] the cache row of each batch row; mesh: None, or the mesh on whose devices
    the kernels run, each over the cache rows and KV heads it holds (`Numerics.mesh`).
    """

    k_cache: jax.Array
    v_cache: jax.Array
    layer: jax.Array
    kv_len: int
    rows: jax.Array
    mesh: jax.sharding.Mesh | None = None

    def attend(self, q: jax.Array, mask: jax.Array, config: ModelConfig) -> jax.Array:
        """q [B, T, H, Dh] in the compute dtype, mask [B, T, S] -> float32 [B, T, H * Dh]."""
        b, t, h, dh = q.shape
        kv = config.num_kv_heads
        # rows of one KV head's group: query token t, head g -> row t * G + g
        q_rows = q.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv, -1, dh)
        rounded = q.dtype == jnp.bfloat16
        mult, cap = config.attn_output_multiplier, config.attn_logit_cap

        def attend(q_rows, mask, k_cache, v_cache, layer, rows):
            s = kernels.attend_scores(q_rows, k_cache, layer, self.kv_len, rows)
            p = kernels.attend_probs(s, mask, mult, cap, rounded)
            return kernels.attend_values(p, v_cache, layer, rows)  # [B, K, T * G, Dh]

        args = (q_rows, mask, self.k_cache, self.v_cache, self.layer, self.rows)
        if self.mesh is None:
            o = attend(*args)
        else:
            dtype = q.dtype  # the activation dtype, which the cache stores
            spec = KVCache.shardings(config, dtype, self.mesh).k.spec
            o = sharded.over_cache(attend, *args, self.mesh, spec)
        if rounded:
            o = o.astype(jnp.bfloat16)
        return o.reshape(b, kv, t, h // kv, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h * dh)


def write_cache(
    cache: jax.Array, new: jax.Array, layer: jax.Array, positions: jax.Array, rows: jax.Array
):
    """Writes new keys or values into one layer of a stacked cache, in place under jit.

    cache: [L, Bc, K, S, Dh] (bf16 stored as uint16 bits: `grok1.cache.storage_dtype`);
    new: [B, T, K, Dh] in the activation dtype; layer: scalar int; positions: [B, T] slots;
    rows: [B] the cache row of each batch row. Writes to rows >= Bc or slots past the end of
    the cache are dropped (they only ever hold padding).
    """
    b, t = positions.shape
    rows = jnp.broadcast_to(rows[:, None], (b, t))
    layer_idx = jnp.broadcast_to(layer, (b, t))
    if cache.dtype == jnp.uint16:
        new = layers.to_bf16_bits(new)
    # the index arrays are split by the K slice, so the updated elements are laid out [B, T, K, Dh]
    return cache.at[layer_idx, rows, :, positions].set(new.astype(cache.dtype), mode="drop")


def read_cache(cache: jax.Array, layer: jax.Array, kv_len: int, dtype, rows) -> jax.Array:
    """The first `kv_len` slots of one layer's cache rows `rows` [B] (clipped to the cache),
    [B, K, kv_len, Dh] in `dtype`."""
    rows = jnp.minimum(rows, cache.shape[1] - 1)
    return layers.from_bf16_bits(cache[layer, rows, :, :kv_len]).astype(dtype)


class Attention(hk.Module):
    """The release's `multi_head_attention`: query/key/value/linear matrices, no biases.

    The output is bf16(o @ Wo) in the compute dtype, except under rounding="release" (and
    "fast") with an int8 `linear` matrix: the release's compiled program (XLA's default flags)
    feeds the float32 dot result straight into the post-attention RMSNorm, so the output is
    returned in float32, unrounded. (With a plain float32 matrix the release's output stays
    rounded.)

    With the native kernels (`Numerics.kernels`, matrices handed over in `stacked`), the
    projections and, over a cache, attention's products run in them for any number of tokens.
    """

    def __init__(self, config: ModelConfig, formats: dict, numerics: Numerics, name="attention"):
        super().__init__(name=name)
        self.config = config
        self.formats = formats
        self.numerics = numerics

    def __call__(self, x, positions, mask, cache=None, stacked=None):
        """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] bool.

        cache: None (keys are this call's tokens, S = T) or a tuple
        (k_cache [L, Bc, K, Sc, Dh], v_cache, layer, kv_len, rows) where kv_len is the static
        number of leading slots to attend over (S = kv_len) and rows [B] the cache row of each
        batch row. stacked: None or `layers.Stacked` holding
        some of this module's matrices whole (the CPU kernel path of `Grok1.apply`).
        Returns (out [B, T, D], (k_cache, v_cache)).
        """
        c = self.config
        dtype = x.dtype

        def project(name, x, n_out, out_dtype=dtype):  # a closure: a method would get a
            b, t, n_in = x.shape  # "~_method" Haiku scope
            flat = x.reshape(b * t, n_in)
            rounded = self.numerics.rounded_for(self.formats[name].quantized)
            if stacked is not None and name in stacked.leaves:
                y = stacked.matmul(flat.astype(layers.F32), name, None, out_dtype, dtype, rounded)
                return y.reshape(b, t, n_out)
            params = layers.Matrix(n_in, n_out, self.formats[name], name=name).params()
            y = layers.matmul(flat, params, out_dtype, dtype, self.numerics, rounded)
            return y.reshape(b, t, n_out)

        b, t, d = x.shape
        q = project("query", x, c.num_q_heads * c.key_size)
        k = project("key", x, c.num_kv_heads * c.key_size)
        v = project("value", x, c.num_kv_heads * c.key_size)
        q = layers.rope(q.reshape(b, t, c.num_q_heads, c.key_size), positions, c.rope_base)
        k = layers.rope(k.reshape(b, t, c.num_kv_heads, c.key_size), positions, c.rope_base)
        v = v.reshape(b, t, c.num_kv_heads, c.key_size)
        new_cache = cached = None
        if cache is not None:
            k_cache, v_cache, layer, kv_len, rows = cache
            k_cache = write_cache(k_cache, k, layer, positions, rows)
            v_cache = write_cache(v_cache, v, layer, positions, rows)
            new_cache = (k_cache, v_cache)
            if self.numerics.kernels:
                cached = CachedLayer(k_cache, v_cache, layer, kv_len, rows, self.numerics.mesh)
                k = v = None
            else:
                k = read_cache(k_cache, layer, kv_len, dtype, rows)
                v = read_cache(v_cache, layer, kv_len, dtype, rows)
        else:  # the keys are this call's tokens
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        o = attend(q, k, v, mask, c, self.numerics, cached)
        unrounded = self.numerics.rounding != "strict" and self.formats["linear"].quantized
        return project("linear", o, d, layers.F32 if unrounded else dtype), new_cache
