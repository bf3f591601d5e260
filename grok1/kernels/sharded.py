"""The native kernels on a mesh of several devices: each device runs a kernel on its own shard.

The model's program is partitioned by XLA (GSPMD) from the placements of the weights and the KV
cache; every kernel call in it is an island (`jax.shard_map`) in which each device calls the
kernel on the shard it holds. Elementwise work, the cache writes and the moves between islands
stay XLA's, and none of them changes a value.

Batch invariance (`grok1.numerics`) then holds within a mesh:
  * A product's rows (tokens, or (token, expert slot) pairs) are split over "data" when their
    number divides, else each data shard computes all of them; row-wise kernels (norms,
    softmaxes) run whole on every device. A kernel computes a row the same way in any company,
    so each of these gives the same bits.
  * A product whose contracting axis is split over "model" (the attention output and the
    experts' down projection) gives each device a float32 partial sum. The partials are
    gathered and added in device order (`sum_in_device_order`), not all-reduced: an
    all-reduce's order of addition for an element depends on where the element falls in the
    buffer (a ring cuts it into one piece per device), that is on the batch.
  * Attention reads the cache rows of its own data shard; each request's result is taken from
    the shard that holds its cache row.
  * Under expert parallelism (whole experts split over "model") each device multiplies the rows
    routed to its own experts, and each row is taken from the device holding its expert.
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
    """The axis that splits `rows` rows: "data" where it splits them evenly, else None (every
    data shard has them all)."""
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


def _from_owner(out: jax.Array, owner: jax.Array, axis: str) -> jax.Array:
    """Row b of `out` [B, ...] as the device `owner[b]` of `axis` computed it (every device
    computed every row; only the owner's is right), on every device. Exact."""
    parts = jax.lax.all_gather(out, axis)  # [devices, B, ...]
    owner = jnp.clip(owner, 0, parts.shape[0] - 1)
    return parts[owner, jnp.arange(out.shape[0])]


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
    sums are added in device order. The matrices themselves split (experts under expert
    parallelism): see `_whole_matrices`.
    """
    ndim = w.ndim
    lead = [_axis(w_spec, ndim, d) for d in range(ndim - 2)]
    a_in, a_out = _axis(w_spec, ndim, -2), _axis(w_spec, ndim, -1)
    a_whole = lead[-1] if lead else None  # whole matrices split over devices (experts)
    if any(lead[:-1]) or (a_whole and (a_in or a_out)):
        raise ValueError(f"the kernels take matrices split along one axis on a mesh; these "
                         f"weights are placed as {w_spec}")  # fmt: skip
    rows = rows_axis(mesh, x.shape[0])
    split = mesh.shape[a_in] if a_in else 1
    if scales is not None and a_in:
        groups = scales.shape[-2]
        if groups % split and split % groups:
            raise ValueError(f"{groups} scale groups do not align with the {split} devices that "
                             f"split the weights' input dimension {w.shape[-2]}")  # fmt: skip
    if a_whole:
        return _whole_matrices(product, x, w, scales, sel, mesh, w_spec, rows, a_whole)

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


def _whole_matrices(product, x, w, scales, sel, mesh, w_spec, rows, axis):
    """`matmul` where the matrices themselves are split over `axis` (w [..., M, In, Out], M
    split): each device multiplies the rows that select one of its matrices (the others are
    zero rows, which the kernels skip), and each row is taken from the device that holds its
    matrix."""
    per_lead = w.shape[-3]  # matrices per index of the axes before (the layers)

    def local(x, w, sel, *scales):
        held = w.shape[-3]
        first = jax.lax.axis_index(axis) * held
        lead, index = sel // per_lead, sel % per_lead
        mine = (index >= first) & (index < first + held)
        local_sel = jnp.where(mine, lead * held + index - first, -1)
        out = product(x, w, scales[0] if scales else None, local_sel)
        return _from_owner(out, index // held, axis)

    args, in_specs = [x, w, sel], [P(rows), w_spec, P(rows)]
    if scales is not None:
        args.append(scales)
        in_specs.append(P(*([None] * (scales.ndim - 3)), axis))
    return island(local, mesh, tuple(in_specs), P(rows))(*args)


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
        out = attend(q, mask, k_cache, v_cache, layer, mine)
        return _from_owner(out, rows // held, a_rows)

    in_specs = (P(None, a_kv), P(), cache_spec, cache_spec, P(), P())
    return island(local, mesh, in_specs, P(None, a_kv))(q, mask, k_cache, v_cache, layer, rows)
