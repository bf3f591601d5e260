"""`POST /v1/chat/completions`, served only with a chat template given at start-up.

Grok-1 is a base model and its release has no chat template, so the operator supplies one
(`--chat-template FILE`): a Jinja template in Hugging Face's style, rendered in a sandbox with
`messages` (each with `role` and `content`), `add_generation_prompt`, `bos_token`, `eos_token`
and `raise_exception(message)`. The rendered text is encoded with the control pieces it names
([BOS], [EOS]) mapped to their ids, then completed like a prompt.
"""

from __future__ import annotations

import time
import uuid

import jinja2
import jinja2.sandbox

from grok1.serve import generation
from grok1.serve.bridge import EngineRun
from grok1.serve.protocol import ChatRequest, bad_request, validate

NO_TEMPLATE = (
    "this server has no chat template: Grok-1 is a base model and its release has "
    "none. Use /v1/completions, or restart the server with --chat-template FILE"
)


class ChatTemplate:
    def __init__(self, source: str, name: str = "<template>"):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.source, self.name = source, name
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{name}: line {e.lineno}: {e.message}") from None

    @classmethod
    def load(cls, path: str) -> ChatTemplate:
        try:
            with open(path, encoding="utf-8") as f:
                return cls(f.read(), path)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the chat template {path!r}: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool, tokenizer) -> str:
        special = {v: k for k, v in tokenizer.special_pieces.items()}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=special.get(tokenizer.bos_id, ""),
                eos_token=special.get(tokenizer.eos_id, ""),
            )
        except jinja2.TemplateError as e:  # raise_exception, or the messages do not fit it
            raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None


def _raise(message):
    raise jinja2.TemplateError(message)


async def create(state, body: dict, receive):
    if state.chat_template is None:
        raise bad_request(NO_TEMPLATE)
    req = validate(ChatRequest, body)
    generation.check_model(req.model, state.served_model_name)
    req.refuse_unsupported()
    tok = state.tokenizer
    if tok is None:
        raise bad_request("chat needs a tokenizer; this model has none", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    text = state.chat_template.render(messages, req.add_generation_prompt, tok)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    requests, choices = generation.make_choices(
        req, [generation.encode(tok, text)], tokenizer=tok, logprobs=k, prompt_logprobs=False,
        include_stop=False, max_tokens=generation.DEFAULT_MAX_TOKENS if limit is None else limit,
    )  # fmt: skip
    run = await EngineRun.start(state, requests, choices)
    out = _Formatter(req, state.served_model_name, generation.TokenTexts(tok))
    if req.stream:
        return generation.EventStream(out.stream(run, receive))
    await run.wait(receive)
    pieces = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": out.logprobs(c, len(c.tokens)),
            "finish_reason": c.finish_reason,
        }
        for c in choices
    ]
    return generation.JSONResponse(
        {**out.head, "choices": pieces, "usage": generation.usage(choices)}
    )


class _Formatter:
    def __init__(self, req: ChatRequest, model: str, texts: generation.TokenTexts):
        self.req, self.texts = req, texts
        self.head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
        }

    def logprobs(self, c, n_new: int) -> dict | None:
        """OpenAI's chat log-probabilities of a choice's last `n_new` tokens."""
        if not self.req.logprobs:
            return None
        new = slice(len(c.tokens) - n_new, len(c.tokens))
        content = []
        for token, lp, top in zip(c.tokens[new], c.logprobs[new], c.top[new], strict=True):
            alternatives = self.texts.top(top) or {}
            content.append(
                {
                    **self._entry(self.texts(token), lp),
                    "top_logprobs": [self._entry(t, v) for t, v in alternatives.items()],
                }
            )
        return {"content": content}

    @staticmethod
    def _entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": float(lp), "bytes": list(text.encode())}

    def stream(self, run: EngineRun, receive):
        head = {**self.head, "object": "chat.completion.chunk"}
        return run.sse(receive, head, self._stream_piece, self.req.stream_options)

    def _stream_piece(self, c, event, first: bool) -> dict | None:
        delta = {"role": "assistant"} if first else {}
        if event.text:
            delta["content"] = event.text
        if not (delta or event.finish_reason):
            return None
        return {
            "index": c.index,
            "delta": delta,
            "logprobs": self.logprobs(c, len(event.tokens)),
            "finish_reason": c.finish_reason,
        }
