"""`POST /v1/completions`: OpenAI's legacy completions, whole or streamed as server-sent events.

Log-probabilities (`logprobs: k`) come as OpenAI's four arrays: `tokens` (token texts, see
`generation.TokenTexts`), `token_logprobs`, `top_logprobs` (k {text: logprob} per token, from
the same float32 log-softmax as `token_logprobs`) and `text_offset` (into the choice's text).
With `echo`, the text and the arrays start with the prompt's own tokens, the first of which has
no log-probability (null). Streamed, the prompt part comes with each choice's first chunk.
"""

from __future__ import annotations

import time
import uuid

from grok1.serve import generation
from grok1.serve.bridge import EngineRun
from grok1.serve.protocol import CompletionRequest, bad_request, validate


async def create(state, body: dict, receive):
    req = validate(CompletionRequest, body)
    generation.check_model(req.model, state.served_model_name)
    req.refuse_unsupported()
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    tok = state.tokenizer
    prompts = [generation.encode(tok, p) for p in req.prompt]
    max_tokens = generation.DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    scoring = req.echo and req.logprobs is not None
    requests, choices = generation.make_choices(
        req, prompts, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=scoring,
        include_stop=scoring, tokenizer=tok,
    )  # fmt: skip
    run = await EngineRun.start(state, requests, choices)
    out = _Formatter(req, state.served_model_name, generation.TokenTexts(tok))
    if req.stream:
        return generation.EventStream(out.stream(run, receive))
    await run.wait(receive)
    pieces = [out.piece(c, True, c.text, len(c.tokens)) for c in choices]
    usage = generation.usage(choices)
    return generation.JSONResponse({**out.head, "choices": pieces, "usage": usage})


class _Formatter:
    def __init__(self, req: CompletionRequest, model: str, texts: generation.TokenTexts):
        self.req, self.texts = req, texts
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._offsets: dict[int, generation.OffsetCounter] = {}

    def stream(self, run: EngineRun, receive):
        return run.sse(receive, self.head, self._stream_piece, self.req.stream_options)

    def _stream_piece(self, c, event, first: bool) -> dict | None:
        if first and self.req.echo or event.text or event.tokens or event.finish_reason:
            return self.piece(c, first, event.text or "", len(event.tokens))
        return None

    def _echo_text(self, c) -> str:
        return (c.prompt_text or "") if self.req.echo else ""

    def piece(self, c, first: bool, text: str, n_new: int) -> dict:
        """A choice's text and log-probabilities: its last `n_new` tokens with their `text`,
        preceded on the `first` piece by the prompt when echoing."""
        echo = first and self.req.echo
        tokens = c.tokens[len(c.tokens) - n_new :]
        out = {
            "index": c.index,
            "text": (self._echo_text(c) if echo else "") + text,
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        if self.req.logprobs is not None:
            out["logprobs"] = self._logprobs(c, echo, n_new)
        if self.req.return_token_ids:
            out["token_ids"] = tokens
            if echo:
                out["prompt_token_ids"] = list(c.prompt)
        return out

    def _logprobs(self, c, echo: bool, n_new: int) -> dict:
        texts, k = self.texts, self.req.logprobs
        ids, values, tops, offsets = [], [], [], []
        if echo:
            n_prompt = len(c.prompt)
            ids += c.prompt
            values += [None, *(c.prompt_logprobs or [None] * (n_prompt - 1))]
            tops += [None, *(c.prompt_top or [None] * (n_prompt - 1))]
            offsets += texts.offsets(c.prompt)
        counter = self._offsets.get(c.index)
        if counter is None:
            start = len(self._echo_text(c))
            counter = self._offsets[c.index] = texts.offset_counter(start, after=c.prompt)
        new = slice(len(c.tokens) - n_new, len(c.tokens))
        ids += c.tokens[new]
        values += c.logprobs[new]
        tops += c.top[new]
        offsets += counter.feed(c.tokens[new])
        return {
            "tokens": [texts(t) for t in ids],
            "token_logprobs": [None if v is None else float(v) for v in values],
            "top_logprobs": [texts.top(t) for t in tops] if k else None,
            "text_offset": offsets,
        }
