"""The engine: cached greedy generation equals the release's runner, chunked prefill, slot refill,
stop rules, context limits, seeded sampling and scoring."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import grok1
from tests.conftest import case_file, case_path, golden_model, prompts_of

CASE = "case2_batch3_robust"  # 3 prompts of different lengths


def test_greedy_matches_release_runner_alone_and_batched(case):
    model = golden_model(case)
    expected = case_file(case, "greedy_runner.npy").tolist()
    prompts = prompts_of(case)
    n = len(expected[0])
    assert model.generate(prompts, n, ignore_eos=True) == expected
    for prompt, want in zip(prompts, expected, strict=True):
        assert model.generate([prompt], n, ignore_eos=True) == [want]


def test_stream_yields_the_generated_tokens(monkeypatch):
    """Streaming runs one decode step per call; every call reads the engine's converted
    embedding table instead of converting the float32 parameter again."""
    model = golden_model(CASE)
    engine = model.engine
    tables = []
    for name in ("_chunk", "_decode"):
        program = getattr(engine, name)

        def spy(*args, _program=program, **kwargs):
            tables.append(kwargs.get("table"))
            return _program(*args, **kwargs)

        monkeypatch.setattr(engine, name, spy)
    prompt = prompts_of(CASE)[1]
    expected = case_file(CASE, "greedy_runner.npy")[1].tolist()
    assert list(model.stream(prompt, len(expected), ignore_eos=True)) == expected
    assert len(tables) >= len(expected)  # a prefill chunk, then a call per streamed step
    assert all(t is engine.table for t in tables)


def test_chunked_prefill_equals_unchunked():
    small = grok1.load(case_path(CASE), max_bucket=4)  # 13-token prompt: 4 chunks
    expected = case_file(CASE, "greedy_runner.npy").tolist()
    assert small.generate(prompts_of(CASE), 8, ignore_eos=True) == expected
    seqs = [p + e for p, e in zip(prompts_of(CASE), expected, strict=True)]
    full = golden_model(CASE).score(seqs)
    for a, b in zip(small.score(seqs), full, strict=True):
        assert np.abs(a - b).max() <= 0.25


def test_cached_scores_equal_uncached_forward():
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
    full = case_file(CASE, "greedy_runner.npy")[0].tolist()  # 217 181 390 224 ...
    assert model.generate([prompt], 8, stop_ids=[390], ignore_eos=True) == [full[:2]]
    results = model.generate([prompt], 8, stop_ids=[390], return_results=True)
    assert results[0].finish_reason == "stop" and len(results[0].logprobs) == 2
    eos_model = grok1.Model(
        dataclasses.replace(model.grok, config=dataclasses.replace(model.config, eos_token=224)),
        model.params,
    )
    assert eos_model.generate([prompt], 8) == [full[:3]]
    assert eos_model.generate([prompt], 8, ignore_eos=True) == [full]


class _Chars:
    """A stand-in tokenizer: id i is the character chr(ord('a') + i % 26)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def encode(self, text):
        return [ord(c) - ord("a") + 26 for c in text]


def test_stop_strings_stop_before_the_string():
    model = golden_model(CASE)
    model.tokenizer = _Chars()
    try:
        prompt = prompts_of(CASE)[0]
        full = case_file(CASE, "greedy_runner.npy")[0].tolist()
        text = _Chars().decode(full)
        stop = text[3:5]
        out = model.generate([prompt], 8, stop=[stop], ignore_eos=True)[0]
        assert _Chars().decode(out) == text[: text.index(stop)]
    finally:
        model.tokenizer = None


def test_context_limit_is_exact():
    model = golden_model(CASE)
    s = model.config.sequence_len
    prompt = prompts_of(CASE)[0]
    out = model.generate([prompt], s - len(prompt), ignore_eos=True)[0]
    assert len(out) == s - len(prompt)
    with pytest.raises(ValueError, match="exceeds the context"):
        model.generate([prompt], s - len(prompt) + 1)


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


def test_seeded_sampling_is_batch_invariant_and_top_k_1_is_greedy():
    model = golden_model(CASE)
    prompts = prompts_of(CASE)
    kw = dict(temperature=1.0, top_p=0.95, ignore_eos=True)
    alone = model.generate([prompts[1]], 6, seed=7, **kw)[0]
    batch = model.generate(prompts + [prompts[1]], 6, seed=[1, 7, 3, 7], **kw)
    assert batch[1] == alone and batch[3] == alone
    assert model.generate([prompts[1]], 6, seed=7, **kw)[0] == alone
    greedy = case_file(CASE, "greedy_runner.npy")[1].tolist()[:6]
    assert model.generate([prompts[1]], 6, temperature=0.8, top_k=1, ignore_eos=True)[0] == greedy


def test_logprobs_of_chosen_tokens_and_top_alternatives():
    model = golden_model(CASE)
    prompt = prompts_of(CASE)[2]
    res = model.generate([prompt], 4, ignore_eos=True, logprobs=3, return_results=True)[0]
    assert res.tokens == case_file(CASE, "greedy_runner.npy")[2].tolist()[:4]
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
