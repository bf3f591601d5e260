"""The engine: cached greedy generation equals the release's runner, chunked prefill, slot refill,
stop rules, context limits, seeded sampling, scoring, and requests from many threads with
cancellation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import grok1
from grok1.engine import Engine, EngineDead, QueueFull, Request, RequestError
from grok1.sampling import SamplingParams
from grok1.tokenizer import StreamDecoder
from tests.conftest import (
    REPO,
    case_file,
    case_path,
    golden_model,
    prompts_of,
    simulated_devices_env,
)

CASE = "case2_batch3_robust"  # 3 prompts of different lengths


def greedy(case=CASE):
    return case_file(case, "greedy_runner.npy").tolist()


def test_greedy_matches_release_runner_alone_and_batched(case):
    model = golden_model(case)
    expected = greedy(case)
    prompts = prompts_of(case)
    n = len(expected[0])
    assert model.generate(prompts, n, ignore_eos=True) == expected
    for prompt, want in zip(prompts, expected, strict=True):
        assert model.generate([prompt], n, ignore_eos=True) == [want]


def test_stream_yields_the_generated_tokens():
    model = golden_model(CASE)
    expected = greedy()[1]
    assert list(model.stream(prompts_of(CASE)[1], len(expected), ignore_eos=True)) == expected


def test_chunked_prefill_equals_unchunked():
    small = grok1.load(case_path(CASE), max_bucket=4)  # 13-token prompt: 4 chunks
    try:
        assert small.generate(prompts_of(CASE), 8, ignore_eos=True) == greedy()
        seqs = [p + e for p, e in zip(prompts_of(CASE), greedy(), strict=True)]
        full = golden_model(CASE).score(seqs)
        for a, b in zip(small.score(seqs), full, strict=True):
            assert np.abs(a - b).max() <= 0.25
    finally:
        small.engine.close()


def test_cached_scores_equal_logits():
    model = golden_model(CASE)
    prompts = prompts_of(CASE)
    scores = model.score(prompts)
    for prompt, got in zip(prompts, scores, strict=True):
        logits = model.logits(np.array([prompt]))[0].astype(np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
            - logits.max(-1, keepdims=True)
        )
        want = logp[np.arange(len(prompt) - 1), prompt[1:]]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 0.25


def test_slots_refill_and_results_never_mix():
    model = golden_model(CASE)
    base = prompts_of(CASE)
    prompts = [base[0], base[1], base[2], base[1][:4], base[0][2:9]]
    alone = [model.generate([p], 6, ignore_eos=True)[0] for p in prompts]
    assert model.generate(prompts, 6, ignore_eos=True, max_batch=2) == alone


def test_stop_ids_and_eos_stop_exactly():
    model = golden_model(CASE)
    prompt = prompts_of(CASE)[0]
    full = greedy()[0]  # 217 181 390 224 ...
    assert model.generate([prompt], 8, stop_ids=[390], ignore_eos=True) == [full[:2]]
    results = model.generate([prompt], 8, stop_ids=[390], return_results=True)
    assert results[0].finish_reason == "stop" and results[0].stop == 390
    assert len(results[0].logprobs) == 2
    with_stop = model.engine.submit(
        Request(tuple(prompt), 8, stop_ids=(390,), include_stop_token=True)
    ).result()
    assert with_stop.tokens == full[:3] and len(with_stop.logprobs) == 3
    eos_model = grok1.Model(
        dataclasses.replace(model.grok, config=dataclasses.replace(model.config, eos_token=224)),
        model.params,
    )
    try:
        assert eos_model.generate([prompt], 8) == [full[:3]]
        assert eos_model.generate([prompt], 8, ignore_eos=True) == [full]
    finally:
        eos_model.engine.close()


class _Chars:
    """A stand-in tokenizer: id i is the character chr(ord('a') + i % 26)."""

    vocab_size = 512

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def encode(self, text):
        return [ord(c) - ord("a") + 26 for c in text]

    def stream_decoder(self):
        return StreamDecoder(self)


def test_stop_strings_stop_before_the_string():
    model = golden_model(CASE)
    model.tokenizer = _Chars()
    try:
        prompt = prompts_of(CASE)[0]
        text = _Chars().decode(greedy()[0])
        stop = text[3:5]
        res = model.generate([prompt], 8, stop=[stop], ignore_eos=True, return_results=True)[0]
        assert _Chars().decode(res.tokens) == text[: text.index(stop)]
        assert res.text == text[: text.index(stop)] and res.stop == stop
        assert res.finish_reason == "stop"
    finally:
        model.tokenizer = None


def test_context_limit_is_exact():
    model = golden_model(CASE)
    s = model.config.sequence_len
    prompt = prompts_of(CASE)[0]
    out = model.generate([prompt], s - len(prompt), ignore_eos=True)[0]
    assert len(out) == s - len(prompt)
    with pytest.raises(RequestError, match=f"context is {s} tokens.*{len(prompt)} in the prompt"):
        model.generate([prompt], s - len(prompt) + 1)
    with pytest.raises(RequestError, match="more than the context"):
        model.generate([list(range(5, 5 + s + 1))], 1)


def test_bad_requests_raise_clear_errors():
    model = golden_model(CASE)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate([[]], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[5, model.config.vocab_size]], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits(np.array([[5, -1]]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.generate(["hello"], 4)
    with pytest.raises(RequestError, match="logprobs must be at most"):
        model.engine.submit(Request((5, 6), 2, SamplingParams(logprobs=21)))


def test_seeded_sampling_is_batch_invariant_and_top_k_1_is_greedy():
    model = golden_model(CASE)
    prompts = prompts_of(CASE)
    kw = dict(temperature=1.0, top_p=0.95, ignore_eos=True)
    alone = model.generate([prompts[1]], 6, seed=7, **kw)[0]
    batch = model.generate(prompts + [prompts[1]], 6, seed=[1, 7, 3, 7], **kw)
    assert batch[1] == alone and batch[3] == alone
    assert model.generate([prompts[1]], 6, seed=7, **kw)[0] == alone
    want = greedy()[1][:6]
    assert model.generate([prompts[1]], 6, temperature=0.8, top_k=1, ignore_eos=True)[0] == want


def test_logprobs_of_chosen_tokens_and_top_alternatives():
    model = golden_model(CASE)
    prompt = prompts_of(CASE)[2]
    res = model.generate([prompt], 4, ignore_eos=True, logprobs=3, return_results=True)[0]
    assert res.tokens == greedy()[2][:4]
    assert len(res.top_logprobs) == 4
    seq = list(prompt)
    for tok, lp, top in zip(res.tokens, res.logprobs, res.top_logprobs, strict=True):
        logits = model.logits(np.array([seq]))[0, -1].astype(np.float64)
        ref = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        assert abs(lp - ref[tok]) <= 0.05
        assert top[0][0] == tok  # greedy: the chosen token is the most likely
        assert [i for i, _ in top] == np.argsort(-ref, kind="stable")[:3].tolist()
        assert np.allclose([v for _, v in top], np.sort(ref)[::-1][:3], atol=0.05)
        seq.append(tok)


def test_prompt_logprobs_with_one_new_token_equal_score():
    """What echo + max_tokens 1 scoring reads: every prompt position's log-probability and
    top-k, then the generated token, all from one request."""
    model = golden_model(CASE)
    prompt = prompts_of(CASE)[0]
    request = Request(tuple(prompt), 1, SamplingParams(logprobs=2), prompt_logprobs=True,
                      ignore_eos=True)  # fmt: skip
    res = model.engine.submit(request).result()
    np.testing.assert_allclose(res.prompt_logprobs, model.score([prompt])[0], atol=0.25)
    assert len(res.prompt_logprobs) == len(prompt) - 1 == len(res.prompt_top_logprobs)
    assert all(len(top) == 2 for top in res.prompt_top_logprobs)
    assert res.tokens == greedy()[0][:1] and res.finish_reason == "length"
    scored = model.engine.submit(Request(tuple(prompt), 0, prompt_logprobs=True)).result()
    assert scored.tokens == [] and scored.prompt_logprobs == res.prompt_logprobs


def _holding():
    """An `on_event` callback that holds the scheduler thread at its first event until
    `release` is set (so that what the test submits meanwhile waits, deterministically)."""
    started, release = threading.Event(), threading.Event()

    def hold(event):
        if not started.is_set():
            started.set()
            release.wait(120)

    return hold, started, release


def _wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_from_threads_and_cancellation():
    """Requests arrive from several threads while another decodes; each gets what it gets
    alone; a cancelled request ends "cancelled" and frees its slot."""
    model = golden_model(CASE)
    engine = model.engine
    prompts = prompts_of(CASE)
    alone = [model.generate([p], 10, ignore_eos=True)[0] for p in prompts]
    hold, started, release = _holding()
    long = engine.submit(Request(tuple(prompts[0]), 40, ignore_eos=True), on_event=hold)
    got = [None] * len(prompts)

    def client(i):
        got[i] = engine.submit(Request(tuple(prompts[i]), 10, ignore_eos=True)).result().tokens

    assert started.wait(120)  # the long request has its first token; the scheduler is held
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    _wait_for(lambda: engine.stats()["waiting"] == len(prompts))
    long.cancel()
    release.set()
    for t in threads:
        t.join(timeout=120)
    assert got == alone
    res = long.result(timeout=60)
    # it was held at its first token; the step it was in decodes one horizon more at most
    assert res.finish_reason == "cancelled" and len(res.tokens) <= 1 + engine.horizon
    _wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)


def test_queue_full_and_closed_engine():
    model = golden_model(CASE)
    engine = Engine(model.grok, model.params, max_slots=1, max_queue=1)
    prompt = tuple(prompts_of(CASE)[0])
    hold, started, release = _holding()
    running = engine.submit(Request(prompt, 30, ignore_eos=True), on_event=hold)
    assert started.wait(120)  # admitted, and the scheduler is held
    waiting = engine.submit(Request(prompt, 2, ignore_eos=True))
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt, 2, ignore_eos=True))
    release.set()
    engine.close()
    assert running.result(timeout=60).finish_reason in ("cancelled", "length")
    assert waiting.result(timeout=60).finish_reason in ("cancelled", "length")
    with pytest.raises(EngineDead):
        engine.submit(Request(prompt, 2))


def programs_lowered_after_warmup(model) -> list[str]:
    """The programs JAX lowers for requests alone and together (mixed prompt lengths, greedy and
    seeded, stop ids, a cancellation) after the engine's `warmup`."""
    from jax import monitoring

    mesh = model.grok.mesh
    data = 1 if mesh is None else mesh.shape["data"]
    engine = Engine(model.grok, model.params, max_slots=4, horizon=4, slot_multiple=data)
    prompts = [tuple(p) for p in prompts_of(CASE)]
    longest = max(map(len, prompts)) + 16
    engine.warmup(prompt_len=longest, max_len=longest + 12)
    lowered = []

    def count(event, _secs, fun_name="?", **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(fun_name)

    monitoring.register_event_duration_secs_listener(count)
    try:
        engine.submit(Request(prompts[0], 6, ignore_eos=True)).result(timeout=120)
        handles = [
            engine.submit(Request(prompts[i % 3] + (7,) * i, 3 + 2 * i, ignore_eos=i % 2 == 0,
                                  sampling=SamplingParams(temperature=0.8 * (i % 2), seed=i),
                                  stop_ids=(5,) if i == 3 else ()))
            for i in range(6)
        ]  # fmt: skip
        handles[-1].cancel()
        for h in handles:
            h.result(timeout=120)
    finally:
        monitoring.unregister_event_duration_listener(count)
        engine.close()
    return lowered


def test_warmup_compiles_every_program_that_traffic_then_uses():
    """After `warmup`, traffic lowers no new program: JAX compiles separately for committed and
    uncommitted arguments and for other keyword arguments, so the warm-up must call each program
    exactly as traffic does. (Prompt log-probabilities use their own prefill programs, compiled
    at first use.)"""
    assert programs_lowered_after_warmup(golden_model(CASE)) == []


MESH_WARMUP = """
import grok1
from tests.conftest import case_path
from tests.test_engine import CASE, programs_lowered_after_warmup
print(programs_lowered_after_warmup(grok1.load(case_path(CASE), mesh="data=2,model=4")))
"""


@pytest.mark.slow
def test_warmup_compiles_every_program_that_traffic_then_uses_on_a_mesh():
    """The same on 8 simulated devices (data=2, model=4): there JAX also keys a program by how
    its arguments' shardings are spelled, which the steps' outputs fix (`grok1.steps.Steps`)."""
    env = simulated_devices_env(8)
    proc = subprocess.run([sys.executable, "-c", MESH_WARMUP], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
