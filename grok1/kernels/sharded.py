"""The native kernels on a mesh of several devices: each device runs a kernel on its own shard.

The model's program is partitioned by XLA (GSPMD) from the placements of the weights and the KV
cache; every kernel call in it is an island (`jax.shard_map`) in which each device calls the
kernel on the shard it holds. Elementwise work, the cache writes and the moves between islands
stay XLA's, and none of them changes a value.

Batch invariance (`grok1.numerics`) then holds within a mesh:
  * Rows (tokens, or (token, expert slot) pairs) are split over "data" when their number
    divides, else each data shard computes all of them: a kernel computes a row the same way in
    any company, so either gives the same bits.
  * A product whose contracting axis is split over "model" (the attention output and the
    experts' down projection) gives each device a float32 partial sum. The partials are
    gathered and added in device order (`sum_in_device_order`), not all-reduced: an
    all-reduce's order of addition for an element depends on where the element falls in the
    buffer (a ring cuts it into one piece per device), that is on the batch.
  * Attention reads the cache rows of its own data shard; each request's result is taken from
    the shard that holds its cache row.
Different meshes still add in different orders (a partial sum per device), so their numbers
differ in the last bits; a given mesh gives a request the same bits whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def rows_axis(mesh: Mesh, rows: int) -> str | None:
    """ "data" where it splits `rows` rows evenly, else None (every data shard has them all)."""
    data = mesh.shape["data"]
    return "data" if data > 1 and rows % data == 0 else None


def island(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """`fn` run by every device of `mesh` on its shards (`jax.shard_map`)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def sum_in_device_order(x: jax.Array, axis: str = "model") -> jax.Array:
    """The sum of `x` over the devices of a mesh axis, added in device order (0 + 1 + 2 ...):
    every device gets the same bits, whatever the shape of x."""
    parts = jax.lax.all_gather(x, axis)  # [devices, ...], exact
    total = parts[0]
    for i in range(1, parts.shape[0]):
        total = total + parts[i]
    return total


def each_row(kernel: Callable, x: jax.Array, mesh: Mesh, *whole: jax.Array) -> jax.Array:
    """`kernel(rows [R, N], *whole)` -> [R, ...] applied to x [..., N] by every device, with
    `whole` (e.g. a norm's scale)."""
    lead, n = x.shape[:-1], x.shape[-1]
    # every device has every row: the rows (norms, softmaxes) cost little next to the products,
    # and rows split over "data" from an x split over "model" along N (the logits) is a move
    # XLA makes only by first gathering x whole on every device
    whole_specs = (P(), *(P() for _ in whole))
    out = island(kernel, mesh, whole_specs, P())(x.reshape(-1, n), *whole)
    return out.reshape(*lead, *out.shape[1:])


def _axis(spec: P, ndim: int, dim: int):
    """The mesh axis that splits dimension `dim` (negative) of an array of `ndim` dimensions."""
    parts = tuple(spec) + (None,) * (ndim - len(spec))
    return parts[dim]


def matmul(
    product: Callable, x: jax.Array, w: jax.Array, scales: jax.Array | None, sel: jax.Array,
    mesh: Mesh, w_spec: P,
) -> jax.Array:  # fmt: skip
    """`product(x, w, scales, sel)` (row r: x[r] @ W[sel[r]], W the [In, Out] matrices of w
    [..., In, Out] with their leading axes flattened) on a mesh where w is placed as `w_spec`
    and its grouped scales [..., Gs, Out] are whole but for Out (as `grok1.sharding` places
    them). x: [R, In]; sel: [R]. Returns [R, Out] float32, as the placement splits Out.

    Out split over "model": each device computes its columns. In split over "model": each
    device multiplies its slice of x by its rows of W (with their scale groups) and the partial
    sums are added in device order.
    """
    ndim = w.ndim
    lead = [_axis(w_spec, ndim, d) for d in range(ndim - 2)]
    if any(lead):
        raise ValueError(f"the kernels need each matrix whole over its leading axes on a mesh; "
                         f"these weights are placed as {w_spec}")  # fmt: skip
    a_in, a_out = _axis(w_spec, ndim, -2), _axis(w_spec, ndim, -1)
    rows = rows_axis(mesh, x.shape[0])
    split = mesh.shape[a_in] if a_in else 1
    if scales is not None and a_in:
        groups = scales.shape[-2]
        if groups % split and split % groups:
            raise ValueError(f"{groups} scale groups do not align with the {split} devices that "
                             f"split the weights' input dimension {w.shape[-2]}")  # fmt: skip

    def local(x, w, sel, *scales):
        if scales and a_in:  # this device's rows of W: its own scale groups
            groups = scales[0].shape[-2]
            first = jax.lax.axis_index(a_in) * groups // split
            size = max(groups // split, 1)
            scales = (jax.lax.dynamic_slice_in_dim(scales[0], first, size, axis=-2),)
        out = product(x, w, scales[0] if scales else None, sel)
        return sum_in_device_order(out, a_in) if a_in else out

    args, in_specs = [x, w, sel], [P(rows, a_in), w_spec, P(rows)]
    if scales is not None:
        args.append(scales)
        in_specs.append(P(*([None] * (scales.ndim - 1)), a_out))
    return island(local, mesh, tuple(in_specs), P(rows, a_out))(*args)


def dot_rows(kernel: Callable, x: jax.Array, table: jax.Array, mesh: Mesh, table_spec: P):
    """`kernel(x, table)` (x [R, D] @ table[V, D].T) with the table placed as `table_spec`:
    each device computes the columns of its rows of the table. Returns [R, V]."""
    rows = rows_axis(mesh, x.shape[0])
    vocab = _axis(table_spec, 2, 0)
    return island(kernel, mesh, (P(rows), table_spec), P(rows, vocab))(x, table)


def over_cache(
    attend: Callable, q: jax.Array, mask: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
    layer: jax.Array, rows: jax.Array, mesh: Mesh, cache_spec: P,
) -> jax.Array:  # fmt: skip
    """`attend(q, mask, k_cache, v_cache, layer, rows)` over caches [L, Bc, K, Sc, Dh] placed as
    `cache_spec` (rows over "data", KV heads over "model" or whole); q: [B, K, R, Dh] with
    its KV heads split as the cache's; rows: [B] the cache row of each batch row.

    Each data shard attends every query over its own cache rows (a row it does not hold reads
    its last one), and each query's result comes from the shard that holds its row (a row
    past the cache's end, which only ever holds padding, from the last shard).
    """
    a_rows, a_kv = _axis(cache_spec, 5, 1), _axis(cache_spec, 5, 2)

    def local(q, mask, k_cache, v_cache, layer, rows):
        if a_rows is None:
            return attend(q, mask, k_cache, v_cache, layer, rows)
        held = k_cache.shape[1]
        first = jax.lax.axis_index(a_rows) * held
        mine = jnp.clip(rows - first, 0, held - 1)
        out = jax.lax.all_gather(attend(q, mask, k_cache, v_cache, layer, mine), a_rows)
        owner = jnp.clip(rows // held, 0, out.shape[0] - 1)  # [B]
        return out[owner, jnp.arange(rows.shape[0])]

    in_specs = (P(None, a_kv), P(), cache_spec, cache_spec, P(), P())
    return island(local, mesh, in_specs, P(None, a_kv))(q, mask, k_cache, v_cache, layer, rows)
