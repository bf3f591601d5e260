"""A small stand-in for `grok1.engine.Engine` that keeps its public contract (engine_api.md), for
fast tests of the HTTP server without compiling a model.

It is honest about what the server relies on: a real scheduler thread that admits waiting
requests into `max_slots` slots, decodes `horizon` steps between admissions (sleeping `step_s`
per step), calls `on_event` on that thread, bounds the queue (QueueFull), validates at submit
(RequestError naming the field), frees a cancelled slot at the next step, holds back text that
could start a stop string or is an incomplete character, and dies visibly (EngineDead).

Its "model" is a fixed random order-2 Markov chain over the vocabulary: the log-probabilities
after a context depend only on its last two tokens (`FakeEngine.logprobs`), and after
`EOS_TRIGGER` the EOS token is the most likely. Sampling draws from a generator seeded by the
request's seed and the step, so a seed gives the same tokens in any batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time

import numpy as np

from grok1.engine import MAX_LOGPROBS, EngineDead, QueueFull, Request, RequestError

EOS_TRIGGER = 7  # after this token EOS is the most likely next token


@dataclasses.dataclass
class Event:
    tokens: list
    logprobs: list
    top_logprobs: list | None
    text: str | None
    finish_reason: str | None = None
    prompt_logprobs: list | None = None
    prompt_top_logprobs: list | None = None


@dataclasses.dataclass
class Result:
    tokens: list
    logprobs: list
    top_logprobs: list | None
    text: str | None
    finish_reason: str
    prompt_logprobs: list | None
    prompt_top_logprobs: list | None
    stop: int | str | None
    num_prompt_tokens: int
    submitted_at: float
    first_token_at: float | None
    finished_at: float
    error: BaseException | None = None


class Handle:
    def __init__(self, hid: int, request: Request, on_event):
        self.id, self.request, self._on_event = hid, request, on_event
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._result: Result | None = None

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self._result

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()


class _Slot:
    """A running request: its generated tokens and the text not yet sent."""

    def __init__(self, handle: Handle, tokenizer):
        self.handle, self.request = handle, handle.request
        self.context = list(self.request.prompt)
        self.tokens, self.logprobs, self.tops = [], [], []
        self.sent = 0  # tokens already sent in events
        self.decoder = None
        if tokenizer is not None:  # the text of the new tokens as they continue the prompt
            self.decoder = tokenizer.stream_decoder()
            for t in self.request.prompt:
                self.decoder.feed(t)
        self.text = ""  # decoded text of self.tokens[: decoded]
        self.sent_chars = 0
        self.submitted_at = time.monotonic()
        self.first_token_at = None
        self.all_tokens, self.all_logprobs, self.all_tops, self.all_text = [], [], [], ""
        self.prompt_logprobs = self.prompt_top = None


class FakeEngine:
    def __init__(
        self,
        tokenizer=None,
        vocab_size: int | None = None,
        *,
        capacity: int = 256,
        max_slots: int = 4,
        horizon: int = 4,
        max_queue: int = 16,
        step_s: float = 0.002,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id if tokenizer is not None else 2
        self.capacity, self.max_slots, self.horizon = capacity, max_slots, horizon
        self.max_queue, self.step_s = max_queue, step_s
        self._table = self._make_table()
        self._lock = threading.Lock()
        self._waiting: list[Handle] = []
        self._slots: list[_Slot] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._kill = False
        self._death: BaseException | None = None
        self.warmed_up = False
        self.closed = False

    # -- the model --------------------------------------------------------------------------
    def _make_table(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        v = self.vocab_size
        logits = rng.standard_normal((64, v)).astype(np.float32) * 4
        return logits

    def logprobs(self, context) -> np.ndarray:
        """log p(next | context) [V] float32: depends on the last two tokens only."""
        a = context[-1] if context else 0
        b = context[-2] if len(context) > 1 else 0
        logits = self._table[(a * 31 + b * 17) % len(self._table)].copy()
        logits[a % self.vocab_size] -= 2.0  # some dependence on the token itself
        if a == EOS_TRIGGER:
            logits[self.eos_id] = logits.max() + 5.0
        return (logits - np.logaddexp.reduce(logits)).astype(np.float32)

    def _sample(self, lp: np.ndarray, request: Request, step: int) -> int:
        sp = request.sampling
        if sp.temperature == 0:
            return int(np.argmax(lp))
        scaled = lp.astype(np.float64) / sp.temperature
        if sp.top_k:
            kth = np.sort(scaled)[-sp.top_k]
            scaled[scaled < kth] = -np.inf
        probs = np.exp(scaled - np.logaddexp.reduce(scaled))
        rng = np.random.default_rng([sp.seed, step])
        return int(rng.choice(len(probs), p=probs / probs.sum()))

    def _top(self, lp: np.ndarray, k: int):
        if not k:
            return None
        ids = np.argsort(-lp, kind="stable")[:k]
        return [(int(i), float(lp[i])) for i in ids]

    # -- contract ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._death is None and not self.closed

    def stats(self) -> dict:
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": len(self._slots),
                "max_slots": self.max_slots,
                "max_queue": self.max_queue,
                "alive": self.alive,
            }

    def warmup(self, progress=None) -> None:
        for what in ("prefill", "decode"):
            if progress is not None:
                progress(f"{what} (fake)")
        self.warmed_up = True

    def submit(self, request: Request, on_event=None) -> Handle:
        self._validate(request)
        with self._lock:
            if self._death is not None:
                raise EngineDead("the scheduler thread died") from self._death
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            handle = Handle(next(self._ids), request, on_event)
            self._waiting.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="fake-eng")
                self._thread.start()
        return handle

    def _validate(self, r: Request) -> None:
        if not r.prompt or any(not 0 <= t < self.vocab_size for t in r.prompt):
            raise RequestError(
                f"prompt ids must be a non-empty sequence in [0, {self.vocab_size})", "prompt"
            )
        if r.max_new_tokens < 0:
            raise RequestError("max_new_tokens must be >= 0", "max_new_tokens")
        if len(r.prompt) + r.max_new_tokens > self.capacity:
            raise RequestError(
                f"This model's maximum context length is {self.capacity} tokens. However, you "
                f"requested {len(r.prompt) + r.max_new_tokens} tokens ({len(r.prompt)} in the "
                f"prompt, {r.max_new_tokens} for the completion).",
                "max_new_tokens",
            )
        if r.sampling.logprobs > MAX_LOGPROBS:
            raise RequestError(f"logprobs must be at most {MAX_LOGPROBS}", "logprobs")
        if r.stop_strings and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer", "stop")

    def close(self) -> None:
        self._stop.set()
        self._go.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.closed = True
        with self._lock:
            pending = [s.handle for s in self._slots] + self._waiting
            self._slots, self._waiting = [], []
        for handle in pending:
            self._finish_handle(handle, "cancelled", None)

    def follow(self) -> None:
        self._stop.wait()

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
            while not self._stop.is_set():
                self._go.wait()
                if self._stop.is_set():
                    return
                if self._kill:
                    raise RuntimeError("killed by the test")
                self._admit()
                if not self._slots:
                    time.sleep(self.step_s)
                    continue
                for _ in range(self.horizon):
                    self._step()
                    time.sleep(self.step_s)
                    if not self._slots:
                        break
        except BaseException as e:  # the engine is dead: every open request ends "error"
            with self._lock:
                self._death = e
                pending = [s.handle for s in self._slots] + self._waiting
                self._slots, self._waiting = [], []
            for handle in pending:
                self._finish_handle(handle, "error", e)

    def _admit(self) -> None:
        admitted = []
        with self._lock:
            while self._waiting and len(self._slots) + len(admitted) < self.max_slots:
                admitted.append(self._waiting.pop(0))
        for handle in admitted:
            if handle._cancelled.is_set():
                self._finish_handle(handle, "cancelled", None)
                continue
            slot = _Slot(handle, self.tokenizer)
            with self._lock:
                self._slots.append(slot)
            if handle.request.prompt_logprobs:
                self._prompt_logprobs(slot)
            self._next_token(slot)  # the prefill gives the first token

    def _prompt_logprobs(self, slot: _Slot) -> None:
        prompt, k = slot.request.prompt, slot.request.sampling.logprobs
        lps, tops = [], []
        for t in range(1, len(prompt)):
            lp = self.logprobs(prompt[:t])
            lps.append(float(lp[prompt[t]]))
            tops.append(self._top(lp, k))
        slot.prompt_logprobs, slot.prompt_top = lps, tops if k else None

    def _step(self) -> None:
        for slot in list(self._slots):
            if slot.handle._cancelled.is_set():
                self._end(slot, "cancelled", None)
            else:
                self._next_token(slot)

    def _next_token(self, slot: _Slot) -> None:
        r = slot.request
        if len(slot.all_tokens) >= r.max_new_tokens:
            return self._end(slot, "length", None)
        lp = self.logprobs(slot.context)
        token = self._sample(lp, r, len(slot.all_tokens))
        stops = set(r.stop_ids) | (set() if r.ignore_eos else {self.eos_id})
        if token in stops:
            return self._end(slot, "stop", token)
        if slot.first_token_at is None:
            slot.first_token_at = time.monotonic()
        slot.context.append(token)
        slot.tokens.append(token)
        slot.logprobs.append(float(lp[token]))
        slot.tops.append(self._top(lp, r.sampling.logprobs))
        if slot.decoder is not None:
            slot.text += slot.decoder.feed(token)
        found = self._stop_string(slot)
        if found is not None:
            return self._end(slot, "stop", found)
        if len(slot.all_tokens) + len(slot.tokens) >= r.max_new_tokens:
            return self._end(slot, "length", None)
        self._emit(slot, None)

    def _stop_string(self, slot: _Slot) -> str | None:
        for s in slot.request.stop_strings:
            at = (slot.all_text + slot.text).find(s)
            if at >= 0:
                slot.text = slot.text[: max(0, at - len(slot.all_text))]
                # keep the tokens whose text ends before the stop string
                dec, kept, n = self.tokenizer.stream_decoder(), 0, 0
                for t in slot.request.prompt:
                    dec.feed(t)
                for t in slot.all_tokens + slot.tokens:
                    piece = dec.feed(t)
                    if n + len(piece) > at:
                        break
                    n += len(piece)
                    kept += 1
                kept -= len(slot.all_tokens)
                del slot.tokens[max(kept, 0) :]
                del slot.logprobs[max(kept, 0) :]
                del slot.tops[max(kept, 0) :]
                return s
        return None

    def _held_back(self, slot: _Slot) -> int:
        """Characters at the end of the pending text that could start a stop string."""
        text = slot.all_text + slot.text
        longest = 0
        for s in slot.request.stop_strings:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return min(longest, len(slot.text))

    def _emit(self, slot: _Slot, finish: str | None, flush: bool = True) -> None:
        if not finish and self._held_back(slot):
            return  # wait: the text so far could be the start of a stop string
        text = slot.text
        if finish and flush and slot.decoder is not None:
            text += slot.decoder.flush()
        event = Event(
            tokens=slot.tokens,
            logprobs=slot.logprobs,
            top_logprobs=slot.tops if slot.request.sampling.logprobs else None,
            text=text if slot.decoder is not None else None,
            finish_reason=finish,
            prompt_logprobs=slot.prompt_logprobs if slot.sent == 0 else None,
            prompt_top_logprobs=slot.prompt_top if slot.sent == 0 else None,
        )
        if slot.sent == 0 and slot.request.prompt_logprobs and slot.prompt_logprobs is None:
            event.prompt_logprobs = []
        slot.sent += 1
        slot.all_tokens += slot.tokens
        slot.all_logprobs += slot.logprobs
        slot.all_tops += slot.tops
        slot.all_text += text
        slot.tokens, slot.logprobs, slot.tops, slot.text = [], [], [], ""
        if slot.handle._on_event is not None:
            slot.handle._on_event(event)
        slot.handle._events.put(event)

    def _end(self, slot: _Slot, reason: str, stop) -> None:
        self._emit(slot, reason, flush=not isinstance(stop, str))
        with self._lock:
            self._slots.remove(slot)
        s = slot
        s.handle._result = Result(
            s.all_tokens,
            s.all_logprobs,
            s.all_tops if s.request.sampling.logprobs else None,
            s.all_text if s.decoder is not None else None,
            reason,
            s.prompt_logprobs,
            s.prompt_top,
            stop,
            len(s.request.prompt),
            s.submitted_at,
            s.first_token_at,
            time.monotonic(),
        )
        s.handle._done.set()

    def _finish_handle(self, handle: Handle, reason: str, error) -> None:
        event = Event([], [], None, "" if self.tokenizer else None, reason)
        if handle._on_event is not None:
            handle._on_event(event)
        handle._events.put(event)
        now = time.monotonic()
        handle._result = Result(
            [],
            [],
            None,
            None,
            reason,
            None,
            None,
            None,
            len(handle.request.prompt),
            now,
            None,
            now,
            error,
        )
        handle._done.set()
