"""The inference engine: bucketed and chunked prefill, a donated jitted decode loop, batch slots
that free themselves when a request stops, streaming, and scoring.

Shapes: B batch slots, M prefill chunk (a power of two up to `max_bucket`), S cache capacity,
V vocab, N max new tokens.

Flow of `Engine.run`: requests wait in a queue; free slots are filled by prefilling the waiting
prompts (all together when the batch starts, one by one afterwards) into their cache rows; then
`_decode` runs decode steps inside one `lax.while_loop` until some row stops (or, when streaming,
for one step), the host collects finished rows and refills their slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import sampling
from grok1.cache import KVCache, insert_row
from grok1.model import Grok1

MIN_BUCKET = 16
MAX_LOGPROBS = 20  # largest SamplingParams.logprobs the engine serves (engine_api.md)


# The online engine's errors (engine_api.md), declared here ahead of the engine itself so that the
# server can be written against them; main's engine.py replaces this block.
class EngineError(RuntimeError):
    pass


class RequestError(EngineError, ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(EngineError):
    pass


class EngineDead(EngineError):
    pass


def to_host(x) -> np.ndarray:
    """A jax.Array as a NumPy array; one spanning other processes' devices (multi-process
    runs) is all-gathered, so every process must call this at the same point."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `minimum`), at most `cap`."""
    b = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return min(b, cap)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and how to continue it.

    Attributes:
      prompt: token ids (non-empty).
      max_new_tokens: upper bound on returned tokens.
      sampling: temperature, top-p/k, min-p, repetition penalty, seed.
      stop_ids: ids that end generation (excluded from the result); EOS is added unless
        `ignore_eos`.
      stop_strings: texts that end generation (needs a tokenizer); the result ends before them.
      ignore_eos: never stop at EOS (the release's behaviour).
    """

    prompt: tuple
    max_new_tokens: int
    sampling: sampling.SamplingParams = sampling.SamplingParams()
    stop_ids: tuple = ()
    stop_strings: tuple = ()
    ignore_eos: bool = False
    prompt_logprobs: bool = False


@dataclasses.dataclass
class Result:
    tokens: list
    logprobs: list
    finish_reason: str  # "stop" (EOS, stop id or string) or "length"
    top_logprobs: list | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    last: jax.Array  # [B] int32: the token to feed next
    steps: jax.Array  # [B] int32: tokens generated so far (also the sampling step)
    budget: jax.Array  # [B] int32: max new tokens
    active: jax.Array  # [B] bool
    stop_ids: jax.Array  # [B, P] int32, -1 padded
    out: jax.Array  # [B, N] int32 generated tokens
    logprobs: jax.Array  # [B, N] f32 log-probabilities of the generated tokens
    seen: jax.Array | None  # [B, V] bool for the repetition penalty, or None
    top_vals: jax.Array | None = None  # [B, N, K] f32 top-K log-probabilities per step
    top_ids: jax.Array | None = None  # [B, N, K] int32 their token ids


class Engine:
    """Generation over a loaded model. Not thread-safe: one `run` at a time."""

    def __init__(
        self,
        grok: Grok1,
        params,
        *,
        max_bucket: int = 1024,
        cache_len: int | None = None,
        shardings=None,
    ):
        self.grok, self.params, self.config = grok, params, grok.config
        if max_bucket < 1 or max_bucket & (max_bucket - 1):
            raise ValueError(f"max_bucket must be a power of two, got {max_bucket}")
        self.capacity = int(cache_len or self.config.sequence_len)
        self.max_bucket = min(max_bucket, self.capacity)
        self.shardings = shardings  # optional grok1.api hooks: cache / batch shardings
        self._chunk = jax.jit(self._chunk_fn, static_argnames="kv_len", donate_argnames="cache")
        self._decode = jax.jit(
            self._decode_fn,
            static_argnames=("kv_len", "n_steps", "until_first_stop"),
            donate_argnames=("cache", "state"),
        )
        self._insert = jax.jit(insert_row, donate_argnames="cache")
        self._accept_jit = jax.jit(self._accept)

    # -- compiled pieces ----------------------------------------------------------------------
    @functools.cached_property
    def table(self) -> jax.Array:
        """`Grok1.embedding_table(params)` (bf16(E) in bf16 mode), computed once and read by every
        program of this engine. Converted inside each call instead, a one-step decode call (a
        streamed token) converted the whole float32 table for one token."""
        return jax.jit(self.grok.embedding_table)(self.params)

    def _chunk_fn(self, params, cache: KVCache, tokens, n_new, kv_len: int, table):
        """Appends `tokens` [B, M] (the first n_new [B] real) to the cache.

        table: `Engine.table` (or its abstract value, to compile without weights).
        Returns (logits [B, V] f32 at each row's last real token of the chunk, cache).
        """
        m = tokens.shape[1]
        positions = cache.lengths[:, None] + jnp.arange(m, dtype=jnp.int32)[None]
        new_lengths = cache.lengths + n_new
        mask = cache.attention_mask(positions, new_lengths, kv_len)
        out_index = jnp.clip(n_new - 1, 0, m - 1)[:, None]
        logits, (k, v) = self.grok.apply(
            params, tokens, positions, mask, (cache.k, cache.v), kv_len, out_index, table
        )
        cache = KVCache(k=k, v=v, lengths=new_lengths)
        return logits[:, 0].astype(jnp.float32), cache

    def _decode_fn(
        self, params, cache, state: DecodeState, sp, kv_len, n_steps, until_first_stop, table
    ):
        """Runs up to n_steps decode steps in a while loop; stops early once any active row
        stops if `until_first_stop`. table: as for `_chunk_fn`."""

        def cond(carry):
            i, _, st, stopped = carry
            go = (i < n_steps) & jnp.any(st.active)
            return go & ~stopped if until_first_stop else go

        def body(carry):
            i, cache, st, _ = carry
            logits, cache = self._chunk_fn(
                params, cache, st.last[:, None], st.active.astype(jnp.int32), kv_len, table
            )
            st, stopped = self._accept(logits, st, sp)
            return i + 1, cache, st, stopped

        carry = (jnp.int32(0), cache, state, jnp.bool_(False))
        _, cache, state, _ = jax.lax.while_loop(cond, body, carry)
        return cache, state

    def _accept(self, logits, st: DecodeState, sp):
        """Samples each active row's next token from logits [B, V] and records it."""
        tok = sampling.sample(logits, sp, st.steps, st.seen)
        logp = sampling.token_logprobs(logits, tok)
        rows = jnp.arange(tok.shape[0])
        write = jnp.where(st.active, st.steps, st.out.shape[1])  # inactive rows: dropped
        out = st.out.at[rows, write].set(tok, mode="drop")
        lps = st.logprobs.at[rows, write].set(logp, mode="drop")
        steps = st.steps + st.active.astype(jnp.int32)
        hit_stop = jnp.any(tok[:, None] == st.stop_ids, axis=1)
        finished = st.active & (hit_stop | (steps >= st.budget))
        seen = None if st.seen is None else sampling.update_seen_mask(st.seen, tok)
        top_vals, top_ids = st.top_vals, st.top_ids
        if top_ids is not None:
            vals, ids = sampling.top_logprobs(logits, top_ids.shape[2])
            top_vals = top_vals.at[rows, write].set(vals, mode="drop")
            top_ids = top_ids.at[rows, write].set(ids, mode="drop")
        st = DecodeState(
            last=jnp.where(st.active, tok, st.last),
            steps=steps,
            budget=st.budget,
            active=st.active & ~finished,
            stop_ids=st.stop_ids,
            out=out,
            logprobs=lps,
            seen=seen,
            top_vals=top_vals,
            top_ids=top_ids,
        )
        return st, jnp.any(finished)

    # -- prefill --------------------------------------------------------------------------------
    def prefill(self, cache: KVCache, prompts: Sequence[Sequence[int]]):
        """Prefills prompts (one per cache row, all rows starting empty) in chunks of at most
        `max_bucket` tokens. Returns (logits [B, V] f32 at each prompt's last token, cache)."""
        lengths = np.array([len(p) for p in prompts])
        total = int(lengths.max())
        chunk = bucket(total, self.max_bucket)
        last = None
        for start in range(0, total, chunk):
            n_new = np.clip(lengths - start, 0, chunk).astype(np.int32)
            toks = np.zeros((len(prompts), chunk), np.int32)
            for b, p in enumerate(prompts):
                toks[b, : n_new[b]] = p[start : start + n_new[b]]
            kv_len = bucket(start + chunk, self.capacity)
            logits, cache = self._chunk(
                self.params, cache, jnp.asarray(toks), jnp.asarray(n_new), kv_len=kv_len,
                table=self.table,
            )  # fmt: skip
            ends_here = jnp.asarray((lengths > start) & (lengths <= start + chunk))
            last = logits if last is None else jnp.where(ends_here[:, None], logits, last)
        return last, cache

    def new_cache(self, batch: int) -> KVCache:
        cache = KVCache.zeros(self.config, batch, self.capacity, self.grok.compute_dtype)
        if self.shardings is not None:
            cache = jax.device_put(cache, self.shardings.cache(cache))
        return cache

    # -- the request loop -----------------------------------------------------------------------
    def check(self, request: Request) -> None:
        n = len(request.prompt)
        if n == 0:
            raise ValueError("empty prompt: give at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if n + request.max_new_tokens > self.capacity:
            raise ValueError(
                f"prompt of {n} tokens + max_new_tokens {request.max_new_tokens} = "
                f"{n + request.max_new_tokens} exceeds the context of {self.capacity} tokens; "
                f"shorten the prompt or ask for at most {self.capacity - n} new tokens"
            )
        bad = [t for t in request.prompt if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})"
            )

    def run(
        self,
        requests: Sequence[Request],
        *,
        max_batch: int = 8,
        stream: bool = False,
        stop_check=None,
        batch_multiple: int = 1,
    ) -> Iterator:
        """Serves requests; yields (request index, new token ids, Result or None).

        With `stream`, every decode step yields each active row's new token; otherwise a row is
        yielded once, when it finishes. `stop_check(index, tokens) -> int | None` may cut a
        result at a stop string (returns the number of tokens to keep).
        """
        for r in requests:
            self.check(r)
        if not requests:
            return
        slots = min(max_batch, len(requests))
        slots += (-slots) % batch_multiple  # a batch the data axis divides (padding rows idle)
        n_max = max(r.max_new_tokens for r in requests)
        use_seen = any(r.sampling.repetition_penalty != 1.0 for r in requests)
        p_max = 1 + max(len(r.stop_ids) for r in requests)
        cache = self.new_cache(slots)
        queue = list(range(len(requests)))
        owner = [-1] * slots
        first = queue[:slots]
        del queue[:slots]
        prompts = [requests[i].prompt for i in first] + [(0,)] * (slots - len(first))
        logits, cache = self.prefill(cache, prompts)
        sp = sampling.BatchSamplingParams.stack(
            [requests[i].sampling for i in first]
            + [sampling.SamplingParams()] * (slots - len(first))
        )
        n_top = max(r.sampling.logprobs for r in requests)
        state = self._empty_state(slots, n_max, p_max, use_seen, n_top)
        for slot, i in enumerate(first):
            owner[slot] = i
            state = self._admit(state, slot, requests[i], p_max)
        state, _ = self._accept_jit(logits, state, sp)
        emitted = [0] * slots
        while True:
            steps = to_host(state.steps)
            active = to_host(state.active)
            out = None
            for slot, i in enumerate(owner):
                if i < 0:
                    continue
                done = not active[slot]
                if not (stream or done or stop_check is not None):
                    continue
                if out is None:
                    out = to_host(state.out)
                n = int(steps[slot])
                keep = None if stop_check is None else stop_check(i, out[slot, :n].tolist())
                if keep is not None:  # a stop string: the result ends before it
                    result = self._result(requests[i], state, slot, keep=keep)
                    if not done:
                        state = self._deactivate(state, slot)
                    done = True
                else:
                    result = self._result(requests[i], state, slot) if done else None
                limit = len(result.tokens) if done else n
                new = out[slot, emitted[slot] : limit].tolist()
                emitted[slot] = max(emitted[slot], limit)
                if stream or done:
                    yield i, new, result
                if done:
                    owner[slot] = -1
                    if queue:  # refill the free slot with the next waiting request
                        j = queue.pop(0)
                        row_logits, cache = self._prefill_into(cache, slot, requests[j].prompt)
                        sp = sp.set_row(slot, requests[j].sampling)
                        state = self._admit(state, slot, requests[j], p_max)
                        state = self._accept_row(row_logits, state, sp, slot)
                        owner[slot], emitted[slot] = j, 0
                        active = to_host(state.active)
            if not any(i >= 0 for i in owner):
                return
            horizon = 1 if stream or stop_check is not None else n_max
            kv_len = bucket(int(to_host(cache.lengths).max()) + horizon, self.capacity)
            cache, state = self._decode(
                self.params,
                cache,
                state,
                sp,
                kv_len=kv_len,
                n_steps=horizon,
                until_first_stop=bool(queue) or stop_check is not None,
                table=self.table,
            )

    # -- helpers --------------------------------------------------------------------------------
    def _empty_state(self, slots, n_max, p_max, use_seen, n_top=0) -> DecodeState:
        z = lambda dtype, *shape: jnp.zeros(shape, dtype)  # noqa: E731
        return DecodeState(
            last=z(jnp.int32, slots),
            steps=z(jnp.int32, slots),
            budget=z(jnp.int32, slots),
            active=z(bool, slots),
            stop_ids=jnp.full((slots, p_max), -1, jnp.int32),
            out=z(jnp.int32, slots, n_max),
            logprobs=z(jnp.float32, slots, n_max),
            seen=z(bool, slots, self.config.vocab_size) if use_seen else None,
            top_vals=z(jnp.float32, slots, n_max, n_top) if n_top else None,
            top_ids=z(jnp.int32, slots, n_max, n_top) if n_top else None,
        )

    def _admit(self, state: DecodeState, slot: int, r: Request, p_max: int) -> DecodeState:
        stops = list(r.stop_ids) + ([] if r.ignore_eos else [self.config.eos_token])
        stops = np.array((stops + [-1] * p_max)[:p_max], np.int32)
        seen = state.seen
        if seen is not None:
            row = np.zeros(self.config.vocab_size, bool)
            row[list(r.prompt)] = True
            seen = seen.at[slot].set(jnp.asarray(row))
        return dataclasses.replace(
            state,
            steps=state.steps.at[slot].set(0),
            budget=state.budget.at[slot].set(r.max_new_tokens),
            active=state.active.at[slot].set(True),
            stop_ids=state.stop_ids.at[slot].set(jnp.asarray(stops)),
            seen=seen,
        )

    def _deactivate(self, state, slot):
        return dataclasses.replace(state, active=state.active.at[slot].set(False))

    def _accept_row(self, logits_row, state, sp, slot):
        """Accepts the first token of a request admitted into `slot` (others untouched)."""
        only = jnp.zeros_like(state.active).at[slot].set(True)
        masked = dataclasses.replace(state, active=state.active & only)
        new, _ = self._accept_jit(
            jnp.broadcast_to(logits_row, (state.active.shape[0], logits_row.shape[-1])), masked, sp
        )
        keep = lambda a, b: jnp.where(  # noqa: E731
            only.reshape((-1,) + (1,) * (a.ndim - 1)), a, b
        )
        merged = jax.tree.map(keep, new, state)
        return merged

    def _prefill_into(self, cache, slot, prompt):
        row = self.new_cache(1)
        logits, row = self.prefill(row, [prompt])
        return logits[0], self._insert(cache, row, jnp.int32(slot))

    def _result(self, r: Request, state, slot, keep=None) -> Result:
        n = int(to_host(state.steps)[slot])
        toks = to_host(state.out)[slot, :n].tolist()
        lps = to_host(state.logprobs)[slot, :n].tolist()
        stops = set(r.stop_ids) | (set() if r.ignore_eos else {self.config.eos_token})
        top = None
        if r.sampling.logprobs:
            k = r.sampling.logprobs
            ids = to_host(state.top_ids)[slot, :n, :k].tolist()
            vals = to_host(state.top_vals)[slot, :n, :k].tolist()
            top = [list(zip(i, v, strict=True)) for i, v in zip(ids, vals, strict=True)]
        if keep is None and toks and toks[-1] in stops:
            keep, reason = n - 1, "stop"
        else:
            reason = "length" if keep is None else "stop"
        keep = n if keep is None else keep
        top = None if top is None else top[:keep]
        return Result(toks[:keep], lps[:keep], reason, top)

    # -- scoring --------------------------------------------------------------------------------
    @functools.cached_property
    def _score_chunk(self):
        def fn(params, cache, tokens, targets, n_new, kv_len, table):
            m = tokens.shape[1]
            positions = cache.lengths[:, None] + jnp.arange(m, dtype=jnp.int32)[None]
            new_lengths = cache.lengths + n_new
            mask = cache.attention_mask(positions, new_lengths, kv_len)
            logits, (k, v) = self.grok.apply(
                params, tokens, positions, mask, (cache.k, cache.v), kv_len, table=table
            )
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]
            return picked, KVCache(k=k, v=v, lengths=new_lengths)

        return jax.jit(fn, static_argnames="kv_len", donate_argnames="cache")

    def score(self, sequences: Sequence[Sequence[int]], chunk: int = 256) -> list[np.ndarray]:
        """log p(x_t | x_<t) for t >= 1 of each sequence ([len - 1] float32 each), computed in
        chunks so that at most [B, chunk, V] logits exist at once."""
        lengths = np.array([len(s) for s in sequences])
        if (lengths < 2).any():
            raise ValueError("each scored sequence needs at least 2 tokens")
        if lengths.max() > self.capacity:
            raise ValueError(
                f"sequence of {lengths.max()} tokens exceeds the context {self.capacity}"
            )
        chunk = bucket(min(chunk, int(lengths.max())), self.max_bucket)
        cache = self.new_cache(len(sequences))
        total = int(lengths.max()) - 1
        out = np.zeros((len(sequences), total), np.float32)
        for start in range(0, total, chunk):
            n_new = np.clip(lengths - 1 - start, 0, chunk).astype(np.int32)
            toks = np.zeros((len(sequences), chunk), np.int32)
            tgts = np.zeros_like(toks)
            for b, s in enumerate(sequences):
                toks[b, : n_new[b]] = s[start : start + n_new[b]]
                tgts[b, : n_new[b]] = s[start + 1 : start + 1 + n_new[b]]
            kv_len = bucket(start + chunk, self.capacity)
            picked, cache = self._score_chunk(
                self.params,
                cache,
                jnp.asarray(toks),
                jnp.asarray(tgts),
                jnp.asarray(n_new),
                kv_len=kv_len,
                table=self.table,
            )
            width = min(chunk, total - start)
            out[:, start : start + width] = to_host(picked)[:, :width]
        return [out[b, : lengths[b] - 1] for b in range(len(sequences))]
