"""The real server: `python -m grok1.serve` started as a process on a free 127.0.0.1 port with the
embedded demo model, driven through the official `openai` client and httpx, and compared with
`Model.generate` / `Model.score` on the same model loaded in the test process.

The slow test serves golden case3 from two real processes (4 simulated CPU devices each): its
greedy completion must equal the single-process golden tokens, and killing process 1 must end
the server (non-zero) within the heartbeat timeout.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

from grok1 import demo
from tests.conftest import case_file, case_path, prompts_of
from tests.test_multihost import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "grok1-demo"
START_TIMEOUT_S = 300  # load and compile on 2 shared cores


class ServerProcess:
    """`python -m grok1.serve ARGS` with its output in `log`; `stop()` kills what is left."""

    def __init__(self, log_path, *args: str, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "grok1.serve", "--port", str(self.port), *args],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"the server was not ready after {timeout:.0f} s:\n{self.log()}")

    def log(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("serve") / "server.log")
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model():
    import grok1

    with grok1.load(demo.demo_path(), tokenizer=demo.tokenizer_path()) as model:
        yield model


def generate(model, prompt, max_tokens, **kw):
    return model.generate([prompt], max_tokens, return_results=True, **kw)[0]


def test_completion_and_stream_equal_generate(client, model):
    kw = dict(temperature=0.8, top_p=0.95, seed=3)
    ref = generate(model, demo.PROMPT, 16, **kw)
    out = client.completions.create(model=NAME, prompt=demo.PROMPT, max_tokens=16,
                                    extra_body={"return_token_ids": True}, **kw)  # fmt: skip
    choice = out.choices[0]
    assert choice.token_ids == list(ref.tokens)
    assert choice.text == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.tokens)
    stream = client.completions.create(model=NAME, prompt=demo.PROMPT, max_tokens=16,
                                       stream=True, **kw)  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in stream) == choice.text


def test_echo_logprobs_equal_score(client, model):
    ids = model.tokenizer.encode("The for statement is used to iterate over the elements")
    ref = model.score([ids])[0]
    for max_tokens in (0, 1):  # lm-evaluation-harness's local-completions sends 1
        out = client.completions.create(model=NAME, prompt=ids, echo=True, logprobs=1,
                                        max_tokens=max_tokens, temperature=0)  # fmt: skip
        lp = out.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None
        np.testing.assert_array_equal(np.float32(lp.token_logprobs[1 : len(ids)]), ref)
        for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
            assert max(top.values()) >= value


def test_sixteen_concurrent_clients_get_what_they_get_alone(client, model):
    text = demo.PROMPT + " is used to iterate over the elements of a sequence"
    ids = model.tokenizer.encode(text)
    jobs = [dict(prompt=ids[: 2 + i % 9], max_tokens=3 + i % 7, seed=100 + i,
                 temperature=0.9 if i % 3 else 0.0) for i in range(16)]  # fmt: skip

    def ask(job):
        out = client.completions.create(model=NAME, extra_body={"return_token_ids": True}, **job)
        return out.choices[0].token_ids, out.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for job, (tokens, finish) in zip(jobs, answers, strict=True):
        job = dict(job)
        ref = generate(model, job.pop("prompt"), job.pop("max_tokens"), **job)
        assert tokens == list(ref.tokens) and finish == ref.finish_reason, job


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    cancelled = 'grok1_requests_total{outcome="cancelled"}'
    before = _metric(server, cancelled), _metric(server, "grok1_generation_tokens_total")
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 250, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept open: closing the iterator would close the connection
        while not next(lines).startswith("data: {"):
            pass
        assert _metric(server, "grok1_busy_slots") == 1
    # the slot frees within one horizon of decode steps (seconds on a loaded CPU)
    deadline = time.monotonic() + 60
    while _metric(server, "grok1_busy_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "grok1_busy_slots") == 0, server.log()
    assert _metric(server, cancelled) == before[0] + 1
    assert _metric(server, "grok1_generation_tokens_total") - before[1] < 250  # cut short


INVALID = [  # (body, status, param or code)
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, "x"]}, 400, "prompt"),
    ({"prompt": [1, 2, 5000]}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "stop": 3}, 400, "stop"),
    ({"prompt": "x", "seed": -5}, 400, "seed"),
    ({"prompt": [3] * 200, "max_tokens": 100}, 400, None),  # 300 > the demo's 256
    ({"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
]


def test_invalid_requests_get_the_right_error_and_the_server_carries_on(server, client):
    url = f"{server.url}/v1/completions"
    for body, status, param in INVALID:
        r = httpx.post(url, json={"model": NAME, **body}, timeout=30)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        if param is not None:
            assert param in (error["param"], error["code"]), (body, error)
        if body.get("max_tokens") == 100:
            assert all(str(n) in error["message"] for n in (200, 300, 256)), error
    r = httpx.post(url, content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []},
                      timeout=30).status_code == 400  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    out = client.completions.create(model=NAME, prompt=demo.PROMPT, max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_tokenizer_routes(server, model):
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "[EOS]" and info["model_max_length"] == 256
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "[EOS]", "add_special_tokens": False})
    assert r.json()["tokens"] == [model.tokenizer.eos_id]


# -- multi-host -----------------------------------------------------------------------------------
CASE = "case3_release_layout_8dev"
HEARTBEAT_S = 5


@pytest.mark.slow
def test_two_processes_serve_the_single_process_tokens_and_end_when_a_peer_dies(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
           "--xla_backend_optimization_level=0"}  # fmt: skip
    args = ["--checkpoint", case_path(CASE), "--mesh", "data=1,model=8", "--coordinator",
            coordinator, "--num-processes", "2", "--heartbeat-timeout", str(HEARTBEAT_S),
            "--no-compilation-cache"]  # fmt: skip
    procs = [ServerProcess(tmp_path / f"p{i}.log", *args, "--process-id", str(i), env=env)
             for i in range(2)]  # fmt: skip
    try:
        procs[0].wait_ready()
        assert procs[1].proc.poll() is None, procs[1].log()
        prompt = prompts_of(CASE)[0]
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = httpx.post(f"{procs[0].url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert (
            r.json()["choices"][0]["token_ids"] == case_file(CASE, "greedy_runner.npy")[0].tolist()
        )

        os.kill(procs[1].proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            code = procs[0].proc.wait(timeout=HEARTBEAT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server outlived its peer by {HEARTBEAT_S + 60} s:\n{procs[0].log()}")
        assert code != 0, procs[0].log()
        assert time.monotonic() - t0 < HEARTBEAT_S + 60
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=30)
