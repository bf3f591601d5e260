"""Mixture of experts: float32 router with raw top-k gates, and experts computed only for the
tokens routed to them.

Shapes: N tokens (B·T flattened), D model width, E experts, k selected experts per token,
F expert hidden size, Gs scale groups. Expert e computes (SPEC.md §2)

    u = f32(round(z @ Wv_e)),  g = gelu_tanh(f32(round(z @ Wg_e))),  o = (u * g) @ f32(Wd_e)

(Wd_e exact, not rounded, for int8 weights under rounding="release"; every int8 W exact under
"fast": see `weight_rounding`)
and a token's output is round(Σ_slots f32(bf16(gate)) * o), `round` being to the activation
dtype and the final one always to bfloat16 (as the release's casts do).

Three dispatch strategies, equal up to float32 summation order:
  * "gather": each (token, slot) gathers its expert's int8 weights; reads k·N experts' bytes, so it
    wins when N·k is small (decode). Steps of more rows (prefill) use auto's choice even when
    "gather" is requested (see `choose_strategy`).
  * "dense": every token through each expert that any token uses, weighted by its gate (0 when
    not selected); reads each used expert once, compute N x used experts. The CPU default
    beyond decode, where ragged dots are slow.
  * "grouped": (token, slot) pairs are sorted by expert and multiplied with `lax.ragged_dot`; every
    expert's weights are read once (prefill, large batches).

Two more paths are chosen by the model rather than the strategy: `experts_kernel` (the native
CPU kernel, for every step when the model uses the kernels: `grok1.numerics`) and
`experts_parallel` (experts split whole over the mesh's "model" axis, `expert_parallel=True`).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grok1 import layers
from grok1.config import ModelConfig
from grok1.numerics import Numerics

F32, BF16 = layers.F32, layers.BF16
STRATEGIES = ("auto", "gather", "dense", "grouped")
GATHER_MAX_ROWS = 64  # (token, slot) rows up to which a requested "gather" is used
ACCELERATOR_GATHER_FACTOR = 4  # on GPU/TPU, auto gathers up to this many rows per expert
MATRICES = ("gate", "up", "down")


def route(
    z: jax.Array, router_w: jax.Array, k: int, numerics: Numerics
) -> tuple[jax.Array, jax.Array]:
    """Top-k routing in float32. z: [N, D]; router_w: [D, E].

    Returns gates [N, k] f32 (the raw softmax probabilities, not renormalised) and expert ids
    [N, k] int32 in decreasing gate order, ties going to the lower expert id.
    """
    if numerics.kernels:  # the product in the kernel's fixed order (batch invariance)
        sel = jnp.zeros(z.shape[:1], jnp.int32)
        whole = jax.sharding.PartitionSpec()  # on a mesh, every device holds the router
        logits = layers.kernel_product(z, router_w.astype(F32)[None], None, sel, False, numerics,
                                       whole)  # fmt: skip
    else:
        logits = layers.dot("nd,de->ne", z.astype(F32), router_w.astype(F32), F32)
    probs = layers.softmax(logits, numerics)
    gates, idx = jax.lax.top_k(probs, k)
    return gates, idx.astype(jnp.int32)


def expert_hidden(u: jax.Array, g: jax.Array) -> jax.Array:
    """The gated hidden activation `u * gelu_tanh(g)` in float32."""
    return u.astype(F32) * jax.nn.gelu(g.astype(F32), approximate=True)


def combine(o: jax.Array, gates: jax.Array, numerics: Numerics) -> jax.Array:
    """o: [N, k, D] f32 expert outputs; gates: [N, k]. Returns [N, D] bf16: the gated outputs
    added in slot order. With the kernels the k gated outputs reach the sum rounded, as written
    (`layers.row_sum`): where XLA:CPU fuses a product into the sum that reads it, it contracts
    the two into a fused multiply-add, and whether it fuses depends on the program's shapes."""
    w = gates.astype(BF16).astype(F32)
    gated = o * w[:, :, None]  # [N, k, D]
    if numerics.kernels:
        return layers.row_sum(jnp.swapaxes(gated, 1, 2), numerics).astype(BF16)
    total = gated[:, 0]
    for j in range(1, o.shape[1]):
        total = total + gated[:, j]
    return total.astype(BF16)


def _blocks(numerics: Numerics) -> int:
    """Row blocks for dequantise-and-multiply (see `layers.matmul`); 1 off CPU."""
    return 16 if numerics.backend == "cpu" else 1


def weight_rounding(raw: dict, dtype, numerics: Numerics) -> dict:
    """The `rounded` argument (`layers.matmul`) of each expert matrix under the model's rounding.

    raw: {"gate", "up", "down": matrix leaves}. Gate and up follow `Numerics.rounded_for`. The
    down projection runs in float32: SPEC.md §2 writes `o = h @ f32(Wd_e)` with
    Wd_e = bf16(bf16(q) * s), but under XLA's default flags the release's compiled program widens
    the bf16 product `q * s` straight into the float32 dot, so that rounding is dropped for int8
    weights ("release", and "fast"); a plain float32 matrix is still cast to bf16 first (bf16
    mode). "strict" keeps the rounding.
    """
    rounded = {n: numerics.rounded_for("scales" in raw[n]) for n in ("gate", "up")}
    strict = numerics.rounding == "strict"
    rounded["down"] = dtype == BF16 and (strict or "scales" not in raw["down"])
    return rounded


def experts_gather(z, idx, gate_p, up_p, down_p, dtype, rounded: dict, numerics: Numerics):
    """z: [N, D]; idx: [N, k]; *_p: raw matrix leaves with a leading [E] axis; rounded: see
    `weight_rounding`. Returns [N, k, D].

    One 2-D product per (token, slot), unrolled (N·k is small here): batched matrix-vector
    products take a slow path on XLA:CPU.
    """
    n, k = idx.shape
    blocks = _blocks(numerics) if n == 1 else 1  # one token: latency; more would bloat it
    rows = []
    for i in range(n):
        x = z[i : i + 1]  # [1, D]
        slots = []
        for j in range(k):
            pick = lambda p: {name: leaf[idx[i, j]] for name, leaf in p.items()}  # noqa: B023
            g = layers.matmul(x, pick(gate_p), dtype, dtype, numerics, rounded["gate"], blocks)
            u = layers.matmul(x, pick(up_p), dtype, dtype, numerics, rounded["up"], blocks)
            h = expert_hidden(u, g)
            o = layers.matmul(h, pick(down_p), F32, F32, numerics, rounded["down"], blocks)
            slots.append(o)  # [1, D]
        rows.append(jnp.stack(slots, axis=1))  # [1, k, D]
    return jnp.concatenate(rows, axis=0)


def experts_dense(z, idx, gates, gate_p, up_p, down_p, dtype, rounded: dict, numerics):
    """See `experts_dense_sum`; the combined output rounded to bf16, [N, D]."""
    args = (gate_p, up_p, down_p, dtype, rounded, numerics)
    return experts_dense_sum(z, idx, gates, *args).astype(BF16)


def experts_dense_sum(z, idx, gates, gate_p, up_p, down_p, dtype, rounded: dict, numerics):
    """Every token through every expert that some token uses, one expert at a time (a loop
    whose unused iterations are skipped), weighted by the token's gate for it (0 if not
    selected). Reads each used expert once; compute grows with N x used experts, which suits
    decode batches and XLA:CPU, whose ragged dots are slow. Returns [N, D] float32 (combined,
    not yet rounded). Slots whose id is outside [0, E) are ignored (expert parallelism).
    """
    n, k = idx.shape
    num_experts = gate_p["w"].shape[0]
    rows = jnp.arange(n)[:, None]
    w = gates.astype(BF16).astype(F32)
    weight = jnp.zeros((n, num_experts), F32).at[rows, idx].add(w, mode="drop")
    used = jnp.zeros((num_experts,), bool).at[idx.reshape(-1)].set(True, mode="drop")

    def expert(e, acc):
        pick = lambda p: {name: leaf[e] for name, leaf in p.items()}  # noqa: E731
        g = layers.matmul(z, pick(gate_p), dtype, dtype, numerics, rounded["gate"])
        u = layers.matmul(z, pick(up_p), dtype, dtype, numerics, rounded["up"])
        h = expert_hidden(u, g)
        o = layers.matmul(h, pick(down_p), F32, F32, numerics, rounded["down"])
        return acc + weight[:, e, None] * o

    body = lambda e, acc: jax.lax.cond(used[e], expert, lambda _, a: a, e, acc)  # noqa: E731
    return jax.lax.fori_loop(0, num_experts, body, jnp.zeros((n, z.shape[-1]), F32))


def experts_parallel(z, idx, gates, gate_p, up_p, down_p, dtype, rounded: dict, numerics, mesh):
    """Expert parallelism: the experts split whole over the mesh's "model" axis.

    Each device runs `experts_dense_sum` over its own E / M experts for every token of its
    "data" shard (the other slots are ignored), and the float32 partial outputs are summed over
    "model" before the one bf16 rounding. A token's two gated outputs are added in float32 either
    way, so the result is what the other strategies compute. Returns [N, D] bf16.
    """
    from jax.sharding import PartitionSpec as P

    per_device = gate_p["w"].shape[0] // mesh.shape["model"]

    def local(z, idx, gates, gate_p, up_p, down_p):
        first = jax.lax.axis_index("model") * per_device
        mine = (idx >= first) & (idx < first + per_device)
        local_idx = jnp.where(mine, idx - first, per_device)  # out of range: ignored
        args = (gate_p, up_p, down_p, dtype, rounded, numerics)
        part = experts_dense_sum(z, local_idx, gates, *args)
        return jax.lax.psum(part, "model")

    tokens = P("data", None)
    by_expert = lambda p: {leaf: P("model") for leaf in p}  # noqa: E731
    specs = (tokens, tokens, tokens, by_expert(gate_p), by_expert(up_p), by_expert(down_p))
    out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tokens, check_vma=False)(
        z, idx, gates, gate_p, up_p, down_p
    )
    return out.astype(BF16)


def experts_grouped(z, idx, gate_p, up_p, down_p, dtype, rounded: dict, numerics=None):
    """Sort (token, slot) pairs by expert and use ragged dots. Same contract as experts_gather
    (`numerics` is not needed: ragged dots have one form on every backend).
    An int8 matrix used unrounded is multiplied as int8 values, its scales applied to each scale
    group's sums (as `layers.matmul` does)."""
    n, k = idx.shape
    num_experts = gate_p["w"].shape[0]
    flat = idx.reshape(-1)  # [N·k]
    order = jnp.argsort(flat, stable=True)
    xs = z[order // k]  # [N·k, D], grouped by expert
    experts = flat[order]  # [N·k], each row's expert
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]

    def rdot(x, w):
        precision = jax.lax.Precision.HIGHEST if F32 in (x.dtype, w.dtype) else None
        return jax.lax.ragged_dot(x, w, sizes, precision=precision, preferred_element_type=F32)

    def product(x, p, out_dtype, weight_dtype, rounded):
        if not layers.folds_scales(p, weight_dtype, rounded):
            return rdot(x, layers.matrix(p, weight_dtype, rounded)).astype(out_dtype)
        q, scales = p["w"], p["scales"]  # [E, In, Out], [E, Gs, Out]
        per = q.shape[1] // scales.shape[1]
        acc = 0.0
        for g in range(scales.shape[1]):
            rows = slice(g * per, (g + 1) * per)
            part = rdot(x[:, rows], q[:, rows].astype(x.dtype))
            acc = acc + part * scales[experts, g].astype(F32)
        return acc.astype(out_dtype)

    g = product(xs, gate_p, dtype, dtype, rounded["gate"])  # [N·k, F]
    u = product(xs, up_p, dtype, dtype, rounded["up"])
    o = product(expert_hidden(u, g), down_p, F32, F32, rounded["down"])  # [N·k, D]
    unsorted = jnp.zeros_like(o).at[order].set(o)
    return unsorted.reshape(n, k, -1)


def experts_kernel(z, idx, stacked: layers.Stacked, dtype, rounded: dict):
    """The native CPU kernel (`grok1.kernels`) on the whole stack of experts.

    z: [N, D]; idx: [N, k]; stacked: holds "gate", "up" and "down" with leading [L, E] axes.
    Each (token, slot) row selects its expert of this layer; rows that select the same expert
    share one pass over its int8 bytes. `rounded`: see `weight_rounding`. Returns
    [N, k, D] float32.
    """
    n, k = idx.shape
    sel = idx.reshape(n * k)
    x = jnp.repeat(z.astype(F32), k, axis=0)  # [N·k, D], row n·k + j is (token n, slot j)
    g = stacked.matmul(x, "gate", sel, dtype, dtype, rounded["gate"])
    u = stacked.matmul(x, "up", sel, dtype, dtype, rounded["up"])
    o = stacked.matmul(expert_hidden(u, g), "down", sel, F32, F32, rounded["down"])
    return o.reshape(n, k, -1)


def choose_strategy(strategy: str, num_tokens: int, k: int, num_experts: int, backend: str) -> str:
    """The strategy for a step of `num_tokens` tokens. "gather" unrolls one product per (token,
    slot) row, each on its own copy of its expert's weights, so past GATHER_MAX_ROWS rows (a
    prefill chunk) a requested "gather" gives way to auto's choice.

    Auto gathers while the rows are at most the experts on CPU, four times the experts on GPU
    and TPU: there each row's products read the int8 weights in place (on GPU as reductions,
    `Numerics.dots_in_f32`), while "grouped" writes and reads back a dequantised copy of every
    expert, several times the bytes of reading them once (docs/performance.md, GPU traffic
    estimates). Beyond, "dense" on CPU and "grouped" elsewhere.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "auto" or (strategy == "gather" and num_tokens * k > GATHER_MAX_ROWS):
        factor = 1 if backend == "cpu" else ACCELERATOR_GATHER_FACTOR
        if num_tokens * k <= num_experts * factor:
            return "gather"
        return "dense" if backend == "cpu" else "grouped"
    return strategy


class MoE(hk.Module):
    """The release's `moe` block plus its `router`: [B, T, D] -> [B, T, D] (bf16)."""

    def __init__(
        self, config: ModelConfig, formats: dict, numerics: Numerics, strategy="auto",
        expert_mesh=None, name="moe",
    ):  # fmt: skip
        super().__init__(name=name)
        self.config = config
        self.formats = formats
        self.numerics = numerics
        self.strategy = strategy
        self.expert_mesh = expert_mesh

    def __call__(self, z: jax.Array, stacked: layers.Stacked | None = None) -> jax.Array:
        """z: [B, T, D]. stacked: None, or `layers.Stacked` holding the expert matrices whole
        (the native kernel path of `Grok1.apply`, for any number of tokens)."""
        c = self.config
        b, t, d = z.shape
        e, f = c.num_experts, c.ffn_size
        router_w = hk.get_parameter(
            "router", (d, e), F32, init=hk.initializers.RandomNormal(0.5 / e**0.5)
        )
        flat = z.reshape(b * t, d)
        gates, idx = route(flat, router_w, c.num_selected_experts, self.numerics)
        if stacked is not None and all(name in stacked.leaves for name in MATRICES):
            rounded = weight_rounding(stacked.leaves, z.dtype, self.numerics)
            o = experts_kernel(flat, idx, stacked, z.dtype, rounded)
            return combine(o, gates, self.numerics).reshape(b, t, d)
        shapes = {"gate": (d, f), "up": (d, f), "down": (f, d)}
        raw = {
            name: layers.Matrix(*shapes[name], self.formats[name], lead=(e,), name=name).params()
            for name in MATRICES
        }
        return self._experts(flat, gates, idx, raw).reshape(b, t, d)

    def _experts(self, flat, gates, idx, raw):
        """[N, D] -> [N, D] bf16 through the chosen pure-JAX strategy."""
        n, k = idx.shape
        strategy = choose_strategy(
            self.strategy, n, k, self.config.num_experts, self.numerics.backend
        )
        rounded = weight_rounding(raw, flat.dtype, self.numerics)
        args = (raw["gate"], raw["up"], raw["down"], flat.dtype, rounded, self.numerics)
        if self.expert_mesh is not None:
            return experts_parallel(flat, idx, gates, *args, self.expert_mesh)
        if strategy == "dense":
            return experts_dense(flat, idx, gates, *args)
        fn = experts_gather if strategy == "gather" else experts_grouped
        return combine(fn(flat, idx, *args), gates, self.numerics)
