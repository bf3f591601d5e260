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

from grok1 import kernels, layers
from grok1.attention import Attention
from grok1.config import ModelConfig
from grok1.moe import MoE

F32, BF16 = layers.F32, layers.BF16
DTYPES = {"bfloat16": BF16, "float32": F32}

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
    def __init__(self, eps: float, name: str):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x):
        scale = hk.get_parameter("scale", (x.shape[-1],), F32, init=hk.initializers.Constant(1.0))
        return layers.rms_norm(x, scale, self.eps)


class Embedding(hk.Module):
    """The tied input/output embedding table [V, D] (float32 in the checkpoint)."""

    def __init__(self, config: ModelConfig, name: str):
        super().__init__(name=name)
        self.shape = (config.vocab_size, config.emb_size)

    def __call__(self):
        init = hk.initializers.RandomNormal(self.shape[1] ** -0.5)
        return hk.get_parameter("embeddings", self.shape, F32, init=init)


class DecoderLayer(hk.Module):
    """h += norm1(attn(norm(h))); h += norm3(moe(norm2(h)))."""

    def __init__(self, config, formats: WeightFormats, moe_strategy: str, name="decoder_layer"):
        super().__init__(name=name)
        self.config = config
        self.formats = formats.as_dict()
        self.moe_strategy = moe_strategy

    def __call__(self, h, positions, mask, cache=None, stacked=None):
        c = self.config
        norm = lambda i, x: RMSNorm(c.norm_eps, name=NORMS[i])(x)
        a, cache = Attention(c, self.formats)(norm(0, h), positions, mask, cache, stacked)
        h = h + norm(1, a)
        m = MoE(c, self.formats, self.moe_strategy)(norm(2, h), stacked)
        return h + norm(3, m), cache


@dataclasses.dataclass(frozen=True)
class Grok1:
    """The whole model as a pure function of (params, inputs), built with Haiku.

    Attributes:
      config: the architecture.
      formats: storage of each matrix (int8 with Gs groups, or float32).
      dtype: activation dtype, "bfloat16" (the release) or "float32".
      moe_strategy: "auto", "gather", "dense" or "grouped" (see `grok1.moe`).
      cpu_kernels: use the native int8 matrix kernel (`grok1.kernels`) for few-token steps:
        None (default) where it applies (CPU backend, one device, kernel built; int8 matrices
        only), False never. The values are the same up to float32 summation order.
    """

    config: ModelConfig
    formats: WeightFormats = WeightFormats()
    dtype: str = "bfloat16"
    moe_strategy: str = "auto"
    cpu_kernels: bool | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def kernel_matrices(self) -> tuple[str, ...]:
        """The matrices `apply` hands whole to the native CPU kernel (none where it does not
        apply)."""
        single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
        if self.cpu_kernels is False or not single_cpu or not kernels.available():
            return ()
        return tuple(name for name in MATRICES if getattr(self.formats, name).quantized)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def _forward(
        self, tokens, positions, mask, cache=None, kv_len=None, out_index=None, stacked=None
    ):
        c, dtype = self.config, self.compute_dtype
        embed = Embedding(c, name="embed")().astype(
            dtype
        )  # bf16(Emb) in bf16 mode (also for the tied output)
        h = embed[tokens] * layers.compute_constant(c.embedding_multiplier_scale, dtype)

        def body(carry, layer_idx):
            h, kv = carry
            layer_cache = None if kv is None else (*kv, layer_idx, kv_len)
            whole = None if stacked is None else layers.Stacked(stacked, layer_idx)
            layer = DecoderLayer(c, self.formats, self.moe_strategy)
            h, kv = layer(h, positions, mask, layer_cache, whole)
            return (h, kv), None

        stack = hk.layer_stack(c.num_layers, with_per_layer_inputs=True, name="layers")
        (h, cache), _ = stack(body)((h, cache), jnp.arange(c.num_layers))
        if out_index is not None:  # [B, P]: only these positions reach the unembedding
            h = jnp.take_along_axis(h, out_index[:, :, None], axis=1)
        h = RMSNorm(c.norm_eps, name="final_norm")(h)
        logits = layers.dot("btd,vd->btv", h, embed, dtype)
        logits = logits * layers.compute_constant(c.output_multiplier_scale, dtype)
        return logits, cache

    def transformed(self) -> hk.Transformed:
        return hk.without_apply_rng(hk.transform(lambda *args: _Root(self)(*args)))

    def apply(self, params, tokens, positions, mask, cache=None, kv_len=None, out_index=None):
        """Runs the model.

        tokens, positions: [B, T] int32; mask: [B, T, S] bool (query t may attend key slot s).
        cache: None (S = T, keys are these tokens) or (k, v) each [L, B, Sc, K, Dh]: the new
        keys/values are written at slots `positions`, and the first `kv_len` (static) slots are
        attended (S = kv_len). out_index: optional [B, P] positions whose logits are wanted.
        Returns (logits [B, T or P, V] in the compute dtype, updated cache or None).

        With the CPU kernel (`kernel_matrices`), those matrices bypass the layer scan's
        per-layer slicing (which would copy a whole layer of experts before every custom call)
        and reach the layer whole, [L, ...], with the layer's index.
        """
        stacked = None
        if names := self.kernel_matrices():
            params = dict(params)
            stacked = {name: params.pop(matrix_module(name)) for name in names}
        return self.transformed().apply(
            params, tokens, positions, mask, cache, kv_len, out_index, stacked
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
