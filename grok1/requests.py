"""What a caller hands the engine and what it gets back: requests, handles, events and results.

A `Request` is submitted to `grok1.engine.Engine.submit`, which returns a `Handle`. The engine's
scheduler thread delivers the request's output to the handle as a sequence of `Event`s (new tokens,
their log-probabilities, the text they complete); the last event carries the finish reason, and
`Handle.result()` returns everything as one `Result`. Handles are safe to use from any thread.

Text and stop strings are tracked here (`TextTracker`): the text of the generated tokens is decoded
incrementally, a stop string ends the request exactly where it starts, and text that could still
turn out to be the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator

from grok1.sampling import SamplingParams

MAX_LOGPROBS = 20  # the largest `SamplingParams.logprobs` the engine serves
MAX_STOP_IDS = 15  # stop ids per request (EOS comes on top)

FINISH_REASONS = ("stop", "length", "cancelled", "error")

TopLogprobs = list[list[tuple[int, float]]]  # per position: k (token id, log-probability)


class EngineError(RuntimeError):
    """Base of the engine's errors."""


class RequestError(EngineError, ValueError):
    """An invalid request; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(EngineError):
    """The engine's waiting queue is full; try again later."""


class EngineDead(EngineError):
    """The engine's scheduler has stopped (closed, or died: the cause is `__cause__`)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and how to continue it.

    Attributes:
      prompt: token ids (non-empty, inside the vocabulary).
      max_new_tokens: the most tokens to generate (0: only prefill, e.g. to score the prompt).
      sampling: temperature, top-p/k, min-p, repetition penalty, seed, top-k log-probabilities.
      stop_ids: ids that end generation (not returned); EOS is added unless `ignore_eos`.
      stop_strings: texts that end generation (needs the engine's tokenizer); the tokens and text
        returned end before the string.
      ignore_eos: never stop at EOS (the release's behaviour).
      prompt_logprobs: also compute log p(prompt[t] | prompt[:t]) for t >= 1 and, when
        `sampling.logprobs` = k > 0, the k most likely tokens at each of those positions.
      include_stop_token: return the stop id (EOS included) that ended the request in the tokens
        and log-probabilities too (never in the text), as scoring with echo needs.
    """

    prompt: tuple[int, ...]
    max_new_tokens: int = 16
    sampling: SamplingParams = SamplingParams()
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    prompt_logprobs: bool = False
    include_stop_token: bool = False

    def to_dict(self) -> dict:
        """A JSON-able form (the multi-process broadcast of requests)."""
        out = dataclasses.asdict(self)
        out["sampling"] = dataclasses.asdict(self.sampling)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Request:
        fields = dict(data)
        fields["sampling"] = SamplingParams(**fields["sampling"])
        for name in ("prompt", "stop_ids", "stop_strings"):
            fields[name] = tuple(fields[name])
        return cls(**fields)


@dataclasses.dataclass
class Event:
    """One increment of a request's output, delivered in order.

    Attributes:
      tokens: newly generated ids (possibly none).
      logprobs: their log-probabilities: the float32 log-softmax of the model's logits, before
        any sampling filter or penalty.
      top_logprobs: per new token, the k most likely (id, log-probability), best first, from the
        same log-softmax; None when k = 0.
      text: the text these tokens complete (None without a tokenizer); text that could still be
        the start of a stop string, or of a character, waits for a later event.
      finish_reason: None until the last event: "stop" (EOS, a stop id or string), "length"
        (max_new_tokens), "cancelled" or "error".
      prompt_logprobs, prompt_top_logprobs: on the first event only, when the request asked for
        them: len(prompt) - 1 values (positions t >= 1), and the top-k at those positions.
    """

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: TopLogprobs | None = None
    text: str | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: TopLogprobs | None = None


@dataclasses.dataclass
class Result:
    """A finished request: everything its events carried, joined, and when things happened.

    `stop` is the stop id or string that ended it (None for EOS... see `finish_reason`);
    timestamps are `time.monotonic()` values; `error` is set when `finish_reason` is "error".
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    top_logprobs: TopLogprobs | None = None
    text: str | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: TopLogprobs | None = None
    stop: int | str | None = None
    num_prompt_tokens: int = 0
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float = 0.0
    error: BaseException | None = None


class Handle:
    """A submitted request: iterate it for its events, or wait for its `result()`."""

    def __init__(
        self,
        id: int,
        request: Request,
        on_event: Callable[[Event], None] | None = None,
        cancel: Callable[[Handle], None] | None = None,
    ):
        self.id = id
        self.request = request
        self._on_event = on_event
        self._cancel = cancel
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = threading.Event()
        self._result = Result([], [], "", num_prompt_tokens=len(request.prompt))
        self._result.submitted_at = time.monotonic()
        self._text: list[str] = []
        want_top = request.sampling.logprobs > 0
        self._result.top_logprobs = [] if want_top else None

    # -- the caller's side ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def __iter__(self) -> Iterator[Event]:
        """Yields the events as they come (blocking); ends after the last one."""
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Result:
        """Waits until the request finishes and returns its `Result`."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self._result

    def cancel(self) -> None:
        """Stops the request (idempotent); its slot is free again within one scheduling step."""
        if not self.done and self._cancel is not None:
            self._cancel(self)

    # -- the engine's side ----------------------------------------------------------------------
    def deliver(self, event: Event, stop=None, error: BaseException | None = None) -> None:
        """Records and hands out one event (called by the engine, in order)."""
        r = self._result
        if event.tokens and r.first_token_at is None:
            r.first_token_at = time.monotonic()
        r.tokens += event.tokens
        r.logprobs += event.logprobs
        if r.top_logprobs is not None and event.top_logprobs is not None:
            r.top_logprobs += event.top_logprobs
        if event.text is not None:
            self._text.append(event.text)
        if event.prompt_logprobs is not None:
            r.prompt_logprobs = event.prompt_logprobs
            r.prompt_top_logprobs = event.prompt_top_logprobs
        if event.finish_reason is not None:
            r.finish_reason, r.stop, r.error = event.finish_reason, stop, error
            r.text = "".join(self._text) if self._text or event.text is not None else None
            r.finished_at = time.monotonic()
        self._events.put(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a consumer's bug must not stop the engine: drop the consumer
                self._on_event = None
                self.cancel()
        if event.finish_reason is not None:
            self._finished.set()


class TextTracker:
    """The text of a request's generated tokens, cut at its stop strings.

    `feed(tokens)` returns (text to emit, stop) where `stop` is None, or (stop string, how many
    of these tokens to keep) when a stop string appeared: the request ends there, its text ends
    right before the string and its tokens are those whose text ends before it. Text that could
    be the start of a stop string is held back until more text rules it out, or until `finish()`.
    """

    CONTEXT = 16  # prompt tokens decoded before the generated ones

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = (), context=()):
        self._decoder = tokenizer.stream_decoder()
        # the generated text is what the tokens add after the end of `context` (the prompt):
        # decoded alone, a first piece "▁is" would lose its space, as SentencePiece strips it
        # at the start of a text
        for token in list(context)[-self.CONTEXT :]:
            self._decoder.feed(token)
        self._decoder.flush()  # bytes of an unfinished character in the prompt stay its own
        self._stops = tuple(s for s in stop_strings if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._emitted = 0
        self._ends: list[int] = []  # len(text) after each token

    def feed(self, tokens) -> tuple[str, tuple[str, int] | None]:
        fed_before = len(self._ends)
        for token in tokens:
            before = len(self._text)
            self._text += self._decoder.feed(token)
            self._ends.append(len(self._text))
            hit = self._find_stop(max(0, before - self._hold))
            if hit is not None:
                start, stop = hit
                keep = sum(1 for end in self._ends if end <= start) - fed_before
                return self._emit(start), (stop, max(keep, 0))
        return self._emit(len(self._text) - self._hold if self._stops else len(self._text)), None

    def advance(self, tokens, logps, pairs, reason, stop):
        """One delivery of new tokens (with their log-probabilities and top alternatives, or
        None) that end the request if `reason` is set (its `stop` id or None). Their text, cut
        at a stop string if one appears (which then ends the request with that string as its
        stop), else with the held-back rest when the request ends here. Returns
        (text, tokens, logps, pairs, reason, stop)."""
        text, hit = self.feed(tokens)
        if hit is not None:
            string, keep = hit
            pairs = None if pairs is None else pairs[:keep]
            return text, tokens[:keep], logps[:keep], pairs, "stop", string
        if reason is not None:
            rest, string = self.finish()
            text += rest
            if string is not None:
                reason, stop = "stop", string
        return text, tokens, logps, pairs, reason, stop

    def finish(self) -> tuple[str, str | None]:
        """The rest of the text (a stop string found in it cuts it); (text, stop or None)."""
        before = len(self._text)
        self._text += self._decoder.flush()
        hit = self._find_stop(max(0, before - self._hold))
        if hit is not None:
            return self._emit(hit[0]), hit[1]
        return self._emit(len(self._text)), None

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        found = [(i, s) for s in self._stops if (i := self._text.find(s, start)) >= 0]
        return min(found) if found else None

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
