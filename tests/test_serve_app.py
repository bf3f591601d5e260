"""The HTTP server's app in-process, over httpx's ASGI transport, on `tests/serve_fakes.FakeEngine`
(a real scheduler thread and callbacks, a fixed random model) with the demo's real tokenizer.

Each answer is checked against what the same request gets from the engine alone, or against the
fake model's own log-probabilities. The real engine and the real server process are tested in
tests/test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest

from grok1 import demo
from grok1.engine import MAX_LOGPROBS, Request
from grok1.sampling import SamplingParams
from grok1.serve import chat, cli
from grok1.serve.app import ServerState, create_app
from grok1.tokenizer import Tokenizer
from tests.serve_fakes import EOS_TRIGGER, FakeEngine

NAME = "grok1-demo"
PROMPT = "The for statement"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(demo.tokenizer_path())


class Server:
    """A fake engine behind the app, and a synchronous httpx client for it."""

    def __init__(self, tok, *, api_key=None, template=None, max_body_bytes=1 << 16, **engine_kw):
        self.tok = tok
        self.engine = FakeEngine(tok, **engine_kw)
        self.state = ServerState(NAME, api_key=api_key, max_body_bytes=max_body_bytes,
                                 chat_template=template)  # fmt: skip
        self.state.set_ready(self.engine, tok)
        self.app = create_app(self.state)

    def requests(self, *calls: tuple) -> list[httpx.Response]:
        """(method, url, kwargs) calls made concurrently."""

        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await asyncio.gather(*(c.request(m, u, **kw) for m, u, kw in calls))

        return asyncio.run(go())

    def post(self, url: str, body=None, **kw) -> httpx.Response:
        return self.requests(("POST", url, {"json": body, **kw}))[0]

    def get(self, url: str, **kw) -> httpx.Response:
        return self.requests(("GET", url, kw))[0]

    def alone(self, prompt_ids, max_new_tokens=16, **kw):
        """What the engine gives the request by itself."""
        sampling = SamplingParams(**{k: kw.pop(k) for k in list(kw) if k != "stop_strings"
                                     and k not in ("ignore_eos", "prompt_logprobs")})  # fmt: skip
        request = Request(tuple(prompt_ids), max_new_tokens, sampling, **kw)
        return self.engine.submit(request).result(timeout=30)


@pytest.fixture
def server(tok):
    s = Server(tok)
    yield s
    s.engine.close()


def completion(server, **body) -> dict:
    r = server.post("/v1/completions", {"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(response: httpx.Response) -> list:
    lines = [x for x in response.text.split("\n\n") if x]
    assert all(x.startswith("data: ") for x in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(x[len("data: ") :]) for x in lines[:-1]]


# -- completions ----------------------------------------------------------------------------------
def test_completion_and_stream_equal_the_engine_alone(server, tok):
    ids = tok.encode(PROMPT)
    ref = server.alone(ids, 12, temperature=0.7, seed=5)
    body = dict(prompt=PROMPT, max_tokens=12, temperature=0.7, seed=5, return_token_ids=True)
    out = completion(server, **body)
    choice = out["choices"][0]
    assert choice["text"] == ref.text and choice["token_ids"] == ref.tokens
    assert choice["finish_reason"] == ref.finish_reason
    assert out["object"] == "text_completion" and out["model"] == NAME
    n = len(ref.tokens)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n,
                            "total_tokens": len(ids) + n}  # fmt: skip

    r = server.post("/v1/completions", {**body, "stream": True,
                                        "stream_options": {"include_usage": True}})  # fmt: skip
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == out["usage"]
    pieces = [c["choices"][0] for c in chunks[:-1]]
    assert "".join(p["text"] for p in pieces) == ref.text
    assert sum((p["token_ids"] for p in pieces), []) == ref.tokens
    assert [p["finish_reason"] for p in pieces][-1] == ref.finish_reason
    assert all(p["finish_reason"] is None for p in pieces[:-1])


def test_n_choices_and_prompt_lists_use_seed_plus_i(server, tok):
    prompts = [[5, 9, 11], [300, 301]]
    out = completion(server, prompt=prompts, n=3, seed=10, temperature=1.0, max_tokens=6,
                     return_token_ids=True)  # fmt: skip
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for c in out["choices"]:
        p, i = divmod(c["index"], 3)
        ref = server.alone(prompts[p], 6, temperature=1.0, seed=10 + i)
        assert c["token_ids"] == ref.tokens and c["text"] == ref.text
    assert out["usage"]["prompt_tokens"] == 5  # each prompt once, not once per choice
    assert len({tuple(c["token_ids"]) for c in out["choices"]}) > 1


def test_the_text_continues_the_prompt(server, tok):
    ids = tok.encode(PROMPT)
    out = completion(server, prompt=PROMPT, n=8, seed=0, max_tokens=3, return_token_ids=True)
    firsts = [tok.id_to_piece(c["token_ids"][0]) for c in out["choices"] if c["token_ids"]]
    assert any(p.startswith("\u2581") for p in firsts), firsts  # a first piece with a space
    for c in out["choices"]:
        assert PROMPT + c["text"] == tok.decode(ids + c["token_ids"])


def test_concurrent_requests_each_get_what_they_get_alone(server, tok):
    bodies = [dict(prompt=[10 + i, 20 + 3 * i], max_tokens=4 + i, temperature=0.9, seed=i,
                   model=NAME, return_token_ids=True) for i in range(10)]  # fmt: skip
    answers = server.requests(*[("POST", "/v1/completions", {"json": b}) for b in bodies])
    for body, r in zip(bodies, answers, strict=True):
        ref = server.alone(body["prompt"], body["max_tokens"], temperature=0.9, seed=body["seed"])
        assert r.json()["choices"][0]["token_ids"] == ref.tokens


def test_echo_with_logprobs_scores_the_prompt(server, tok):
    ids = tok.encode("The for statement is used to iterate")
    out = completion(server, prompt=ids, echo=True, logprobs=3, max_tokens=0)
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == tok.decode(ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for t in range(1, len(ids)):
        expected = server.engine.logprobs(ids[:t])
        assert lp["token_logprobs"][t] == float(expected[ids[t]])
        best = np.argsort(-expected, kind="stable")[:3]
        top = lp["top_logprobs"][t]
        assert list(top.values()) == [float(expected[b]) for b in best]
        # lm-evaluation-harness's greedy test compares these with ==
        assert (lp["token_logprobs"][t] == max(top.values())) == (ids[t] == best[0])
    text, offsets = out["choices"][0]["text"], lp["text_offset"] + [len(out["choices"][0]["text"])]
    assert offsets[0] == 0
    for t in range(1, len(ids)):  # the first token's leading space is not in the text
        assert text[offsets[t] : offsets[t + 1]] == lp["tokens"][t]


def test_max_tokens_0_with_and_without_echo(server, tok):
    for echo, text in ((False, ""), (True, PROMPT)):
        out = completion(server, prompt=PROMPT, max_tokens=0, echo=echo)
        assert out["choices"][0]["text"] == text and out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 0


def test_echo_max_tokens_1_returns_eos_like_any_token(server, tok):
    ids = [40, 41, EOS_TRIGGER]  # the fake model's most likely next token is EOS
    out = completion(server, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    c = out["choices"][0]
    lp = c["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["tokens"][-1] == "[EOS]" and c["finish_reason"] == "stop"
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    assert c["text"] == tok.decode(ids)
    assert out["usage"]["completion_tokens"] == 1
    # without logprobs, EOS ends the completion as usual and is not returned
    out = completion(server, prompt=ids, max_tokens=1, temperature=0, return_token_ids=True)
    assert out["choices"][0]["token_ids"] == [] and out["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_end_the_text_before_them(server, tok):
    ids = tok.encode(PROMPT)
    full = server.alone(ids, 30, temperature=0, ignore_eos=True).text
    words = [w for w in full.split() if len(w) > 2 and full.index(w) > 3]
    assert words, full
    stop = words[0]
    body = dict(prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzzz"], ignore_eos=True)
    out = completion(server, **body)
    assert out["choices"][0]["text"] == full[: full.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = events(server.post("/v1/completions", {**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[: full.index(stop)]


def test_streamed_logprobs_match_the_whole_response(server, tok):
    body = dict(prompt=PROMPT, max_tokens=10, temperature=0.8, seed=3, logprobs=2, echo=True)
    whole = completion(server, **body)["choices"][0]
    chunks = events(server.post("/v1/completions", {**body, "stream": True}))
    pieces = [c["choices"][0] for c in chunks]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((p["logprobs"][key] for p in pieces), []) == whole["logprobs"][key], key


# -- chat -----------------------------------------------------------------------------------------
def test_chat_needs_a_template(server):
    r = server.post(
        "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 400
    assert "no chat template" in r.json()["error"]["message"]
    assert "--chat-template" in r.json()["error"]["message"]


def test_chat_with_a_template_completes_the_rendered_prompt(tok):
    s = Server(tok, template=chat.ChatTemplate(TEMPLATE))
    try:
        messages = [{"role": "user", "content": "What is a for statement?"}]
        body = {"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0.5,
                "seed": 2, "logprobs": True, "top_logprobs": 2}  # fmt: skip
        r = s.post("/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        rendered = "user: What is a for statement?\nassistant:"
        ref = s.alone(tok.encode(rendered), 8, temperature=0.5, seed=2, logprobs=2)
        c = r.json()["choices"][0]
        assert c["message"] == {"role": "assistant", "content": ref.text}
        assert [e["logprob"] for e in c["logprobs"]["content"]] == ref.logprobs
        chunks = events(s.post("/v1/chat/completions", {**body, "stream": True}))
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(x["choices"][0]["delta"].get("content", "") for x in chunks) == ref.text
        info = s.get("/tokenizer_info").json()
        assert info["chat_template"] == TEMPLATE
        bad = dict(body, messages=[{"role": "user", "content": [{"type": "image_url"}]}])
        assert s.post("/v1/chat/completions", bad).status_code == 400
    finally:
        s.engine.close()


# -- tokenizer routes, models, health -------------------------------------------------------------
def test_tokenizer_routes_as_lm_eval_uses_them(server, tok):
    info = server.get("/tokenizer_info").json()
    assert info["eos_token"] == "[EOS]" and info["eos_token_id"] == tok.eos_id
    assert info["bos_token"] == "[BOS]" and info["pad_token"] == "[PAD]"
    assert info["vocab_size"] == tok.vocab_size and info["model_max_length"] == 256
    r = server.post("/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert r.json()["tokens"] == [tok.eos_id]  # how lm-eval finds the EOS id
    ids = server.post("/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert ids == tok.encode(PROMPT)
    with_bos = server.post("/tokenize", {"prompt": PROMPT, "add_special_tokens": True}).json()
    assert with_bos["tokens"] == [tok.bos_id, *ids] and with_bos["count"] == len(ids) + 1
    assert server.post("/detokenize", {"tokens": ids}).json() == {"prompt": PROMPT}
    r = server.post("/detokenize", {"tokens": [1, tok.vocab_size]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_models_health_and_loading(tok):
    s = Server(tok)
    try:
        models = s.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [NAME]
        assert s.get(f"/v1/models/{NAME}").status_code == 200
        assert s.get("/v1/models/gpt-4").status_code == 404
        assert s.get("/health").status_code == 200
        s.state.phase = "compiling"
        for r in (s.get("/health"), s.post("/v1/completions", {"prompt": "x"})):
            assert r.status_code == 503 and "Retry-After" in r.headers
        assert s.post("/v1/completions", {"prompt": "x"}).json()["error"]["code"] == "compiling"
        s.state.phase = "ready"
        s.engine.kill()
        r = s.post("/v1/completions", {"prompt": "x"})  # the scheduler dies at its next step
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        deadline = time.monotonic() + 10
        while s.engine.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.get("/health").status_code == 503
        r = s.post("/v1/completions", {"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        s.engine.close()


# -- errors ---------------------------------------------------------------------------------------
INVALID = [  # (body, status, param or code)
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": MAX_LOGPROBS + 1}, 400, "logprobs"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": [1] * 250, "max_tokens": 10}, 400, "max_tokens"),  # 260 > context 256
    ({"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ({"prompt": "x", "n": 100}, 400, "n"),  # 100 sequences > the queue's 16
]


def test_invalid_requests_get_400s_in_openai_shape_and_the_server_carries_on(server):
    calls = [("POST", "/v1/completions", {"json": body}) for body, _, _ in INVALID]
    calls += [("POST", "/v1/completions", {"content": b'{"prompt": "x", "max_tokens": NaN}'}),
              ("POST", "/v1/completions", {"content": b"not json"}),
              ("POST", "/v1/completions", {"content": b"[1, 2]"}),
              ("GET", "/v1/completions", {}),
              ("POST", "/v1/nothing", {"json": {}})]  # fmt: skip
    expected = [(s, p) for _, s, p in INVALID] + [(400, None)] * 3 + [(405, None), (404, None)]
    for (status, param), r in zip(expected, server.requests(*calls), strict=True):
        assert r.status_code == status, (r.request.content, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert param in (error["param"], error["code"]), (r.request.content, error)
    overflow = server.requests(calls[15])[0].json()["error"]["message"]
    assert "256" in overflow and "250" in overflow and "260" in overflow
    out = completion(server, prompt=PROMPT, max_tokens=3)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_api_key(tok):
    s = Server(tok, api_key="sekret")
    try:
        body = {"prompt": "x", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sekret"}):
            r = s.post("/v1/completions", body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.get("/v1/models").status_code == 401
        r = s.post("/v1/completions", body, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert s.get("/health").status_code == 200  # probes need no key
    finally:
        s.engine.close()
    open_server = Server(tok)
    try:  # without a key, an empty bearer (what lm-eval sends) or any key is accepted
        for value in ("Bearer ", "Bearer anything"):
            r = open_server.post("/v1/completions", body, headers={"Authorization": value})
            assert r.status_code == 200
    finally:
        open_server.engine.close()


def test_oversized_body_is_413(server):
    r = server.post("/v1/completions", {"prompt": "x" * (1 << 17)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunked():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b" " * 4096

    r = server.requests(("POST", "/v1/completions", {"content": chunked()}))[0]
    assert r.status_code == 413


def test_full_queue_is_503_with_retry_after(tok):
    s = Server(tok, max_queue=2, max_slots=1)
    try:
        s.engine.hold()
        held = [s.engine.submit(Request((5, 6), 4)) for _ in range(2)]
        r = s.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 4})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json()["error"]["code"] == "queue_full"
        s.engine.release()
        for h in held:
            h.result(timeout=30)
        assert s.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 4}).status_code == 200
    finally:
        s.engine.close()


# -- disconnects and metrics ----------------------------------------------------------------------
def test_a_client_that_disconnects_mid_stream_frees_its_slot(tok):
    s = Server(tok, step_s=0.01)
    try:
        body = json.dumps({"prompt": [5, 6], "max_tokens": 200, "stream": True,
                           "ignore_eos": True}).encode()  # fmt: skip
        first_chunk = threading.Event()

        async def call():
            gone = asyncio.Event()
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop()
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.body" and message.get("body"):
                    first_chunk.set()
                    gone.set()  # the client goes away after its first chunk
                    raise OSError("connection lost")

            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                     "http_version": "1.1", "method": "POST", "scheme": "http",
                     "path": "/v1/completions", "raw_path": b"/v1/completions",
                     "query_string": b"", "root_path": "", "headers": [
                         (b"content-type", b"application/json")],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
            try:
                await s.app(scope, receive, send)
            except Exception:
                pass  # the app may re-raise the lost connection; what matters is the slot

        asyncio.run(call())
        assert first_chunk.is_set()
        deadline = time.monotonic() + 5
        while s.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.engine.stats()["running"] == 0
        metrics = s.get("/metrics").text
        assert 'grok1_requests_total{outcome="cancelled"} 1.0' in metrics
        assert "grok1_busy_slots 0.0" in metrics
    finally:
        s.engine.close()


def test_metrics(server, tok):
    completion(server, prompt=[5, 6, 7], max_tokens=5, ignore_eos=True)
    server.post("/v1/completions", {"prompt": ""})
    server.engine.hold()
    server.engine.submit(Request((5, 6), 4))
    text = server.get("/metrics").text
    server.engine.release()
    assert 'grok1_requests_total{outcome="length"} 1.0' in text
    assert "grok1_prompt_tokens_total 3.0" in text
    assert "grok1_generation_tokens_total 5.0" in text
    assert "grok1_time_to_first_token_seconds_count 1.0" in text
    assert "grok1_time_per_output_token_seconds_count 1.0" in text
    assert "grok1_queue_depth 1.0" in text and "grok1_slots 4.0" in text
    assert 'grok1_http_requests_total{route="/v1/completions",status="400"} 1.0' in text


# -- the command line's flag errors ---------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--port", "70000"], "--port"),
        (["--max-slots", "0"], "--max-slots"),
        (["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
        (["--chat-template", "/nonexistent/t.jinja"], "/nonexistent/t.jinja"),
        (["--mesh", "data=x"], "data=x"),
        (["--num-processes", "2"], "--coordinator"),
        (["--api-key", " "], "--api-key"),
    ],
)
def test_flag_mistakes_end_with_one_error_line(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and words in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_a_port_in_use_is_an_error_line(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(cli.UsageError, match="cannot listen on 127.0.0.1"):
            cli.listen("127.0.0.1", busy.getsockname()[1])
