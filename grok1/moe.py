"""Mixture of experts: float32 router with raw top-k gates, and experts computed only for the
tokens routed to them.

Shapes: N tokens (B·T flattened), D model width, E experts, k selected experts per token,
F expert hidden size, Gs scale groups. Expert e computes (SPEC.md §2)

    u = f32(round(z @ Wv_e)),  g = gelu_tanh(f32(round(z @ Wg_e))),  o = (u * g) @ f32(Wd_e)

and a token's output is round(Σ_slots f32(bf16(gate)) * o), `round` being to the activation
dtype and the final one always to bfloat16 (as the release's casts do).

Two dispatch strategies, numerically identical:
  * "gather": each (token, slot) gathers its expert's int8 weights; reads k·N experts' bytes, so it
    wins when N·k is small (decode).
  * "grouped": (token, slot) pairs are sorted by expert and multiplied with `lax.ragged_dot`; every
    expert's weights are read once (prefill, large batches).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grok1 import layers
from grok1.config import ModelConfig

F32, BF16 = layers.F32, layers.BF16
STRATEGIES = ("auto", "gather", "grouped")


def route(z: jax.Array, router_w: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k routing in float32. z: [N, D]; router_w: [D, E].

    Returns gates [N, k] f32 (the raw softmax probabilities, not renormalised) and expert ids
    [N, k] int32 in decreasing gate order, ties going to the lower expert id.
    """
    logits = layers.dot("nd,de->ne", z.astype(F32), router_w.astype(F32), F32)
    probs = jax.nn.softmax(logits, axis=-1)
    gates, idx = jax.lax.top_k(probs, k)
    return gates, idx.astype(jnp.int32)


def expert_hidden(u: jax.Array, g: jax.Array) -> jax.Array:
    """The gated hidden activation `u * gelu_tanh(g)` in float32."""
    return u.astype(F32) * jax.nn.gelu(g.astype(F32), approximate=True)


def combine(o: jax.Array, gates: jax.Array) -> jax.Array:
    """o: [N, k, D] f32 expert outputs; gates: [N, k]. Returns [N, D] bf16."""
    w = gates.astype(BF16).astype(F32)
    return jnp.einsum("nkd,nk->nd", o, w, precision=jax.lax.Precision.HIGHEST).astype(BF16)


def _round_to_bf16_in_f32(x: jax.Array) -> jax.Array:
    """bf16(x) (round to nearest even) kept in float32, done on the bits so that no compiler
    "excess precision" rewrite can skip the rounding. x: float32, finite."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, F32)


def _gathered_f32(p: dict, idx: jax.Array, rounded: bool) -> jax.Array:
    """The selected experts' weights [N, k, In, Out] in float32 with the values of
    `layers.matrix(p, F32 or BF16, rounded)`: int8 times scales (rounded to bf16 if `rounded`);
    a plain float32 matrix rounded to bf16 if `rounded`.

    XLA:CPU neither fuses a convert into a dot nor runs bf16 dots natively: one elementwise
    fusion from the gathered int8 leaves into an f32 operand is several times faster than
    materialising bf16 copies, and a dot of these (bf16-exact) values accumulates in f32 anyway.
    """
    w = p["w"][idx].astype(F32)  # [N, k, In, Out]
    if "scales" in p:
        s = p["scales"][idx].astype(F32)  # [N, k, Gs, Out]
        *lead, n_in, n_out = w.shape
        groups = s.shape[-2]
        w = w.reshape(*lead, groups, n_in // groups, n_out) * s[..., :, None, :]  # exact in f32
        w = w.reshape(*lead, n_in, n_out)
    return _round_to_bf16_in_f32(w) if rounded else w


def experts_gather(z, idx, gate_p, up_p, down_p, dtype):
    """z: [N, D]; idx: [N, k]; *_p: raw matrix leaves with a leading [E] axis. Returns [N, k, D]."""
    zf = z.astype(F32)  # exact; the dots accumulate in f32 and round once to `dtype`
    bf16_mode = dtype == BF16
    w_gate = _gathered_f32(gate_p, idx, bf16_mode)  # [N, k, D, F]
    w_up = _gathered_f32(up_p, idx, bf16_mode)
    # down: like layers.matrix(..., F32, rounded=bf16_mode), which leaves plain f32 leaves exact
    w_down = _gathered_f32(down_p, idx, bf16_mode and "scales" in down_p)  # [N, k, F, D]
    g = layers.dot("nd,nkdf->nkf", zf, w_gate, dtype)
    u = layers.dot("nd,nkdf->nkf", zf, w_up, dtype)
    return layers.dot("nkf,nkfd->nkd", expert_hidden(u, g), w_down, F32)


def experts_grouped(z, idx, gate_p, up_p, down_p, dtype):
    """Sort (token, slot) pairs by expert and use ragged dots. Same contract as experts_gather."""
    n, k = idx.shape
    num_experts = gate_p["w"].shape[0]
    flat = idx.reshape(-1)  # [N·k]
    order = jnp.argsort(flat, stable=True)
    xs = z[order // k]  # [N·k, D], grouped by expert
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]

    def rdot(x, w, out_dtype):
        precision = jax.lax.Precision.HIGHEST if F32 in (x.dtype, w.dtype) else None
        out = jax.lax.ragged_dot(x, w, sizes, precision=precision, preferred_element_type=F32)
        return out.astype(out_dtype)

    g = rdot(xs, layers.matrix(gate_p, dtype), dtype)  # [N·k, F]
    u = rdot(xs, layers.matrix(up_p, dtype), dtype)
    w_down = layers.matrix(down_p, F32, rounded=dtype == BF16)
    o = rdot(expert_hidden(u, g), w_down, F32)  # [N·k, D]
    unsorted = jnp.zeros_like(o).at[order].set(o)
    return unsorted.reshape(n, k, -1)


def choose_strategy(strategy: str, num_tokens: int, k: int, num_experts: int) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "auto":
        return "gather" if num_tokens * k <= num_experts else "grouped"
    return strategy


class MoE(hk.Module):
    """The release's `moe` block plus its `router`: [B, T, D] -> [B, T, D] (bf16)."""

    def __init__(self, config: ModelConfig, formats: dict, strategy="auto", name="moe"):
        super().__init__(name=name)
        self.config = config
        self.formats = formats
        self.strategy = strategy

    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        b, t, d = z.shape
        e, f = c.num_experts, c.ffn_size
        router_w = hk.get_parameter(
            "router", (d, e), F32, init=hk.initializers.RandomNormal(0.5 / e**0.5)
        )
        flat = z.reshape(b * t, d)
        gates, idx = route(flat, router_w, c.num_selected_experts)
        mats = {
            "gate": layers.Matrix(d, f, self.formats["gate"], lead=(e,), name="gate"),
            "up": layers.Matrix(d, f, self.formats["up"], lead=(e,), name="up"),
            "down": layers.Matrix(f, d, self.formats["down"], lead=(e,), name="down"),
        }
        raw = {name: m.params() for name, m in mats.items()}
        strategy = choose_strategy(self.strategy, b * t, c.num_selected_experts, e)
        fn = experts_gather if strategy == "gather" else experts_grouped
        o = fn(flat, idx, raw["gate"], raw["up"], raw["down"], z.dtype)
        return combine(o, gates).reshape(b, t, d)
