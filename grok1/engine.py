"""The engine: one scheduler that serves requests submitted from any thread, with continuous
batching over a fixed number of KV-cache rows (slots).

    engine = Engine(grok, params, tokenizer=tok)
    handle = engine.submit(Request(prompt=(5, 6, 7), max_new_tokens=32))
    for event in handle: ...            # or handle.result()

Each scheduling step, on the scheduler thread:
  1. takes in what arrived (new requests, cancellations); on multi-process runs process 0 sends
     it to the others, which run the same steps (`follow`), so every process runs the same
     programs in the same order;
  2. admits waiting requests into free slots;
  3. prefills one chunk (at most `max_bucket` tokens per row, rows packed up to `max_bucket`
     tokens in all): a long prompt takes several steps, interleaved with decoding; a request whose
     prompt is done samples its first token and joins the decoding rows;
  4. decodes up to `horizon` tokens for every decoding row in one compiled loop (ending early
     when a row finishes and requests wait for a slot), then hands each request its new tokens.
A request waits at most one horizon for its prefill to start.

Shapes: B slots, P rows of a prefill chunk, M tokens per row of a chunk (a power of two up to
`max_bucket`), S attended key slots (a power of two up to the capacity), V vocabulary.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import sampling
from grok1.cache import KVCache
from grok1.model import Grok1
from grok1.requests import (
    MAX_LOGPROBS,
    MAX_STOP_IDS,
    EngineDead,
    EngineError,
    Event,
    Handle,
    QueueFull,
    Request,
    RequestError,
    Result,
    TextTracker,
)
from grok1.steps import DecodeState, Steps

__all__ = [
    "MAX_LOGPROBS", "Engine", "EngineDead", "EngineError", "Event", "Handle", "QueueFull",
    "Request", "RequestError", "Result", "bucket", "to_host",
]  # fmt: skip

MIN_BUCKET = 16


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


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass
class _Job:
    """The scheduler's record of one request (on every process; `handle` on process 0 only)."""

    id: int
    request: Request
    handle: Handle | None
    stops: frozenset  # stop ids, EOS included unless ignored
    text: TextTracker | None
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    decoding: bool = False
    generated: int = 0
    prompt_logprobs: list = dataclasses.field(default_factory=list)
    prompt_top: list = dataclasses.field(default_factory=list)
    sent_prompt: bool = False

    @property
    def wants_top(self) -> int:
        return self.request.sampling.logprobs


_ENGINES: weakref.WeakSet = weakref.WeakSet()
_NUMBERS = itertools.count()  # names each engine's channel to the other processes


@atexit.register
def _close_all() -> None:  # stop scheduler threads before the interpreter tears down
    for engine in list(_ENGINES):
        engine.close()


class Engine:
    """Continuous batching over `max_slots` KV-cache rows; see the module docstring.

    Args:
      grok, params: the model and its parameters.
      max_slots: requests decoded together (rounded up to a multiple of `slot_multiple`).
      max_bucket: largest prefill chunk per row, and the prefill tokens of one step in all (a
        power of two).
      horizon: decode steps between two admissions.
      max_queue: requests that may wait for a slot; `submit` raises QueueFull beyond.
      cache_len: context capacity (default: the config's sequence_len).
      tokenizer: for text (events' `text`) and stop strings.
      slot_multiple: the mesh's data-axis size (rows are split over it).
    """

    def __init__(
        self,
        grok: Grok1,
        params,
        *,
        max_slots: int = 8,
        max_bucket: int = 1024,
        horizon: int = 8,
        max_queue: int = 256,
        cache_len: int | None = None,
        tokenizer=None,
        slot_multiple: int = 1,
    ):
        for name, value in (("max_slots", max_slots), ("horizon", horizon),
                            ("max_queue", max_queue)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_bucket < 1 or max_bucket & (max_bucket - 1):
            raise ValueError(f"max_bucket must be a power of two, got {max_bucket}")
        self.grok, self.params, self.config = grok, params, grok.config
        self.capacity = int(cache_len or self.config.sequence_len)
        self.max_bucket = min(max_bucket, _pow2(self.capacity))
        self.max_slots = max_slots + (-max_slots) % slot_multiple
        self.slot_multiple = slot_multiple
        self.horizon, self.max_queue = horizon, max_queue
        self.tokenizer = tokenizer
        self.steps = Steps(grok)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not yet admitted nor cancelled
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._channel = None
        self._device = None  # (cache, decode state, sampling params), made on first use
        self._number = next(_NUMBERS)
        self._jobs: dict[int, _Job] = {}
        self._waiting: deque[_Job] = deque()
        self._slots: list[_Job | None] = [None] * self.max_slots
        _ENGINES.add(self)

    # -- the caller's side -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether requests can be submitted (not closed, scheduler not dead)."""
        return not self._closed and self._error is None

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queues a request (from any thread) and returns its handle; see the module docstring.

        Raises RequestError (invalid request), QueueFull, EngineDead. `on_event` is called on the
        scheduler thread with each of the request's events, in order.
        """
        self.check(request)
        with self._lock:
            self._check_alive()
            if self._pending >= self.max_queue:
                raise QueueFull(
                    f"{self._pending} requests are already waiting (max_queue={self.max_queue})"
                )
            self._pending += 1
            handle = Handle(next(self._ids), request, on_event, self._cancel)
            self._start()
        self._inbox.put(("submit", handle))
        return handle

    def check(self, request: Request) -> None:
        """Raises RequestError unless the engine can serve `request`."""
        n, new = len(request.prompt), request.max_new_tokens
        if n == 0:
            raise RequestError("empty prompt: give at least one token", "prompt")
        vocab = self.config.vocab_size
        for t in request.prompt:
            if not isinstance(t, int | np.integer) or isinstance(t, bool) or not 0 <= t < vocab:
                raise RequestError(
                    f"token id {t!r} in the prompt is not an id of the vocabulary [0, {vocab})",
                    "prompt",
                )
        if not isinstance(new, int | np.integer) or new < 0:
            raise RequestError(f"max_new_tokens must be an int >= 0, got {new!r}", "max_tokens")
        if n > self.capacity:
            raise RequestError(
                f"the prompt has {n} tokens, more than the context of {self.capacity} tokens",
                "prompt",
            )
        if n + new > self.capacity:
            raise RequestError(
                f"this model's context is {self.capacity} tokens, but {n + new} were requested "
                f"({n} in the prompt, {new} new); ask for at most {self.capacity - n} new tokens",
                "max_tokens",
            )
        if new == 0 and not request.prompt_logprobs:
            raise RequestError("max_new_tokens is 0 and no prompt_logprobs: nothing to do",
                               "max_tokens")  # fmt: skip
        if len(request.stop_ids) > MAX_STOP_IDS:
            raise RequestError(f"at most {MAX_STOP_IDS} stop ids, got {len(request.stop_ids)}",
                               "stop")  # fmt: skip
        if any(not 0 <= int(t) < vocab for t in request.stop_ids):
            raise RequestError(f"stop ids must lie in [0, {vocab})", "stop")
        if request.stop_strings and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer", "stop")
        if request.sampling.logprobs > MAX_LOGPROBS:
            raise RequestError(
                f"logprobs must be at most {MAX_LOGPROBS}, got {request.sampling.logprobs}",
                "logprobs",
            )

    def stats(self) -> dict:
        """Queue depth and busy slots, for monitoring."""
        return {
            "waiting": self._pending,
            "running": sum(job is not None for job in self._slots),
            "max_slots": self.max_slots,
            "max_queue": self.max_queue,
            "alive": self.alive,
        }

    def warmup(
        self, progress: Callable[[str], None] | None = None, prompt_len: int | None = None,
        max_len: int | None = None,
    ) -> None:  # fmt: skip
        """Compiles, on the scheduler (every process of a multi-process run), the decode program
        for every attended-slot bucket up to `max_len` tokens of context and the one-row prefill
        for every chunk size up to `prompt_len` tokens (default: the whole capacity)."""
        done = threading.Event()
        with self._lock:
            self._check_alive()
            self._start()
        limits = (prompt_len or self.capacity, max_len or self.capacity)
        self._inbox.put(("warmup", (progress, limits, done)))
        while not done.wait(0.1):
            with self._lock:
                self._check_alive()

    def close(self) -> None:
        """Stops the scheduler; unfinished requests end "cancelled". Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            self._inbox.put(("close", None))
            thread.join()

    def follow(self) -> None:
        """Multi-process runs: on processes other than 0, runs the same steps as process 0 until
        it closes its engine (call instead of submitting)."""
        if jax.process_index() == 0:
            raise EngineError("follow() is for processes other than 0; process 0 submits")
        self._loop()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDead(f"the engine has stopped: {self._error!r}") from self._error
        if self._closed:
            raise EngineDead("the engine is closed")

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="grok1-engine", daemon=True)
            self._thread.start()

    def _cancel(self, handle: Handle) -> None:
        self._inbox.put(("cancel", handle))

    # -- the scheduler -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if jax.process_count() > 1:  # every process makes its engines in the same order
                from grok1.distributed import Channel

                self._channel = Channel(f"grok1/engine{self._number}")
            while True:
                messages, local = self._intake()
                if not self._apply(messages, local):
                    break
                self._admit()
                if self._prefill_once() or self._any_decoding():
                    self._decode_once()
        except BaseException as e:  # noqa: BLE001 - every failure ends the requests it strands
            self._error = e
            self._end_all("error", e)
            if jax.process_index() != 0:
                raise
        else:
            self._end_all("cancelled")

    def _busy(self) -> bool:
        return bool(self._waiting) or any(job is not None for job in self._slots)

    def _intake(self) -> tuple[list, dict]:
        """What arrived since the last step: (plain messages, the local objects they name: the
        handles of new requests, warm-up callbacks). Blocks while there is nothing to do. On
        multi-process runs process 0 sends the messages to the others, which have no objects."""
        if self._channel is not None and jax.process_index() != 0:
            return self._channel.receive(), {}
        items = [] if self._busy() else [self._inbox.get()]
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        messages, local = [], {}
        for kind, payload in items:
            if kind == "submit":
                local[payload.id] = payload
                messages.append(["submit", payload.id, payload.request.to_dict()])
            elif kind == "cancel":
                messages.append(["cancel", payload.id])
            elif kind == "warmup":
                local["warmup"] = payload
                messages.append(["warmup", *payload[1]])
            else:
                messages.append(["close"])
        if self._channel is not None:
            self._channel.publish(messages)
        return messages, local

    def _apply(self, messages: list, local: dict) -> bool:
        """Applies the intake; False once the engine is to close."""
        for message in messages:
            kind = message[0]
            if kind == "submit":
                _, job_id, data = message
                job = self._new_job(job_id, Request.from_dict(data), local.get(job_id))
                self._jobs[job_id] = job
                self._waiting.append(job)
            elif kind == "cancel":
                job = self._jobs.get(message[1])
                if job is not None:
                    self._finish(job, "cancelled")
            elif kind == "warmup":
                progress, _, done = local.get("warmup", (None, None, None))
                self._warmup(progress, *message[1:])
                if done is not None:
                    done.set()
            else:
                return False
        return True

    def _new_job(self, job_id: int, request: Request, handle: Handle | None) -> _Job:
        stops = set(request.stop_ids)
        if not request.ignore_eos:
            stops.add(self.config.eos_token)
        text = None
        if self.tokenizer is not None:
            text = TextTracker(self.tokenizer, request.stop_strings, request.prompt)
        return _Job(job_id, request, handle, frozenset(stops), text)

    def _admit(self) -> None:
        for slot, job in enumerate(self._slots):
            if job is None and self._waiting:
                job = self._waiting.popleft()
                job.slot = slot
                self._slots[slot] = job
                with self._lock:
                    self._pending -= 1

    def _any_decoding(self) -> bool:
        return any(job is not None and job.decoding for job in self._slots)

    # -- device state ------------------------------------------------------------------------
    def _ensure_device(self):
        if self._device is None:
            batch = self.max_slots
            state = DecodeState.zeros(batch, self.config.vocab_size)
            sp = sampling.BatchSamplingParams.stack([sampling.SamplingParams()] * batch)
            cache = self.new_cache(batch)
            if self.grok.mesh is None:
                cache = self._committed(cache)
            self._device = [cache, *self._committed((state, sp))]
        return self._device

    def _committed(self, tree):
        """`tree` committed to the model's device, as every program's outputs are. JAX compiles
        a program separately for committed and uncommitted arguments, so the slot state the
        programs first receive must already look like what they return: otherwise the warm-up
        compiles a variant that traffic never calls. On a mesh: replicated over it, spelled as
        the steps return it (`Steps.slot_sharding`; the cache, placed by its own sharding, is
        committed already)."""
        if self.steps.slot_sharding is not None:
            return jax.device_put(tree, self.steps.slot_sharding)
        (device,) = jax.tree.leaves(self.params)[0].devices()
        return jax.device_put(tree, device)

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache of `batch` rows, placed on the model's mesh (`KVCache.shapes`)."""
        dtype = self.grok.compute_dtype
        return KVCache.zeros(self.config, batch, self.capacity, dtype, self.grok.mesh)

    @property
    def table(self) -> jax.Array:
        """`Grok1.embedding_table(params)`, computed once and passed to every program."""
        if not hasattr(self, "_table"):
            self._table = jax.jit(self.grok.embedding_table)(self.params)
        return self._table

    # -- public step functions ---------------------------------------------------------------
    def prefill_chunk(self, cache, slots, starts, tokens, n_new, *, kv_len=None):
        """Appends tokens [P, M] to cache rows `slots` [P] at positions `starts` [P] (the first
        n_new [P] of each row are real). Returns (logits [P, V] f32 at each row's last real
        token, cache). `kv_len` defaults to the bucket holding every row's new length."""
        tokens = np.asarray(tokens, np.int32)
        kv_len = kv_len or bucket(int(np.max(starts)) + tokens.shape[1], self.capacity)
        last, _, cache = self.steps.prefill(
            self.params, cache, np.asarray(slots, np.int32), np.asarray(starts, np.int32),
            tokens, np.asarray(n_new, np.int32), np.zeros_like(tokens), kv_len=kv_len,
            table=self.table,
        )  # fmt: skip
        return last, cache

    def score_chunk(self, cache, slots, starts, tokens, targets, n_new, *, kv_len=None, top_k=0):
        """Like `prefill_chunk`, also scoring: returns (ChunkScores with log p(targets) [P, M]
        (and the top_k alternatives), cache)."""
        tokens = np.asarray(tokens, np.int32)
        kv_len = kv_len or bucket(int(np.max(starts)) + tokens.shape[1], self.capacity)
        _, scores, cache = self.steps.prefill(
            self.params, cache, np.asarray(slots, np.int32), np.asarray(starts, np.int32),
            tokens, np.asarray(n_new, np.int32), np.asarray(targets, np.int32), kv_len=kv_len,
            table=self.table, scores=True, top_k=top_k,
        )  # fmt: skip
        return scores, cache

    def logits_chunk(self, cache, slots, starts, tokens, n_new, *, kv_len=None):
        """Like `prefill_chunk`, returning the logits [P, M, V] f32 of every position."""
        tokens = np.asarray(tokens, np.int32)
        kv_len = kv_len or bucket(int(np.max(starts)) + tokens.shape[1], self.capacity)
        return self.steps.logits(
            self.params, cache, np.asarray(slots, np.int32), np.asarray(starts, np.int32),
            tokens, np.asarray(n_new, np.int32), kv_len=kv_len, table=self.table,
        )  # fmt: skip

    def decode_steps(self, cache, state, sp, n_steps: int, *, kv_len=None, top_k=0,
                     stop_early=False):  # fmt: skip
        """Up to n_steps decode steps of every active row of `state` (a `steps.DecodeState`)
        with sampling params `sp`. Returns (cache, state, DecodeOutput). `kv_len` defaults to
        the bucket holding every row's length after n_steps."""
        if kv_len is None:
            longest = int(to_host(cache.lengths).max())
            kv_len = bucket(min(longest + n_steps, self.capacity), self.capacity)
        if self.grok.mesh is not None:  # placed as the program returns them (donated)
            state, sp = self._committed((state, sp))
        return self.steps.decode(
            self.params, cache, state, sp, jnp.bool_(stop_early), kv_len=kv_len,
            n_steps=n_steps, top_k=top_k, table=self.table,
        )  # fmt: skip

    # -- one prefill chunk -------------------------------------------------------------------
    def _prefill_rows(self) -> tuple[list[_Job], int]:
        """The rows of the next prefill chunk (in admission order) and its width M."""
        rows, width = [], 0
        for job in self._slots:
            if job is None or job.decoding or job.prefilled >= len(job.request.prompt):
                continue
            need = min(len(job.request.prompt) - job.prefilled, self.max_bucket)
            grown = bucket(max(width, need), self.max_bucket)
            if rows and self._rows_for(len(rows) + 1) * grown > self.max_bucket:
                break
            rows.append(job)
            width = grown
        return rows, width

    def _rows_for(self, n: int) -> int:
        """Rows of a step that serves n requests (a prefill chunk, first tokens, admissions): one
        (the data axis' size) or every slot, so that few programs cover all traffic."""
        return self.slot_multiple if n <= self.slot_multiple else self.max_slots

    def _prefill_once(self) -> bool:
        """One prefill chunk, if any row is prefilling; returns whether one ran."""
        jobs, m = self._prefill_rows()
        if not jobs:
            return False
        cache, state, sp = self._ensure_device()
        p = self._rows_for(len(jobs))
        slots = np.full(p, self.max_slots, np.int32)  # padding rows: nowhere
        starts, n_new = np.zeros(p, np.int32), np.zeros(p, np.int32)
        tokens, targets = np.zeros((p, m), np.int32), np.zeros((p, m), np.int32)
        for i, job in enumerate(jobs):
            prompt = job.request.prompt
            n = min(len(prompt) - job.prefilled, m)
            slots[i], starts[i], n_new[i] = job.slot, job.prefilled, n
            tokens[i, :n] = prompt[job.prefilled : job.prefilled + n]
            nxt = prompt[job.prefilled + 1 : job.prefilled + n + 1]
            targets[i, : len(nxt)] = nxt
        scores = any(job.request.prompt_logprobs for job in jobs)
        top_k = MAX_LOGPROBS if any(j.request.prompt_logprobs and j.wants_top for j in jobs) else 0
        kv_len = bucket(int((starts + m).max()), self.capacity)
        last, chunk_scores, cache = self.steps.prefill(
            self.params, cache, slots, starts, tokens, n_new, targets, kv_len=kv_len,
            table=self.table, scores=scores, top_k=top_k,
        )  # fmt: skip
        self._device[0] = cache
        if scores:
            self._collect_prompt_scores(jobs, n_new, chunk_scores)
        done = []
        for job, n in zip(jobs, n_new, strict=False):
            job.prefilled += int(n)
            if job.prefilled == len(job.request.prompt):
                done.append(job)
        if done:
            self._start_decoding(done, jobs, last)
        return True

    def _collect_prompt_scores(self, jobs, n_new, scores) -> None:
        logp = to_host(scores.logprobs)
        top = None if scores.top_ids is None else (to_host(scores.top_ids),
                                                   to_host(scores.top_logprobs))  # fmt: skip
        for i, job in enumerate(jobs):
            if not job.request.prompt_logprobs:
                continue
            # position t of the chunk predicts prompt[start + t + 1], if there is one
            n = min(int(n_new[i]), len(job.request.prompt) - 1 - job.prefilled)
            job.prompt_logprobs += logp[i, :n].tolist()
            if job.wants_top and top is not None:
                ids, vals = top[0][i, :n, : job.wants_top], top[1][i, :n, : job.wants_top]
                job.prompt_top += _pairs(ids, vals)

    def _start_decoding(self, done: list[_Job], jobs: list[_Job], last: jax.Array) -> None:
        """Samples the first token of the requests whose prompt is now in the cache."""
        for job in done:
            if job.request.max_new_tokens == 0:
                self._emit(job, [], [], None, "length", "" if job.text is not None else None)
        starting = [job for job in done if job.request.max_new_tokens > 0]
        if not starting:
            return
        index = np.array([jobs.index(job) for job in starting])
        rows = self._rows_for(len(starting))
        logits = _rows_of(last, index, rows)
        params = [job.request.sampling for job in starting]
        params += [sampling.SamplingParams()] * (rows - len(starting))
        row_sp = sampling.BatchSamplingParams.stack(params)
        seen = np.zeros((rows, self.config.vocab_size), bool)
        for i, job in enumerate(starting):
            seen[i, list(job.request.prompt)] = True
        picked = self.steps.first_tokens(logits, row_sp, seen, top_k=MAX_LOGPROBS)
        tokens, logps = to_host(picked.tokens), to_host(picked.logprobs)
        top = (to_host(picked.top_ids), to_host(picked.top_logprobs))
        slots = np.full(rows, self.max_slots, np.int32)
        seen = seen.copy()  # the array handed to first_tokens stays as it was
        active, budget = np.zeros(rows, bool), np.zeros(rows, np.int32)
        stop_ids = np.full((rows, MAX_STOP_IDS + 1), -1, np.int32)
        for i, job in enumerate(starting):
            tok = int(tokens[i])
            ended = tok in job.stops or job.request.max_new_tokens == 1
            slots[i], budget[i] = job.slot, job.request.max_new_tokens
            stop_ids[i, : len(job.stops)] = sorted(job.stops)
            seen[i, tok] = True
            job.decoding, job.generated = True, 1
            active[i] = not self._deliver_tokens(job, [tok], [float(logps[i])],
                                                 None if top is None else (top[0][i:i + 1],
                                                                           top[1][i:i + 1]),
                                                 ended)  # fmt: skip
        new_rows = _admitted_rows(tokens, budget, active, stop_ids, seen)
        cache, state, sp = self._device
        state, sp = self.steps.admit(state, sp, slots, new_rows, row_sp)
        self._device[1:] = [state, sp]

    # -- one decode call ---------------------------------------------------------------------
    def _decode_once(self) -> None:
        jobs = [job for job in self._slots if job is not None and job.decoding]
        if not jobs:
            return
        cache, state, sp = self._device
        longest = max(len(job.request.prompt) + job.generated - 1 for job in jobs)
        kv_len = bucket(min(longest + self.horizon, self.capacity), self.capacity)
        cache, state, out = self.steps.decode(
            self.params, cache, state, sp, jnp.bool_(bool(self._waiting)), kv_len=kv_len,
            n_steps=self.horizon, top_k=MAX_LOGPROBS, table=self.table,
        )  # fmt: skip
        self._device = [cache, state, sp]
        count, tokens = to_host(out.count), to_host(out.tokens)
        logps, active = to_host(out.logprobs), to_host(state.active)
        top = (to_host(out.top_ids), to_host(out.top_logprobs))
        cut = []
        for job in jobs:
            s, n = job.slot, int(count[job.slot])
            job.generated += n
            ended = not active[s]
            row_top = None if top is None else (top[0][s, :n], top[1][s, :n])
            stopped = self._deliver_tokens(job, tokens[s, :n].tolist(), logps[s, :n].tolist(),
                                           row_top, ended)  # fmt: skip
            if stopped and not ended:
                cut.append(s)
        if cut:
            self._deactivate(cut)

    def _deactivate(self, slots: list[int]) -> None:
        """Stops decoding in these slots (one program: a row per slot, padded)."""
        rows = np.full(self.max_slots, self.max_slots, np.int32)
        rows[: len(slots)] = slots
        self._device[1] = self.steps.deactivate(self._device[1], rows)

    def _deliver_tokens(self, job: _Job, tokens, logps, top, ended: bool) -> bool:
        """Hands a decoding job its new tokens; finishes it if `ended` (EOS, a stop id or its
        budget) or if a stop string appears. Returns whether the job finished."""
        reason, stop = None, None
        if ended:
            if tokens and tokens[-1] in job.stops:
                reason, stop = "stop", tokens[-1]
                if not job.request.include_stop_token:
                    tokens, logps = tokens[:-1], logps[:-1]
                    top = None if top is None else (top[0][:-1], top[1][:-1])
            else:
                reason = "length"
        pairs = None if top is None else _pairs(top[0][:, : job.wants_top],
                                                top[1][:, : job.wants_top])  # fmt: skip
        text = None
        if job.text is not None:
            text, tokens, logps, pairs, reason, stop = job.text.advance(
                tokens, logps, pairs, reason, stop
            )
        self._emit(job, tokens, logps, pairs, reason, text, stop)
        return reason is not None

    def _emit(self, job, tokens, logps, pairs, reason, text=None, stop=None, error=None) -> None:
        """Hands one event to the job's handle (process 0) and frees its slot when it ends."""
        if reason is not None:
            self._release(job)
        if job.handle is None:
            return
        event = Event(list(map(int, tokens)), [float(x) for x in logps], pairs, text, reason)
        if not job.sent_prompt:
            job.sent_prompt = True
            if job.request.prompt_logprobs:
                event.prompt_logprobs = job.prompt_logprobs
                event.prompt_top_logprobs = job.prompt_top if job.wants_top else None
        job.handle.deliver(event, stop=stop, error=error)

    def _release(self, job: _Job) -> None:
        if job.slot >= 0 and self._slots[job.slot] is job:
            self._slots[job.slot] = None
        self._jobs.pop(job.id, None)

    def _finish(self, job: _Job, reason: str, error: BaseException | None = None) -> None:
        """Ends a job from outside the decode flow (a cancellation, the engine's end)."""
        if job in self._waiting:
            self._waiting.remove(job)
            with self._lock:
                self._pending -= 1
        elif job.decoding and self._device is not None and job.slot >= 0:
            self._deactivate([job.slot])
        text = None
        if job.text is not None and reason == "cancelled":
            text, _ = job.text.finish()
        self._emit(job, [], [], None, reason, text, error=error)

    def _end_all(self, reason: str, error: BaseException | None = None) -> None:
        for job in list(self._jobs.values()):
            try:
                self._finish(job, reason, error)
            except Exception:  # noqa: BLE001 - the device may be gone: still end the handle
                if job.handle is not None and not job.handle.done:
                    job.handle.deliver(Event([], [], finish_reason=reason), error=error)
        # requests still in the inbox
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                payload.deliver(Event([], [], finish_reason=reason), error=error)
            elif kind == "warmup":
                payload[-1].set()

    # -- warm-up -----------------------------------------------------------------------------
    def _warmup(self, progress, prompt_len: int, max_len: int) -> None:
        """Runs every program the scheduler uses for contexts up to max_len and prompts up to
        prompt_len, on rows that write nowhere (the device state is unchanged)."""
        say = progress or (lambda _: None)
        cache, state, sp = self._ensure_device()
        top = bucket(min(max_len + self.horizon, self.capacity), self.capacity)
        buckets, b = [], MIN_BUCKET
        while True:
            buckets.append(min(b, top))
            if b >= top:
                break
            b *= 2
        say(f"compiling the decode step for {len(buckets)} context sizes")
        inactive = self._committed(dataclasses.replace(state, active=jnp.zeros_like(state.active)))
        for kv_len in buckets:
            cache, inactive, _ = self.steps.decode(
                self.params, cache, inactive, sp, jnp.bool_(False), kv_len=kv_len,
                n_steps=self.horizon, top_k=MAX_LOGPROBS, table=self.table,
            )  # fmt: skip
        longest = bucket(min(prompt_len, self.max_bucket), self.max_bucket)
        row_counts = sorted({self._rows_for(1), self._rows_for(self.max_slots)})
        shapes = [(p, m) for p in row_counts for m in buckets if m <= longest
                  and (p == row_counts[0] or p * m <= self.max_bucket)]  # fmt: skip
        say(f"compiling the prefill step for {len(shapes)} shapes")
        last = {}
        for p, m in shapes:
            zeros, nowhere = np.zeros((p, m), np.int32), np.full(p, self.max_slots, np.int32)
            flat = np.zeros(p, np.int32)
            last[p], _, cache = self.steps.prefill(
                self.params, cache, nowhere, flat, zeros, flat, zeros, kv_len=m,
                table=self.table, scores=False, top_k=0,
            )  # fmt: skip
        say("compiling the first-token and admission steps")
        vocab = self.config.vocab_size
        for chunk_rows, rows in [(p, r) for p in last for r in row_counts if r <= p]:
            logits = _rows_of(last[chunk_rows], np.zeros(1, int), rows)
            row_sp = sampling.BatchSamplingParams.stack([sampling.SamplingParams()] * rows)
            seen = np.zeros((rows, vocab), bool)
            picked = self.steps.first_tokens(logits, row_sp, seen, top_k=MAX_LOGPROBS)
            tokens, budget = to_host(picked.tokens), np.zeros(rows, np.int32)
            stop_ids = np.full((rows, MAX_STOP_IDS + 1), -1, np.int32)
            new_rows = _admitted_rows(tokens, budget, np.zeros(rows, bool), stop_ids, seen)
            nowhere = np.full(rows, self.max_slots, np.int32)
            inactive, sp = self.steps.admit(inactive, sp, nowhere, new_rows, row_sp)
        self._device = [cache, inactive, sp]
        self._deactivate([])
        # every program ran on rows that write nowhere; the rows that were decoding still are
        self._device[1] = dataclasses.replace(self._device[1], active=state.active)
        say("compiled")


def _rows_of(last: jax.Array, index: np.ndarray, rows: int) -> jax.Array:
    """Rows `index` of a prefill chunk's last logits [P, V], padded with row 0 to `rows`."""
    return jnp.asarray(last)[np.pad(index, (0, rows - len(index)))]


def _admitted_rows(tokens, budget, active, stop_ids, seen) -> DecodeState:
    """The slot state of rows that start decoding after their first token (host arrays)."""
    return DecodeState(
        last=jnp.asarray(tokens), steps=jnp.ones(len(tokens), jnp.int32),
        budget=jnp.asarray(budget), active=jnp.asarray(active), stop_ids=jnp.asarray(stop_ids),
        seen=jnp.asarray(seen),
    )  # fmt: skip


def _pairs(ids: np.ndarray, vals: np.ndarray) -> list:
    """[[(id, logprob), ...] per position] from [N, k] arrays."""
    return [
        list(zip(map(int, i), map(float, v), strict=True))
        for i, v in zip(ids.tolist(), vals.tolist(), strict=True)
    ]


def run_all(engine: Engine, requests: Sequence[Request], max_batch: int | None = None) -> list:
    """Submits `requests` (at most `max_batch` in flight at once) and waits for their results, in
    order. A KeyboardInterrupt cancels the requests still running and propagates."""
    limit = max(1, min(max_batch or engine.max_slots, engine.max_queue))
    handles: list[Handle] = []
    results: list[Result | None] = [None] * len(requests)
    try:
        for i, request in enumerate(requests):
            if i >= limit:
                results[i - limit] = handles[i - limit].result()
            handles.append(engine.submit(request))
        for i in range(max(0, len(requests) - limit), len(requests)):
            results[i] = handles[i].result()
    finally:
        for handle in handles:
            handle.cancel()
    for result in results:
        if result.finish_reason == "error":
            raise EngineDead(f"the engine failed: {result.error!r}") from result.error
    return results
