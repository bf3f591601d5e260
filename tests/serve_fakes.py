"""A small stand-in for `grok1.engine.Engine` that keeps its public contract (engine_api.md), for
fast tests of the HTTP server without compiling a model.

It is honest about what the server relies on: a real scheduler thread that admits waiting
requests into `max_slots` slots and decodes `horizon` steps between admissions (sleeping
`step_s` per step); `on_event` called on that thread through the engine's own `Handle`; the
engine's own validation (`Engine.check`), text and stop strings (`TextTracker`); a bounded
queue (QueueFull); a cancelled request's slot freed at the next step; and a visible death
(EngineDead, open requests ending "error").

Its "model" is a fixed random order-2 Markov chain over the vocabulary: the log-probabilities
after a context depend only on its last two tokens (`FakeEngine.logprobs`), and after
`EOS_TRIGGER` the EOS token is the most likely. Sampling draws from a generator seeded by the
request's seed and the step, so a seed gives the same tokens in any batch.
"""

from __future__ import annotations

import itertools
import threading
import time
import types
from collections import deque

import numpy as np

from grok1.engine import Engine
from grok1.requests import EngineDead, Event, Handle, QueueFull, Request, TextTracker

EOS_TRIGGER = 7  # after this token EOS is the most likely next token


class _Job:
    def __init__(self, handle: Handle, engine: FakeEngine):
        self.handle, self.request = handle, handle.request
        self.context = list(self.request.prompt)
        self.generated = 0
        self.sent_prompt = False
        self.prompt_logprobs = self.prompt_top = None
        self.stops = set(self.request.stop_ids)
        if not self.request.ignore_eos:
            self.stops.add(engine.config.eos_token)
        self.text = None
        if engine.tokenizer is not None:
            self.text = TextTracker(
                engine.tokenizer, self.request.stop_strings, self.request.prompt
            )


class FakeEngine:
    check = Engine.check  # the engine's own validation (needs config, capacity, tokenizer)

    def __init__(self, tokenizer=None, vocab_size: int | None = None, *, capacity: int = 256,
                 max_slots: int = 4, horizon: int = 4, max_queue: int = 16,
                 step_s: float = 0.002):  # fmt: skip
        self.tokenizer = tokenizer
        vocab = vocab_size or tokenizer.vocab_size
        eos = tokenizer.eos_id if tokenizer is not None else 2
        self.config = types.SimpleNamespace(vocab_size=vocab, eos_token=eos)
        self.capacity, self.max_slots, self.horizon = capacity, max_slots, horizon
        self.max_queue, self.step_s = max_queue, step_s
        self._table = np.random.default_rng(0).standard_normal((64, vocab)).astype(np.float32) * 4
        self._lock = threading.Lock()
        self._waiting: deque[Handle] = deque()
        self._slots: list[_Job] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._go = threading.Event()
        self._go.set()
        self._kill = False
        self._error: BaseException | None = None

    # -- the model --------------------------------------------------------------------------
    def logprobs(self, context) -> np.ndarray:
        """log p(next | context) [V] float32: depends on the last two tokens only."""
        a = context[-1] if context else 0
        b = context[-2] if len(context) > 1 else 0
        logits = self._table[(a * 31 + b * 17) % len(self._table)].copy()
        logits[a % self.config.vocab_size] -= 2.0
        if a == EOS_TRIGGER:
            logits[self.config.eos_token] = logits.max() + 5.0
        return (logits - np.logaddexp.reduce(logits)).astype(np.float32)

    def _sample(self, lp: np.ndarray, request: Request, step: int) -> int:
        sp = request.sampling
        if sp.temperature == 0:
            return int(np.argmax(lp))
        scaled = lp.astype(np.float64) / sp.temperature
        if sp.top_k:
            scaled[scaled < np.sort(scaled)[-sp.top_k]] = -np.inf
        probs = np.exp(scaled - np.logaddexp.reduce(scaled))
        return int(np.random.default_rng([sp.seed, step]).choice(len(probs), p=probs / probs.sum()))

    @staticmethod
    def _top(lp: np.ndarray, k: int):
        ids = np.argsort(-lp, kind="stable")[:k]
        return [(int(i), float(lp[i])) for i in ids]

    # -- the contract ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed and self._error is None

    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._waiting), "running": len(self._slots),
                    "max_slots": self.max_slots, "max_queue": self.max_queue,
                    "alive": self.alive}  # fmt: skip

    def warmup(self, progress=None) -> None:
        for what in ("the decode step (fake)", "the prefill step (fake)"):
            if progress is not None:
                progress(f"compiling {what}")

    def submit(self, request: Request, on_event=None) -> Handle:
        self.check(request)
        with self._lock:
            if self._error is not None or self._closed:
                raise EngineDead("the engine has stopped") from self._error
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            handle = Handle(next(self._ids), request, on_event, self._cancel)
            self._waiting.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="fake-eng")
                self._thread.start()
        return handle

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            self._cancelled.add(handle.id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._end_all("cancelled", None)

    def follow(self) -> None:
        while not self._closed:
            time.sleep(0.01)

    # -- test hooks -------------------------------------------------------------------------
    def hold(self) -> None:
        """Stops the scheduler before its next step (requests stay queued)."""
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def kill(self) -> None:
        """Makes the scheduler thread fail at its next step."""
        self._kill = True

    # -- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closed:
                self._go.wait()
                if self._kill:
                    raise RuntimeError("killed by the test")
                self._admit()
                for _ in range(self.horizon if self._slots else 1):
                    self._step()
                    time.sleep(self.step_s)
                    if not self._slots:
                        break
        except BaseException as e:  # the engine is dead: every open request ends "error"
            self._error = e
            self._end_all("error", e)

    def _end_all(self, reason: str, error) -> None:
        with self._lock:
            handles = [job.handle for job in self._slots] + list(self._waiting)
            self._slots, self._waiting = [], deque()
        for handle in handles:
            if not handle.done:
                handle.deliver(Event([], [], finish_reason=reason), error=error)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or len(self._slots) >= self.max_slots:
                    return
                handle = self._waiting.popleft()
                job = _Job(handle, self)
                if handle.id not in self._cancelled:
                    self._slots.append(job)
            if handle.id in self._cancelled:
                self._emit(job, [], [], None, "cancelled")
                continue
            if job.request.prompt_logprobs:
                prompt, k = job.request.prompt, job.request.sampling.logprobs
                lps = [self.logprobs(prompt[:t]) for t in range(1, len(prompt))]
                job.prompt_logprobs = [float(lp[prompt[t + 1]]) for t, lp in enumerate(lps)]
                job.prompt_top = [self._top(lp, k) for lp in lps] if k else None
            if job.request.max_new_tokens == 0:
                self._emit(job, [], [], None, "length")
            else:
                self._next_token(job)  # the prefill samples the first token

    def _step(self) -> None:
        for job in list(self._slots):
            if job.handle.id in self._cancelled:
                text = job.text.finish()[0] if job.text is not None else None
                self._emit(job, [], [], None, "cancelled", text)
            else:
                self._next_token(job)

    def _next_token(self, job: _Job) -> None:
        """One token, delivered as `Engine._deliver_tokens` does."""
        r = job.request
        lp = self.logprobs(job.context)
        token = self._sample(lp, r, job.generated)
        job.generated += 1
        job.context.append(token)
        tokens, logps = [token], [float(lp[token])]
        pairs = [self._top(lp, r.sampling.logprobs)] if r.sampling.logprobs else None
        reason = stop = None
        if token in job.stops:
            reason, stop = "stop", token
            if not r.include_stop_token:
                tokens, logps, pairs = [], [], None if pairs is None else []
        elif job.generated >= r.max_new_tokens:
            reason = "length"
        text = None
        if job.text is not None:
            text, tokens, logps, pairs, reason, stop = job.text.advance(
                tokens, logps, pairs, reason, stop
            )
        self._emit(job, tokens, logps, pairs, reason, text, stop)

    def _emit(self, job: _Job, tokens, logps, pairs, reason, text=None, stop=None) -> None:
        if reason is not None:
            with self._lock:
                if job in self._slots:
                    self._slots.remove(job)
        event = Event(tokens, logps, pairs, text, reason)
        if not job.sent_prompt:
            job.sent_prompt = True
            if job.request.prompt_logprobs:
                event.prompt_logprobs = job.prompt_logprobs
                event.prompt_top_logprobs = job.prompt_top
        job.handle.deliver(event, stop=stop)
