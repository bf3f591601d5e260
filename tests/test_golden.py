"""Parity with the release: logits, greedy continuations and prefill logits of every golden case.

The release's own compiled and op-by-op runs differ by up to 0.23 in logits (SPEC.md §2,
"Precision regime"), so these bounds are tolerances of that order plus exact greedy tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import CASES, case_file, case_path, golden_model, prompts_of

MAX_ABS = 0.25
# Mean |diff| bound (issue #2). The default rounding="release" drops the roundings that the
# release's default-flag program drops (grok1.model.Grok1); what remains is float32
# summation-order noise that flips occasional bf16 roundings (largest on case4_12layers, ~0.015).
MEAN_ABS = 0.02


def valid_mask(case):
    lengths = case_file(case, "lengths.npy")
    t = case_file(case, "tokens.npy").shape[1]
    return np.arange(t)[None, :] < lengths[:, None]


def test_logits_match_release(case):
    model = golden_model(case)
    logits = model.logits(case_file(case, "tokens.npy"), case_file(case, "lengths.npy"))
    diff = np.abs(logits - case_file(case, "logits.npy"))[valid_mask(case)]
    assert diff.max() <= MAX_ABS, diff.max()
    assert diff.mean() <= MEAN_ABS, diff.mean()


def test_logits_without_lengths_use_pad_ids(case):
    model = golden_model(case)
    tokens = case_file(case, "tokens.npy")
    a = model.logits(tokens)
    b = model.logits(tokens, case_file(case, "lengths.npy"))
    m = valid_mask(case)
    np.testing.assert_array_equal(a[m], b[m])


def test_greedy_forward_matches_release(case):
    model = golden_model(case)
    expected = case_file(case, "greedy_forward.npy")
    for b, prompt in enumerate(prompts_of(case)):
        seq = list(prompt)
        width = len(prompt) + expected.shape[1]  # one shape for every step: one compile
        for _ in range(expected.shape[1]):
            tokens = np.zeros((1, width), np.int32)
            tokens[0, : len(seq)] = seq
            seq.append(int(model.logits(tokens, [len(seq)])[0, len(seq) - 1].argmax()))
        assert seq[len(prompt) :] == expected[b].tolist()


def test_prefill_last_logits_match_release(case):
    """The prompt right-padded to its prefill bucket, as the release's runner does."""
    model = golden_model(case)
    expected = case_file(case, "prefill_last_logits.npy")
    for b, prompt in enumerate(prompts_of(case)):
        bucket = 16 if len(prompt) <= 16 else 32
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(prompt)] = prompt
        last = model.logits(tokens, [len(prompt)])[0, len(prompt) - 1]
        assert np.abs(last - expected[b]).max() <= MAX_ABS


def test_float32_mode_matches_release_float32_run():
    cases = [c for c in CASES if case_file(c, "logits_f32.npy") is not None]
    assert cases, "no golden case has logits_f32.npy"
    for case in cases:
        model = golden_model(case, "float32")
        logits = model.logits(case_file(case, "tokens.npy"), case_file(case, "lengths.npy"))
        diff = np.abs(logits - case_file(case, "logits_f32.npy"))[valid_mask(case)]
        assert diff.max() <= 0.05, (case, diff.max())


def test_batching_with_other_lengths_keeps_logits(case):
    """A prompt batched with longer and shorter prompts (the release crashes on this)."""
    model = golden_model(case)
    prompt = prompts_of(case)[0]
    alone = model.logits(np.array([prompt]))[0]
    rng = np.random.default_rng(0)
    others = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (3, len(prompt) + 5)]
    rows = [prompt] + others
    t = max(map(len, rows))
    tokens = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    batched = model.logits(tokens, [len(r) for r in rows])[0, : len(prompt)]
    if model.grok.numerics.kernels:  # batch invariant (tests/test_invariance.py): the same bits
        np.testing.assert_array_equal(batched, alone)
    assert np.abs(batched - alone).max() <= MAX_ABS
    np.testing.assert_array_equal(batched.argmax(-1), alone.argmax(-1))


def test_strict_rounding_matches_release_strict_run():
    """rounding="strict" performs every rounding of SPEC.md §2 as written, which is what the
    release computes with XLA's excess precision off (logits_strict.npy): far tighter than the
    default-flag bound."""
    cases = [c for c in CASES if case_file(c, "logits_strict.npy") is not None]
    assert cases, "no golden case has logits_strict.npy"
    for case in cases:
        model = golden_model(case, rounding="strict")
        logits = model.logits(case_file(case, "tokens.npy"), case_file(case, "lengths.npy"))
        diff = np.abs(logits - case_file(case, "logits_strict.npy"))[valid_mask(case)]
        assert diff.max() <= 0.15 and diff.mean() <= 0.016, (case, diff.max(), diff.mean())


@pytest.mark.slow
def test_logits_do_not_depend_on_xla_excess_precision(tmp_path):
    """Every rounding we intend is explicit, so XLA's excess-precision rewrites (on by default)
    cannot drop one: the same logits, bit for bit, with --xla_allow_excess_precision=false."""
    code = (
        "import sys, numpy as np, grok1\n"
        "out = {}\n"
        "for i, case in enumerate(sys.argv[2:]):\n"
        "    tokens, lengths = np.load(case + '/tokens.npy'), np.load(case + '/lengths.npy')\n"
        "    out[str(i)] = grok1.load(case).logits(tokens, lengths)\n"
        "np.savez(sys.argv[1], **out)\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_allow_excess_precision=false")
    target = tmp_path / "strict_flag.npz"
    subprocess.run(
        [sys.executable, "-c", code, str(target), *map(case_path, CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    flagged = np.load(target)
    for i, case in enumerate(CASES):
        logits = golden_model(case).logits(case_file(case, "tokens.npy"),
                                           case_file(case, "lengths.npy"))  # fmt: skip
        np.testing.assert_array_equal(logits, flagged[str(i)], err_msg=case)
