"""What completions and chat completions share: engine requests from the OpenAI sampling fields,
one `Choice` per engine request that gathers its events, and token texts for log-probabilities.

Seeds: choice i of a prompt samples with `seed + i`, so n choices differ and each is the same as
a single request with that seed; without a seed, a random one is drawn per HTTP request.
"""

from __future__ import annotations

import dataclasses
import json
import secrets

import starlette.responses

from grok1.requests import MAX_LOGPROBS, Request
from grok1.sampling import SamplingParams
from grok1.serve.protocol import APIError, Sampling, bad_request

DEFAULT_MAX_TOKENS = 16


def encode(tokenizer, prompt) -> tuple[list[int], str | None]:
    """(ids, text) of one prompt: a string (needs a tokenizer) or ids (text decoded if we can)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids", "prompt")
        ids = tokenizer.encode_with_special(prompt)
        if not ids:
            raise bad_request("the prompt encodes to no tokens", "prompt")
        return ids, prompt
    if tokenizer is None:
        return list(prompt), None
    bad = [t for t in prompt if t >= tokenizer.vocab_size]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", "prompt"
        )
    return list(prompt), tokenizer.decode(prompt)


def make_choices(req: Sampling, prompts: list[tuple[list[int], str | None]], *, max_tokens: int,
                 logprobs: int | None, prompt_logprobs: bool, include_stop: bool, tokenizer
                 ) -> tuple[list[Request], list[Choice]]:  # fmt: skip
    """One engine request and one `Choice` per (prompt, choice), prompt-major.

    `include_stop`: the stop id that ends a request (EOS included) is returned with its
    log-probability like any token (never in the text), so that with `echo` and `logprobs` the
    arrays hold every prompt token plus every generated one, as lm-evaluation-harness reads them.
    """
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad_request(f"logprobs must be at most {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    if req.stop and tokenizer is None:
        raise bad_request("stop strings need a tokenizer; this model has none: use "
                          "stop_token_ids", "stop")  # fmt: skip
    seed = secrets.randbelow(2**63) if req.seed is None else req.seed
    if seed + req.n - 1 >= 2**64:
        raise bad_request("seed + n - 1 must be below 2**64 (choice i uses seed + i)", "seed")
    requests, choices = [], []
    for ids, text in prompts:
        for i in range(req.n):
            try:
                sampling = SamplingParams(
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=max(0, req.top_k or 0),
                    min_p=req.min_p or 0.0,
                    repetition_penalty=req.repetition_penalty or 1.0,
                    seed=seed + i,
                    logprobs=logprobs or 0,
                )
            except ValueError as e:
                raise bad_request(str(e)) from None
            requests.append(Request(
                tuple(ids), max_tokens, sampling, stop_ids=tuple(req.stop_token_ids or ()),
                stop_strings=req.stop_strings(), ignore_eos=req.ignore_eos,
                # with nothing to generate the engine still needs a reason to prefill
                prompt_logprobs=prompt_logprobs or max_tokens == 0,
                include_stop_token=include_stop,
            ))  # fmt: skip
            choices.append(Choice(len(choices), i, ids, text))
    return requests, choices


@dataclasses.dataclass
class Choice:
    """One engine request's output, gathered from its events."""

    index: int  # the choice's index in the response
    sample: int  # i of the prompt's n choices (the seed is seed + i)
    prompt: list[int]
    prompt_text: str | None
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_logprobs: list | None = None
    prompt_top: list | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None

    def add(self, event, at: float) -> None:
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = list(event.prompt_logprobs)
            self.prompt_top = event.prompt_top_logprobs
        if event.tokens and self.first_token_at is None:
            self.first_token_at = at
        self.tokens += event.tokens
        self.logprobs += event.logprobs
        self.top += event.top_logprobs or [None] * len(event.tokens)
        self.text += event.text or ""
        if event.finish_reason is not None:
            self.finished_at = at
            self.finish_reason = event.finish_reason


class TokenTexts:
    """The text shown for a token id in log-probabilities: its piece with "▁" as a space, an
    ASCII byte piece as its character, control pieces and other bytes as the piece itself
    ("[EOS]", "<0xE6>"); "token_id:N" without a tokenizer. Offsets come from the decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._text(token_id)
        return text

    def _text(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return f"token_id:{token_id}"
        piece = tok.id_to_piece(token_id)
        if tok.is_control(token_id):
            return piece
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            value = int(piece[3:5], 16)
            return chr(value) if value < 0x80 else piece
        return piece.replace("\u2581", " ")

    def top(self, pairs) -> dict[str, float] | None:
        """{text: logprob} of (id, logprob) pairs, best first; a repeated text keeps the best."""
        if pairs is None:
            return None
        out: dict[str, float] = {}
        for token_id, lp in pairs:
            out.setdefault(self(token_id), float(lp))
        return out

    def offsets(self, ids, start: int = 0) -> list[int]:
        """Character offset of each token in the decoded text of `ids`, plus `start`."""
        return self.offset_counter(start).feed(ids)

    def offset_counter(self, start: int = 0, after=()) -> OffsetCounter:
        """Offsets of tokens that follow the ids `after` (a prompt), counted from `start`."""
        counter = OffsetCounter(self.tokenizer)
        counter.feed(after)
        counter.pos = start
        return counter


class OffsetCounter:
    """Offsets of tokens fed one piece at a time: each token's position in the decoded text."""

    def __init__(self, tokenizer, start: int = 0):
        self.decoder = None if tokenizer is None else tokenizer.stream_decoder()
        self.pos = start

    def feed(self, ids) -> list[int]:
        out = []
        for token_id in ids:
            out.append(self.pos)
            if self.decoder is not None:
                self.pos += len(self.decoder.feed(token_id))
        return out


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def usage(choices: list[Choice]) -> dict:
    """OpenAI's usage: each prompt counted once (its n choices share it), every choice's tokens."""
    prompt_tokens = sum(len(c.prompt) for c in choices if c.sample == 0)
    completion_tokens = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class JSONResponse(starlette.responses.JSONResponse):
    """JSON as Python writes it: a log-probability of -inf is written -Infinity, not an error."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


class EventStream(starlette.responses.StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends, also when the
    client went away mid-stream (its engine requests are then cancelled and counted at once)."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream")

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(e: Exception) -> str:
    """The event that ends a stream which failed after its 200 was sent."""
    if isinstance(e, APIError):
        return sse(e.body())
    return sse(
        APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error").body()
    )
