"""The Grok-1 language model: tied scaled embedding, a scanned stack of decoder layers with four
RMSNorms each, a final norm and the tied, scaled unembedding.

Glossary: B batch, T new tokens, S attended key slots, Sc cache slots, D emb_size, V vocab,
L layers, H / K query / KV heads, Dh key_size, E experts, F expert hidden size.

Parameters are a plain nested dict (Haiku's): every leaf of the layer stack has a leading [L]
axis in numeric layer order. `PARAM_TABLE` lists every leaf once; checkpoint io and sharding
derive from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import haiku as hk
import jax
import jax.numpy as jnp

from grok1 import kernels, layers, sharding
from grok1.attention import Attention
from grok1.config import ModelConfig
from grok1.kernels import sharded
from grok1.moe import MoE
from grok1.numerics import DTYPES, ROUNDINGS, Numerics

F32, BF16 = layers.F32, layers.BF16
__all__ = ["DTYPES", "ROUNDINGS", "Grok1", "Numerics", "WeightFormats", "param_table"]

STACK = "grok1/layers"
ATTN = f"{STACK}/decoder_layer/attention"
MOE = f"{STACK}/decoder_layer/moe"
NORMS = ("attn_norm", "attn_out_norm", "moe_norm", "moe_out_norm")
ATTN_MATRICES = ("query", "key", "value", "linear")
MOE_MATRICES = ("gate", "up", "down")
MATRICES = ATTN_MATRICES + MOE_MATRICES


@dataclasses.dataclass(frozen=True)
class WeightFormats:
    """Storage format of each of the seven matrices (same for every layer)."""

    query: layers.MatrixFormat = layers.MatrixFormat()
    key: layers.MatrixFormat = layers.MatrixFormat()
    value: layers.MatrixFormat = layers.MatrixFormat()
    linear: layers.MatrixFormat = layers.MatrixFormat()
    gate: layers.MatrixFormat = layers.MatrixFormat()
    up: layers.MatrixFormat = layers.MatrixFormat()
    down: layers.MatrixFormat = layers.MatrixFormat()

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in MATRICES}

    @classmethod
    def release(cls, config: ModelConfig, shards: int = 8) -> WeightFormats:
        """The released checkpoint's: 8 scale groups on the row-parallel `linear` and `down`."""
        del config
        return cls(linear=layers.MatrixFormat(shards), down=layers.MatrixFormat(shards))

    @classmethod
    def of_params(cls, params: Mapping) -> WeightFormats:
        """Reads the formats off a parameter tree."""
        found = {}
        for name in MATRICES:
            leaf = params[matrix_module(name)]
            found[name] = layers.MatrixFormat(
                leaf["scales"].shape[-2] if "scales" in leaf else None
            )
        return cls(**found)


def matrix_module(name: str) -> str:
    return f"{ATTN if name in ATTN_MATRICES else MOE}/{name}"


def param_table(config: ModelConfig, formats: WeightFormats) -> dict:
    """{(module, leaf): (shape, dtype, logical axes)} for every parameter, layers stacked.

    Logical axes name each dimension for the sharding rules (`grok1.sharding`).
    """
    c = config
    L, D, E, F, V = c.num_layers, c.emb_size, c.num_experts, c.ffn_size, c.vocab_size
    hq, hk_ = c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    table = {
        ("grok1/embed", "embeddings"): ((V, D), F32, ("vocab", "embed")),
        ("grok1/final_norm", "scale"): ((D,), F32, ("norm",)),
    }
    for norm in NORMS:
        table[(f"{STACK}/decoder_layer/{norm}", "scale")] = ((L, D), F32, ("layers", "norm"))
    table[(MOE, "router")] = ((L, D, E), F32, ("layers", "embed", "expert_router"))
    dims = {
        "query": ((D, hq), (), ("embed", "q_heads")),
        "key": ((D, hk_), (), ("embed", "kv_heads")),
        "value": ((D, hk_), (), ("embed", "kv_heads")),
        "linear": ((hq, D), (), ("q_heads", "embed")),
        "gate": ((D, F), (E,), ("experts", "embed", "ffn")),
        "up": ((D, F), (E,), ("experts", "embed", "ffn")),
        "down": ((F, D), (E,), ("experts", "ffn", "embed")),
    }
    for name, ((n_in, n_out), lead, axes) in dims.items():
        fmt = getattr(formats, name)
        module = matrix_module(name)
        shape = (L, *lead, n_in, n_out)
        if fmt.quantized:
            table[(module, "w")] = (shape, jnp.int8, ("layers", *axes))
            scale_axes = ("layers", *axes[:-2], "groups", axes[-1])
            table[(module, "scales")] = ((L, *lead, fmt.groups, n_out), BF16, scale_axes)
        else:
            table[(module, "w")] = (shape, F32, ("layers", *axes))
    return table


class RMSNorm(hk.Module):
    def __init__(self, eps: float, numerics: Numerics, name: str):
        super().__init__(name=name)
        self.eps = eps
        self.numerics = numerics

    def __call__(self, x, dtype=None):
        scale = hk.get_parameter("scale", (x.shape[-1],), F32, init=hk.initializers.Constant(1.0))
        return layers.rms_norm(x, scale, self.eps, self.numerics, dtype)


class Embedding(hk.Module):
    """The tied input/output embedding table [V, D] (float32 in the checkpoint)."""

    def __init__(self, config: ModelConfig, name: str):
        super().__init__(name=name)
        self.shape = (config.vocab_size, config.emb_size)

    def __call__(self):
        init = layers.normal_init(self.shape[1] ** -0.5)
        return hk.get_parameter("embeddings", self.shape, F32, init=init)


class DecoderLayer(hk.Module):
    """h += norm1(attn(norm(h))); h += norm3(moe(norm2(h))).

    Under rounding="strict", h is the residual stream in the compute dtype. Under "release" (bf16),
    h is the float32 sum *before* its bf16 rounding: the stream itself is bf16(h), which is what
    the next residual add reads, while the RMSNorm that follows reads h unrounded (see `Grok1`).
    """

    def __init__(
        self, config, formats: WeightFormats, numerics: Numerics, moe_strategy: str,
        expert_mesh=None, name="decoder_layer",
    ):  # fmt: skip
        super().__init__(name=name)
        self.config = config
        self.formats = formats.as_dict()
        self.numerics = numerics
        self.moe_strategy = moe_strategy
        self.expert_mesh = expert_mesh

    def __call__(self, h, positions, mask, cache=None, stacked=None):
        c, num = self.config, self.numerics
        dtype = num.compute_dtype
        norm = lambda i, x, dt=dtype: RMSNorm(c.norm_eps, num, name=NORMS[i])(x, dt)
        attn = Attention(c, self.formats, num)
        moe = MoE(c, self.formats, num, self.moe_strategy, self.expert_mesh)
        if num.rounding == "strict":  # additions rounded explicitly: XLA would skip the
            add = lambda x, y: _rounded_sum(x, y, dtype)  # rounding that the norm reads
            a, cache = attn(norm(0, h), positions, mask, cache, stacked)
            h = add(h, norm(1, a))
            m = moe(norm(2, h), stacked)
            return add(h, norm(3, m, m.dtype)), cache
        a, cache = attn(norm(0, h), positions, mask, cache, stacked)
        h = layers.round_to(h, dtype) + norm(1, a).astype(F32)
        m = moe(norm(2, h), stacked)
        # the MoE output is bf16 in both modes, so rms_norm_3's output is too (SPEC.md §2)
        return layers.round_to(h, dtype) + norm(3, m, m.dtype).astype(F32), cache


def _embed(table: jax.Array, tokens: jax.Array, mesh=None) -> jax.Array:
    """Rows of a usable table [V, D] for `tokens` [B, T], in float32. With a `mesh` whose "model"
    axis splits the vocabulary, see `_rows_of_vocab_shards`."""
    if mesh is not None and 1 < mesh.shape["model"] and table.shape[0] % mesh.shape["model"] == 0:
        rows = _rows_of_vocab_shards(table, tokens, mesh)
    else:
        rows = table[tokens]
    return layers.from_bf16_bits(rows).astype(F32)


def _rows_of_vocab_shards(table: jax.Array, tokens: jax.Array, mesh) -> jax.Array:
    """table[tokens] for a table split by rows over the mesh's "model" axis: each device looks
    up the tokens that fall in its own rows (zeros for the others) and the devices' rows are
    summed, exactly (one term per token is not zero). The table never moves.

    Left to XLA, the lookup of a single token (one-row decode) is rewritten on GPU into a
    dynamic slice of the whole table, which the partitioner serves with an all-gather of the
    table into every device at every step (docs/performance.md, GPU traffic estimates).
    """
    from jax.sharding import PartitionSpec as P

    data = mesh.shape["data"]
    tokens_spec = P("data" if data > 1 and tokens.shape[0] % data == 0 else None)

    def local(table, tokens):
        rows = table.shape[0]
        index = tokens - jax.lax.axis_index("model") * rows
        mine = (index >= 0) & (index < rows)
        found = jnp.take(table, jnp.clip(index, 0, rows - 1), axis=0)
        return jax.lax.psum(jnp.where(mine[..., None], found, jnp.zeros_like(found)), "model")

    return jax.shard_map(
        local, mesh=mesh, in_specs=(P("model", None), tokens_spec), out_specs=tokens_spec
    )(table, tokens)


def _unembed(h: jax.Array, table: jax.Array, numerics: Numerics, spec=None) -> jax.Array:
    """h [B, T, D] @ table.T, rounded to the compute dtype: in the native kernel when the model
    uses the kernels (the table as bf16 bits, or float32; on a mesh, each device the columns of
    its rows of the table, placed as `spec`), else XLA's dot."""
    dtype = numerics.compute_dtype
    if numerics.kernels:
        b, t, d = h.shape
        flat = h.reshape(b * t, d).astype(F32)
        if numerics.mesh is None:
            logits = kernels.dot_rows(flat, table)
        else:
            logits = sharded.dot_rows(kernels.dot_rows, flat, table, numerics.mesh, spec)
        return logits.reshape(b, t, -1).astype(dtype)
    return layers.dot("btd,vd->btv", h, table, dtype, numerics.dots_in_f32())


def _rounded_sum(x, y, dtype):
    """x + y rounded to `dtype` by `layers.round_to` (a rounding no compiler rewrite drops)."""
    return layers.round_to(x.astype(F32) + y.astype(F32), dtype).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Grok1:
    """The whole model as a pure function of (params, inputs), built with Haiku.

    Attributes:
      config: the architecture.
      formats: storage of each matrix (int8 with Gs groups, or float32).
      numerics: the activation dtype, the rounding (below), the backend and whether the native
        CPU kernels compute every product and row reduction (`grok1.numerics`; with them a
        request's numbers depend on its own tokens only). On a mesh of several devices, its
        `mesh` is the model's: each device runs the kernels on its shards.
      moe_strategy: "auto", "gather", "dense" or "grouped" (see `grok1.moe`).
      expert_mesh: None (experts as the parameters' shardings place them), or the mesh whose
        "model" axis splits the experts whole (expert parallelism, `grok1.moe.experts_parallel`;
        parameters placed by `sharding.EXPERT_PARALLEL_RULES`).
      mesh: None, or the mesh the parameters are placed on (`grok1.load` sets it). Where its
        "model" axis splits the vocabulary, each device looks up the embedding rows it holds
        (see `_rows_of_vocab_shards`).
      numerics.rounding: which bf16 roundings of SPEC.md §2 happen (bf16 mode; float32 mode is
        the same under all three):
        * "strict": every one, as written; this is the release compiled with
          XLA_FLAGS=--xla_allow_excess_precision=false (its logits_strict.npy).
        * "release" (default): those that the release's compiled program keeps under XLA's
          default flags (its logits.npy). There XLA:CPU computes bf16 arithmetic in float32 and
          lets a written `astype(float32)` of a bf16 op's result read the float32 value
          directly, so a rounding survives only where a bf16 value reaches a bf16 consumer
          (another bf16 op, a dot operand, a reshape or transpose, a program output). On the
          release's structure, three roundings go: (1) every RMSNorm that reads the
          residual stream (the two pre-norms, the final norm) sees the residual add, and the
          embedding times its multiplier, unrounded, while the stream keeps the rounded value
          for the next add; (2) the post-attention RMSNorm reads the output projection's
          float32 result when `linear` is int8 (a plain float32 matrix keeps the rounding);
          (3) the MoE down-projection uses the exact dequantised int8 weight, not bf16(q * s).
          Everything else (projections, RoPE, scores, probabilities, gates, MoE output, norm
          outputs, logits) is rounded as in "strict". This reproduces the single-device golden
          logits bit for bit when layers are unrolled; with our scanned layer stack, float32
          summation-order differences flip occasional bf16 roundings, and that noise remains.
        * "fast": as "release", except that every int8 weight is used as q * s exactly instead
          of bf16(q * s), so its scales multiply the sums of each scale group rather than every
          weight (`layers.matmul`; the CPU kernels skip a conversion and a rounding per weight,
          docs/performance.md). Not the release's numerics: a perturbation of each weight of
          relative size up to 2^-9, which where the router's 2nd and 3rd experts are nearly tied
          can flip an expert choice (docs/numerics.md, `rounding="fast"`).
    """

    config: ModelConfig
    formats: WeightFormats = WeightFormats()
    numerics: Numerics = Numerics()
    moe_strategy: str = "auto"
    expert_mesh: jax.sharding.Mesh | None = None
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        from grok1.moe import STRATEGIES

        if self.moe_strategy not in STRATEGIES:
            raise ValueError(f"moe_strategy must be one of {STRATEGIES}, got "
                             f"{self.moe_strategy!r}")  # fmt: skip
        several = self.mesh is not None and self.mesh.devices.size > 1
        if self.numerics.kernels and self.numerics.mesh != (self.mesh if several else None):
            raise ValueError(
                "with the native kernels, Numerics.mesh must be the model's mesh "
                "of several devices (Numerics.choose(..., mesh=mesh))"
            )

    @property
    def dtype(self) -> str:
        return self.numerics.dtype

    @property
    def rounding(self) -> str:
        return self.numerics.rounding

    @property
    def compute_dtype(self):
        return self.numerics.compute_dtype

    def _kernel_specs(self) -> dict:
        """Where the kernels run on a mesh (`Numerics.mesh`): {matrix name: the PartitionSpec of
        its "w"}, and "embeddings": the table's, as the loader places them (`grok1.sharding`'s
        rules); else {}."""
        if self.numerics.mesh is None:
            return {}
        rules = sharding.EXPERT_PARALLEL_RULES if self.expert_mesh else sharding.RULES
        placed = sharding.table_shardings(
            param_table(self.config, self.formats), self.config, self.numerics.mesh, rules
        )
        specs = {name: placed[(matrix_module(name), "w")].spec for name in MATRICES}
        specs["embeddings"] = placed[("grok1/embed", "embeddings")].spec
        return specs

    def kernel_matrices(self) -> tuple[str, ...]:
        """The matrices `apply` hands whole to the native CPU kernels (all of them, when the
        model uses the kernels)."""
        return MATRICES if self.numerics.kernels else ()

    def embedding_table(self, params) -> jax.Array:
        """The tied embedding as the model uses it: bf16(E) in bf16 mode. With the native CPU
        kernels it is held as its uint16 bits (read in place by `kernels.dot_rows`: half the
        bytes of float32); on CPU without them, where dots run in float32, in float32 (holding
        bf16-exact values). A loop that runs many steps computes this once and passes it to
        `apply(..., table=)`, sparing every step a conversion of the whole [V, D] table."""
        return self._usable_embedding(params["grok1/embed"]["embeddings"])

    def _usable_embedding(self, e: jax.Array) -> jax.Array:
        dtype = self.compute_dtype
        if dtype == jnp.bfloat16 and self.numerics.kernels:
            return layers.to_bf16_bits(e)
        if self.numerics.dots_in_f32():
            return layers.round_to(e.astype(F32), dtype)
        return e.astype(dtype)

    def _forward(
        self, tokens, positions, mask, cache=None, kv_len=None, out_index=None, stacked=None,
        table=None, rows=None,
    ):  # fmt: skip
        c, dtype = self.config, self.compute_dtype
        embed = Embedding(c, name="embed")()  # bf16(E) in bf16 mode, also for the tied output
        embed = self._usable_embedding(embed) if table is None else table
        c_in = layers.compute_constant(c.embedding_multiplier_scale, dtype)
        h = _embed(embed, tokens, self.mesh) * c_in.astype(F32)
        if self.rounding == "strict":  # under "release" the first RMSNorm reads it unrounded
            h = layers.round_to(h, dtype).astype(dtype)
        num = self.numerics
        specs = self._kernel_specs()

        def body(carry, layer_idx):
            h, kv = carry
            layer_cache = None if kv is None else (*kv, layer_idx, kv_len, rows)
            whole = None if stacked is None else layers.Stacked(stacked, layer_idx, num, specs)
            layer = DecoderLayer(c, self.formats, num, self.moe_strategy, self.expert_mesh)
            h, kv = layer(h, positions, mask, layer_cache, whole)
            return (h, kv), None

        stack = hk.layer_stack(c.num_layers, with_per_layer_inputs=True, name="layers")
        if cache is not None and rows is None:
            rows = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        (h, cache), _ = stack(body)((h, cache), jnp.arange(c.num_layers))
        if out_index is not None:  # [B, P]: only these positions reach the unembedding
            h = jnp.take_along_axis(h, out_index[:, :, None], axis=1)
        h = RMSNorm(c.norm_eps, num, name="final_norm")(h, dtype)
        logits = _unembed(h, embed, num, specs.get("embeddings"))
        c_out = layers.compute_constant(c.output_multiplier_scale, dtype)
        # rounded explicitly, so that a consumer inside the same program (the engine's sampler)
        # sees bf16(logits * c_out) too and not XLA's unrounded float32 product
        logits = layers.round_to(logits.astype(F32) * c_out.astype(F32), dtype).astype(dtype)
        return logits, cache

    def transformed(self) -> hk.Transformed:
        return hk.without_apply_rng(hk.transform(lambda *args: _Root(self)(*args)))

    def apply(
        self, params, tokens, positions, mask, cache=None, kv_len=None, out_index=None, table=None,
        rows=None,
    ):  # fmt: skip
        """Runs the model.

        tokens, positions: [B, T] int32; mask: [B, T, S] bool (query t may attend key slot s).
        cache: None (S = T, keys are these tokens) or (k, v) each [L, B, K, Sc, Dh]: the new
        keys/values are written at slots `positions`, and the first `kv_len` (static) slots are
        attended (S = kv_len). out_index: optional [B, P] positions whose logits are wanted.
        table: optional `embedding_table(params)`, computed once by the caller.
        rows: optional [B] int32, the cache row of each batch row (default: row b is cache row
        b); a row >= the cache's batch writes nothing and reads the last cache row.
        Returns (logits [B, T or P, V] in the compute dtype, updated cache or None).

        With the native kernels (`kernel_matrices`), the matrices bypass the layer scan's
        per-layer slicing (which would copy a whole layer of experts before every custom call)
        and reach the layer whole, [L, ...], with the layer's index.
        """
        stacked = None
        if names := self.kernel_matrices():
            params = dict(params)
            stacked = {name: params.pop(matrix_module(name)) for name in names}
        return self.transformed().apply(
            params, tokens, positions, mask, cache, kv_len, out_index, stacked, table, rows
        )

    def init(self, key, batch: int = 1, length: int = 4):
        """Random parameters (tests, demos and benchmarks)."""
        tokens = jnp.zeros((batch, length), jnp.int32)
        mask = jnp.ones((batch, length, length), bool)
        return self.transformed().init(key, tokens, tokens, mask)

    def param_shapes(self):
        """Abstract parameters (jax.ShapeDtypeStruct leaves) without allocating anything."""
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0)))


class _Root(hk.Module):
    """Puts every parameter under "grok1/"."""

    def __init__(self, model: Grok1):
        super().__init__(name="grok1")
        self.model = model

    def __call__(self, *args):
        return self.model._forward(*args)
