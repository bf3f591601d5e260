"""The engine's compiled steps: prefill (or score) a chunk of tokens into chosen cache rows, sample
the first tokens of new requests, and decode up to N tokens for every cache row in one call.

Each is a pure function of its arguments, jitted with the KV cache (and the decode state) donated;
`grok1.engine.Engine` schedules them, and the benchmarks, the planner and the tests call them
directly through the engine's `prefill_chunk`, `score_chunk` and `decode_steps`.

Shapes: B cache rows (slots), P rows of a prefill step, M tokens per row of a chunk, S attended
key slots (`kv_len`, static), V vocabulary, H decode steps per call (static), K top
log-probabilities (static: 0 or `MAX_LOGPROBS`), Q stop ids per row.

Padding rows of a prefill step name the slot B (one past the last): their cache writes are
dropped, and they read row B - 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from grok1 import layers, sampling
from grok1.cache import KVCache
from grok1.model import Grok1
from grok1.numerics import Numerics
from grok1.requests import MAX_STOP_IDS

I32 = jnp.int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The decoding rows of the cache, donated into every decode call."""

    last: jax.Array  # [B] int32: the token to feed next
    steps: jax.Array  # [B] int32: tokens generated so far (the sampling step of the next one)
    budget: jax.Array  # [B] int32: max new tokens of the row's request
    active: jax.Array  # [B] bool: the row is decoding
    stop_ids: jax.Array  # [B, Q] int32 ids that end the row's request, -1 padded
    seen: jax.Array  # [B, V] bool: prompt and generated ids (the repetition penalty's)

    @classmethod
    def zeros(cls, batch: int, vocab: int) -> DecodeState:
        z = lambda dtype, *shape: jnp.zeros(shape, dtype)  # noqa: E731
        return cls(
            last=z(I32, batch),
            steps=z(I32, batch),
            budget=z(I32, batch),
            active=z(bool, batch),
            stop_ids=jnp.full((batch, MAX_STOP_IDS + 1), -1, I32),
            seen=z(bool, batch, vocab),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """Tokens chosen for some rows, with their log-probabilities ([R] or [R, H] leading axes)."""

    tokens: jax.Array  # int32
    logprobs: jax.Array  # float32
    top_ids: jax.Array | None = None  # [..., K] int32, best first
    top_logprobs: jax.Array | None = None  # [..., K] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput(Sampled):
    """What one decode call produced: tokens [B, H] etc.; row b's first `count[b]` are new."""

    count: jax.Array | None = None  # [B] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ChunkScores:
    """A scored chunk: log p(targets) [P, M] (and the top-K at each position)."""

    logprobs: jax.Array
    top_ids: jax.Array | None = None  # [P, M, K]
    top_logprobs: jax.Array | None = None


def choose(logits: jax.Array, sp, steps, seen, top_k: int, numerics: Numerics) -> Sampled:
    """Samples each row of logits [R, V] (f32) with its params, at its step; reports the chosen
    token's log-probability and, for top_k > 0, the top_k alternatives."""
    tokens = sampling.sample(logits, sp, steps, seen, numerics)
    logp = layers.log_softmax(logits, numerics)
    out = Sampled(tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0])
    if top_k:
        out.top_logprobs, out.top_ids = jax.lax.top_k(logp, top_k)
    return out


class Steps:
    """The compiled steps of one model (`grok1.model.Grok1`); parameters are arguments."""

    def __init__(self, grok: Grok1):
        self.grok = grok
        self.vocab = grok.config.vocab_size
        # On a mesh the slot state (decode state, sampling parameters, first tokens, decode
        # output) leaves every program replicated and spelled one way (`P()`): JAX keys a
        # program by how its arguments' shardings are spelled, and the partitioner's own choice
        # of spelling differs between programs, so traffic would compile programs again that
        # the engine's warm-up compiled with the other spelling. `slot_sharding` (None off a
        # mesh) is that placement, for the engine's own slot state too.
        whole = None if grok.mesh is None else NamedSharding(grok.mesh, PartitionSpec())
        self.slot_sharding = whole
        replicated = {} if whole is None else {"out_shardings": whole}
        decoded = {}  # the cache returned where it was placed (also what donation needs)
        if grok.mesh is not None:
            cache = KVCache.shardings(grok.config, grok.compute_dtype, grok.mesh)
            decoded["out_shardings"] = (cache, whole, whole)
        self.prefill = jax.jit(
            self._prefill, static_argnames=("kv_len", "top_k", "scores"), donate_argnames="cache"
        )
        self.logits = jax.jit(self._logits, static_argnames="kv_len", donate_argnames="cache")
        self.first_tokens = jax.jit(self._first_tokens, static_argnames="top_k", **replicated)
        self.decode = jax.jit(
            self._decode,
            static_argnames=("kv_len", "n_steps", "top_k"),
            donate_argnames=("cache", "state"),
            **decoded,
        )
        self.admit = jax.jit(self._admit, donate_argnames=("state", "sp"), **replicated)
        self.deactivate = jax.jit(self._deactivate, donate_argnames="state", **replicated)

    # -- a chunk of tokens ------------------------------------------------------------------------
    def _forward(self, params, cache: KVCache, slots, starts, tokens, n_new, kv_len, table, last):
        """tokens [P, M] appended to cache rows `slots` [P] at positions starts [P] onwards
        (the first n_new [P] of each row are real). Returns (logits [P, M or 1, V] in the
        compute dtype, the updated cache); `last`: only each row's last real position."""
        m = tokens.shape[1]
        positions = starts[:, None] + jnp.arange(m, dtype=I32)[None]  # [P, M]
        new_lengths = starts + n_new
        mask = cache.attention_mask(positions, new_lengths, kv_len)
        out_index = jnp.clip(n_new - 1, 0, m - 1)[:, None] if last else None
        logits, (k, v) = self.grok.apply(
            params, tokens, positions, mask, (cache.k, cache.v), kv_len, out_index, table, slots
        )
        lengths = cache.lengths.at[slots].set(new_lengths, mode="drop")
        return logits, KVCache(k=k, v=v, lengths=lengths)

    def _prefill(
        self, params, cache, slots, starts, tokens, n_new, targets, *, kv_len, table, scores=False,
        top_k=0,
    ):  # fmt: skip
        """Prefills a chunk. Returns (last logits [P, V] f32, ChunkScores or None, cache): the
        logits at each row's last real token and, with `scores`, log p(targets [P, M]) at
        every position (and the top_k alternatives)."""
        logits, cache = self._forward(
            params, cache, slots, starts, tokens, n_new, kv_len, table, last=not scores
        )
        logits = logits.astype(jnp.float32)
        if not scores:
            return logits[:, 0], None, cache
        last = jnp.clip(n_new - 1, 0, tokens.shape[1] - 1)
        last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        logp = layers.log_softmax(logits, self.grok.numerics)
        out = ChunkScores(jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0])
        if top_k:
            out.top_logprobs, out.top_ids = jax.lax.top_k(logp, top_k)
        return last_logits, out, cache

    def _logits(self, params, cache, slots, starts, tokens, n_new, *, kv_len, table):
        """Like `_prefill`, returning the logits [P, M, V] f32 of every position."""
        logits, cache = self._forward(
            params, cache, slots, starts, tokens, n_new, kv_len, table, last=False
        )
        return logits.astype(jnp.float32), cache

    # -- sampling the first token of new requests ---------------------------------------------
    def _first_tokens(self, logits, sp, seen, *, top_k=0) -> Sampled:
        """Samples the first token of P new requests from their last prompt logits [P, V]."""
        steps = jnp.zeros(logits.shape[:1], I32)
        return choose(logits, sp, steps, seen, top_k, self.grok.numerics)

    def _admit(self, state: DecodeState, sp, slots, rows: DecodeState, row_sp):
        """Puts P new requests (`rows`: their decode state, `row_sp`: their sampling params)
        into the decode state's `slots` [P]; slots >= B are ignored."""
        put = lambda full, part: full.at[slots].set(part, mode="drop")  # noqa: E731
        return jax.tree.map(put, state, rows), jax.tree.map(put, sp, row_sp)

    def _deactivate(self, state: DecodeState, slots):
        return dataclasses.replace(state, active=state.active.at[slots].set(False, mode="drop"))

    # -- decoding ---------------------------------------------------------------------------
    def _decode(
        self, params, cache: KVCache, state: DecodeState, sp, stop_early, *, kv_len, n_steps,
        top_k=0, table,
    ):  # fmt: skip
        """Up to n_steps decode steps for every active row, in one while loop; with `stop_early`
        (a traced bool) the loop also ends after the first step in which some row finishes.
        Returns (cache, state, DecodeOutput [B, n_steps])."""
        batch = state.last.shape[0]
        rows = jnp.arange(batch, dtype=I32)
        empty = lambda dtype, *tail: jnp.zeros((batch, n_steps, *tail), dtype)  # noqa: E731
        out = DecodeOutput(empty(I32), empty(jnp.float32), count=jnp.zeros((batch,), I32))
        if top_k:
            out.top_ids, out.top_logprobs = empty(I32, top_k), empty(jnp.float32, top_k)

        def cond(carry):
            i, _, st, _, ended = carry
            return (i < n_steps) & jnp.any(st.active) & ~ended

        def body(carry):
            i, cache, st, out, _ = carry
            logits, cache = self._forward(
                params, cache, rows, cache.lengths, st.last[:, None], st.active.astype(I32),
                kv_len, table, last=True,
            )  # fmt: skip
            logits = logits[:, 0].astype(jnp.float32)
            picked = choose(logits, sp, st.steps, st.seen, top_k, self.grok.numerics)
            at = jnp.where(st.active, i, n_steps)  # inactive rows: nothing recorded

            def record(buf, new):
                return None if buf is None else buf.at[rows, at].set(new, mode="drop")

            out = DecodeOutput(
                tokens=record(out.tokens, picked.tokens),
                logprobs=record(out.logprobs, picked.logprobs),
                top_ids=record(out.top_ids, picked.top_ids),
                top_logprobs=record(out.top_logprobs, picked.top_logprobs),
                count=out.count + st.active,
            )
            steps = st.steps + st.active
            hit = jnp.any(picked.tokens[:, None] == st.stop_ids, axis=1)
            finished = st.active & (hit | (steps >= st.budget))
            st = dataclasses.replace(
                st,
                last=jnp.where(st.active, picked.tokens, st.last),
                steps=steps,
                active=st.active & ~finished,
                seen=sampling.update_seen_mask(st.seen, picked.tokens),
            )
            return i + 1, cache, st, out, stop_early & jnp.any(finished)

        carry = (jnp.int32(0), cache, state, out, jnp.bool_(False))
        _, cache, state, out, _ = jax.lax.while_loop(cond, body, carry)
        return cache, state, out
