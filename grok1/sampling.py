"""Next-token sampling with per-row policies: temperature, top-k, top-p, min-p, repetition penalty.

One compiled `sample` serves a batch of requests with different settings: every policy parameter
is an array [B] in `BatchSamplingParams`, a pytree that can be passed into (and donated to) a
jitted decode step. All math is float32, whatever the logits' dtype.

Randomness is per row: row b draws with `fold_in(key_b, step_b)`, where `key_b` comes from its
request's seed alone, so a seed gives the same tokens whatever the batch size or the row's slot.
With a `Numerics` that uses the native kernels, the sums over the vocabulary (log-softmax, the
top-p mass) are also computed per row in a fixed order, so that a row's log-probabilities and
top-p boundary do not depend on the other rows either.

Differences from the release (SPEC.md §7): the release samples in bf16 with temperature and
top-p only and divides by zero at temperature 0. Here temperature 0 is exact greedy decoding
(argmax, first index on ties).

Shape letters: B batch rows, V vocabulary, T tokens, k alternatives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import layers
from grok1.numerics import Numerics

_KEY_IMPL = "threefry2x32"  # the key data layout stored in BatchSamplingParams.key
MIN_TEMPERATURE = 1e-6  # smaller positive temperatures act as this, so logits / T stays finite


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next tokens.

    Attributes:
      temperature: divides the logits; 0 means greedy (argmax, first index on ties). Positive
        values below `MIN_TEMPERATURE` act as `MIN_TEMPERATURE`.
      top_p: nucleus sampling; keep the fewest most-likely tokens whose probability sums to at
        least top_p (the most likely token is always kept). 1 turns it off.
      top_k: keep the k most likely tokens; 0 turns it off.
      min_p: keep tokens with probability >= min_p * (the top token's probability); 0 is off.
      repetition_penalty: CTRL-style penalty on tokens already seen: a positive logit is
        divided by it, a negative one multiplied. 1 turns it off.
      seed: seeds this request's random stream, 0 <= seed < 2**64.
      logprobs: how many top alternatives (with log-probabilities) to return per token.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    logprobs: int = 0

    def __post_init__(self):
        checks = [
            ("temperature", _is_number(self.temperature) and 0 <= self.temperature < math.inf,
             "a finite number >= 0 (0 means greedy)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 is off)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an int >= 0 (0 is off)"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1] (0 is off)"),
            ("repetition_penalty",
             _is_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf,
             "a finite number > 0 (1 is off)"),
            ("seed", _is_int(self.seed) and 0 <= self.seed < 2**64, "an int in [0, 2**64)"),
            ("logprobs", _is_int(self.logprobs) and self.logprobs >= 0, "an int >= 0"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}"
                )

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (temperature 0)."""
        return self.temperature == 0


def seed_key_data(seed: int) -> np.ndarray:
    """Raw threefry key data [2] uint32 of `seed`; equals `key_data(PRNGKey(seed))`."""
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchSamplingParams:
    """Per-row sampling parameters of a batch: a pytree of arrays, one entry per row."""

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_p: jax.Array  # [B] f32, 1 = off
    top_k: jax.Array  # [B] i32, 0 = off
    min_p: jax.Array  # [B] f32, 0 = off
    repetition_penalty: jax.Array  # [B] f32, 1 = off
    key: jax.Array  # [B, 2] u32, threefry key data of each row's seed

    @classmethod
    def stack(cls, params: Sequence[SamplingParams]) -> BatchSamplingParams:
        """Stacks one `SamplingParams` per row."""
        if not params:
            raise ValueError("BatchSamplingParams.stack needs at least one SamplingParams")

        def column(name, dtype):
            return jnp.asarray(np.array([getattr(p, name) for p in params], dtype=dtype))

        return cls(
            temperature=column("temperature", np.float32),
            top_p=column("top_p", np.float32),
            top_k=column("top_k", np.int32),
            min_p=column("min_p", np.float32),
            repetition_penalty=column("repetition_penalty", np.float32),
            key=jnp.asarray(np.stack([seed_key_data(p.seed) for p in params])),
        )

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def set_row(self, index: int, params: SamplingParams) -> BatchSamplingParams:
        """A copy with row `index` replaced by `params` (e.g. a new request in a free slot)."""
        row = BatchSamplingParams.stack([params])
        return jax.tree.map(lambda full, one: full.at[index].set(one[0]), self, row)


def apply_repetition_penalty(
    logits: jax.Array, seen_mask: jax.Array, penalty: jax.Array
) -> jax.Array:
    """CTRL penalty: seen tokens' logits become l / penalty if l > 0 else l * penalty.

    Args:
      logits: [B, V] f32.
      seen_mask: [B, V] bool, True for tokens to penalise.
      penalty: [B] f32.
    """
    penalty = penalty.astype(jnp.float32)[:, None]  # [B, 1]
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen_mask, penalised, logits)


def make_seen_mask(tokens: jax.Array, vocab_size: int, valid: jax.Array | None = None) -> jax.Array:
    """[B, V] bool mask of the ids in `tokens` [B, T] (only where `valid` [B, T] is True)."""
    if valid is not None:
        tokens = jnp.where(valid, tokens, vocab_size)  # out of range: dropped below
    rows = jnp.arange(tokens.shape[0])[:, None]  # [B, 1]
    mask = jnp.zeros((tokens.shape[0], vocab_size), dtype=bool)
    return mask.at[rows, tokens].set(True, mode="drop")


def update_seen_mask(seen_mask: jax.Array, tokens: jax.Array) -> jax.Array:
    """Marks `tokens` [B] as seen in `seen_mask` [B, V]."""
    return seen_mask.at[jnp.arange(tokens.shape[0]), tokens].set(True)


def _top_k_top_p_floor(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B] lowest logit kept by top-k and then top-p (on the top-k renormalised distribution)."""
    vocab = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1, descending=True)  # [B, V]
    rank = jnp.arange(vocab)[None, :]  # [1, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]  # [B, 1]
    in_top_k = rank < k  # [B, V]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)  # [B, V]
    mass_before = jnp.pad(jnp.cumsum(probs[:, :-1], axis=-1), ((0, 0), (1, 0)))  # [B, V]
    top_p = top_p[:, None]  # [B, 1]
    in_top_p = (mass_before < top_p) | (top_p >= 1.0)  # [B, V]
    n_keep = jnp.sum(in_top_k & in_top_p, axis=-1)  # [B], >= 1
    return jnp.take_along_axis(sorted_logits, n_keep[:, None] - 1, axis=-1)[:, 0]


def _row_by_row(fn, *args):
    """fn applied to each row of the arrays in `args` separately (one compiled body for every
    row: a row's result cannot depend on the others')."""
    return jax.lax.map(lambda row: fn(*row), args)


def filter_logits(
    logits: jax.Array, params: BatchSamplingParams, numerics: Numerics | None = None
) -> jax.Array:
    """Sets the logits of tokens removed by top-k, top-p and min-p to -inf.

    `logits` [B, V] f32 are already divided by the temperature. Filters keep every token whose
    logit ties the lowest kept one, so ties at the boundary can keep a few more than top_k.
    Sorting is skipped when no sampled row uses top-k or top-p. With the kernels' numerics the
    top-p boundary is found row by row (batch invariance).
    """
    batch = logits.shape[0]
    top = jnp.max(logits, axis=-1)  # [B]
    min_p_floor = top + jnp.log(params.min_p)  # [B]; p >= min_p * p_max, log(0) = -inf
    needs_sort = (params.temperature > 0) & ((params.top_k > 0) | (params.top_p < 1.0))
    if numerics is not None and numerics.kernels:
        row = lambda x, k, p: _top_k_top_p_floor(x[None], k[None], p[None])[0]  # noqa: E731
        floor_fn = lambda: _row_by_row(row, logits, params.top_k, params.top_p)  # noqa: E731
    else:
        floor_fn = lambda: _top_k_top_p_floor(logits, params.top_k, params.top_p)  # noqa: E731
    sort_floor = jax.lax.cond(
        jnp.any(needs_sort), floor_fn, lambda: jnp.full((batch,), -jnp.inf, dtype=jnp.float32)
    )
    floor = jnp.maximum(min_p_floor, sort_floor)  # [B]
    return jnp.where(logits >= floor[:, None], logits, -jnp.inf)


def sample(
    logits: jax.Array,
    params: BatchSamplingParams,
    step: jax.Array | int,
    seen_mask: jax.Array | None = None,
    numerics: Numerics | None = None,
) -> jax.Array:
    """Picks the next token of each row. Jit-able; all math in float32.

    Args:
      logits: [B, V] next-token logits (any float dtype).
      params: per-row parameters.
      step: int32 scalar or [B]: the rows' decode positions; folded into each row's key so
        every step draws fresh randomness.
      seen_mask: optional [B, V] bool of tokens that the repetition penalty applies to.
      numerics: with the native kernels, sums over the vocabulary run row by row.

    Returns:
      [B] int32 tokens: the argmax for rows with temperature 0, else a draw from the row's
      penalised, temperature-scaled, top-k / top-p / min-p filtered distribution.
    """
    logits = logits.astype(jnp.float32)  # [B, V]
    if seen_mask is not None:
        logits = apply_repetition_penalty(logits, seen_mask, params.repetition_penalty)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B], first index on ties

    sampled_rows = params.temperature > 0  # [B]
    sampled_tokens = jax.lax.cond(  # an all-greedy batch skips filtering and drawing
        jnp.any(sampled_rows),
        lambda: _draw(logits, params, step, numerics),
        lambda: greedy_tokens,
    )
    return jnp.where(sampled_rows, sampled_tokens, greedy_tokens).astype(jnp.int32)


def _draw(logits: jax.Array, params: BatchSamplingParams, step, numerics=None) -> jax.Array:
    """[B] tokens drawn from the temperature-scaled, filtered `logits` [B, V] (f32)."""
    batch = logits.shape[0]
    temperature = jnp.where(
        params.temperature > 0, jnp.maximum(params.temperature, MIN_TEMPERATURE), 1.0
    )  # [B]
    filtered = filter_logits(logits / temperature[:, None], params, numerics)  # [B, V]
    steps = jnp.broadcast_to(jnp.asarray(step, dtype=jnp.int32), (batch,))  # [B]
    keys = jax.random.wrap_key_data(params.key, impl=_KEY_IMPL)  # [B]
    keys = jax.vmap(jax.random.fold_in)(keys, steps)  # [B]
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array, numerics: Numerics | None = None):
    """[B] f32 log-probability of `tokens` [B] under the unmodified `logits` [B, V]."""
    logprobs = layers.log_softmax(logits, numerics or Numerics())  # [B, V]
    return jnp.take_along_axis(logprobs, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]


def top_logprobs(logits: jax.Array, k: int, numerics: Numerics | None = None):
    """The k most likely tokens of the unmodified `logits` [B, V].

    Returns:
      (values [B, k] f32 log-probabilities, best first; ids [B, k] int32).
    """
    logprobs = layers.log_softmax(logits, numerics or Numerics())  # [B, V]
    values, ids = jax.lax.top_k(logprobs, k)
    return values, ids.astype(jnp.int32)
