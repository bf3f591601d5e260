"""Model configuration: one frozen dataclass, presets, and `config.json` io.

Field names follow the release (SPEC.md §1 and §8) so a checkpoint's `config.json` maps onto this
class one to one. Shape letters used across the package:

    B batch, T query length, S cache length, D emb_size, H query heads, K KV heads,
    G = H // K query heads per KV head, Dh key_size, E experts, F expert hidden size, V vocab,
    L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

CONFIG_FILE = "config.json"


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """The experts' hidden size F: `int(w * D) * 2 // 3`, rounded up to a multiple of 8."""
    f = int(widening_factor * emb_size) * 2 // 3
    return f + (-f) % 8


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Grok-1 style decoder. Every field matters to the computation.

    Attributes:
      vocab_size: V, rows of the tied input/output embedding.
      emb_size: D, width of the residual stream.
      num_layers: L, decoder layers.
      num_q_heads: H, query heads.
      num_kv_heads: K, key/value heads; query head j reads KV head j // (H // K).
      key_size: Dh, head dimension of queries, keys and values.
      widening_factor: sets the experts' hidden size, see `ffn_size`.
      num_experts: E, experts per MoE layer.
      num_selected_experts: experts each token is routed to (top-k of the router).
      sequence_len: context length S (KV-cache capacity).
      embedding_multiplier_scale: multiplies the embedded tokens (the release applies it as a
        bf16 constant in bf16 mode; see `model.py`).
      output_multiplier_scale: multiplies the output logits (same bf16 rounding).
      attn_output_multiplier: multiplies attention scores before the logit cap (an f32 scalar).
      pad_token: id of padding; tokens `<= pad_token` are masked out as keys.
      eos_token: id that ends generation.
      norm_eps: RMSNorm epsilon.
      rope_base: RoPE frequency base.
      attn_logit_cap: c in `c * tanh(s / c)` applied to attention scores.
    """

    vocab_size: int = 131072
    emb_size: int = 6144
    num_layers: int = 64
    num_q_heads: int = 48
    num_kv_heads: int = 8
    key_size: int = 128
    widening_factor: float = 8.0
    num_experts: int = 8
    num_selected_experts: int = 2
    sequence_len: int = 8192
    embedding_multiplier_scale: float = math.sqrt(6144)
    output_multiplier_scale: float = 3**-0.5
    attn_output_multiplier: float = 128**-0.5
    pad_token: int = 0
    eos_token: int = 2
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    attn_logit_cap: float = 30.0

    def __post_init__(self):
        positive = (
            "vocab_size", "emb_size", "num_layers", "num_q_heads", "num_kv_heads", "key_size",
            "num_experts", "num_selected_experts", "sequence_len",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.num_selected_experts > self.num_experts:
            raise ValueError(
                f"num_selected_experts ({self.num_selected_experts}) exceeds num_experts "
                f"({self.num_experts})"
            )
        if self.key_size % 2:
            raise ValueError(f"key_size must be even for RoPE, got {self.key_size}")
        if not 0 <= self.pad_token < self.vocab_size or not 0 <= self.eos_token < self.vocab_size:
            raise ValueError("pad_token and eos_token must be valid token ids")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        """F, the experts' hidden size."""
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_per_kv(self) -> int:
        """G, query heads sharing one KV head."""
        return self.num_q_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Number of weights (int8 matrices count one per element, scales excluded)."""
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        hq, hk = self.num_q_heads * self.key_size, self.num_kv_heads * self.key_size
        per_layer = 3 * e * d * f + 2 * d * hq + 2 * d * hk + 4 * d + d * e
        return self.vocab_size * d + d + self.num_layers * per_layer

    # Presets -------------------------------------------------------------------------------
    @classmethod
    def grok1(cls) -> ModelConfig:
        """The released Grok-1 (314B parameters)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A few-layer model of the Grok-1 shape family for tests (6:1 GQA like Grok-1)."""
        fields = dict(
            vocab_size=512, emb_size=64, num_layers=2, num_q_heads=12, num_kv_heads=2,
            key_size=16, sequence_len=64,
        )  # fmt: skip
        fields.update(overrides)
        return cls.scaled(**fields)

    @classmethod
    def bench_cpu(cls) -> ModelConfig:
        """The CPU benchmark config of issue #5: vocab 8192, emb 512, 8 layers, 8q/2kv heads."""
        return cls.scaled(
            vocab_size=8192, emb_size=512, num_layers=8, num_q_heads=8, num_kv_heads=2,
            key_size=64, sequence_len=512,
        )  # fmt: skip

    @classmethod
    def scaled(cls, **fields) -> ModelConfig:
        """A config whose multipliers follow Grok-1's rules for the given sizes."""
        d = fields.get("emb_size", cls.emb_size)
        dh = fields.get("key_size", cls.key_size)
        fields.setdefault("embedding_multiplier_scale", math.sqrt(d))
        fields.setdefault("attn_output_multiplier", dh**-0.5)
        return cls(**fields)

    PRESETS = ("grok1", "tiny", "bench-cpu")  # names for `preset`

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return getattr(cls, name.replace("-", "_"))()

    # Serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> ModelConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}")
        values = {}
        for name, value in data.items():
            if known[name].type in ("int",) and isinstance(value, float) and value.is_integer():
                value = int(value)
            values[name] = value
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, directory: str) -> str:
        """Writes `<directory>/config.json` (atomically) and returns its path."""
        path = os.path.join(directory, CONFIG_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str) -> ModelConfig:
        """Reads `<directory>/config.json`; the Grok-1 preset when the file is absent."""
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.exists(path):
            return cls.grok1()
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source=path)
