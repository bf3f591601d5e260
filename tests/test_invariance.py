"""Batch invariance: a request's numbers depend on its own tokens only.

Scores, logits, greedy and seeded generation (tokens and log-probabilities) of a request alone
equal, bit for bit, the same request inside batches of 2 and 8 with mixed lengths, in another
slot, and with other prefill chunk sizes; `logits` and `score` of the same ids agree bit for bit.
On the demo model and a golden case, in bfloat16 and float32, with the native CPU kernels
(`grok1.numerics`), which is the default wherever they can run.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import grok1
from grok1 import demo, kernels, layers
from tests.conftest import case_path, prompts_of

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels unavailable: {kernels.status()}"
)

MODELS = {"demo": demo.demo_path(), "case2": case_path("case2_batch3_robust")}


@functools.cache
def model(name: str, dtype: str, max_bucket: int = 1024) -> grok1.Model:
    return grok1.load(MODELS[name], dtype=dtype, max_bucket=max_bucket, compilation_cache=None)


def sequences(name: str, count: int, seed: int = 0) -> list[list[int]]:
    """`count` id sequences of mixed lengths (3 to ~40), inside the model's vocabulary."""
    rng = np.random.default_rng(seed)
    if name == "case2":
        base = prompts_of("case2_batch3_robust")
    else:
        tok = model(name, "bfloat16").tokenizer
        base = [tok.encode(t) for t in ("The for statement", "def f(x): return x",
                                        "Lists are mutable sequences, typically used")]  # fmt: skip
    vocab = model(name, "bfloat16").config.vocab_size
    out = []
    for i in range(count):
        head = base[i % len(base)]
        tail = rng.integers(3, vocab, int(rng.integers(1, 30))).tolist()
        out.append((head + tail)[: 3 + (i * 11) % 38])
    return out


CASES = [(name, dtype) for name in MODELS for dtype in ("bfloat16", "float32")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_scores_do_not_depend_on_the_batch_or_the_chunk(name, dtype):
    m = model(name, dtype)
    seqs = sequences(name, 8)
    alone = [m.score([s])[0] for s in seqs[:3]]
    in_two = m.score([seqs[1], seqs[0]])
    in_eight = m.score(seqs)
    chunked = model(name, dtype, max_bucket=16).score(seqs[:3])
    for i in range(3):
        np.testing.assert_array_equal(in_eight[i], alone[i])
        np.testing.assert_array_equal(chunked[i], alone[i])
    np.testing.assert_array_equal(in_two[0], alone[1])
    np.testing.assert_array_equal(in_two[1], alone[0])


@pytest.mark.parametrize("name,dtype", CASES)
def test_logits_equal_scores_and_do_not_depend_on_the_batch(name, dtype):
    m = model(name, dtype)
    seqs = sequences(name, 4, seed=1)
    width = max(map(len, seqs))
    batch = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    together = m.logits(batch, [len(s) for s in seqs])
    chunked = model(name, dtype, max_bucket=16)
    for i, s in enumerate(seqs):
        alone = m.logits(np.array([s]))[0]
        np.testing.assert_array_equal(together[i, : len(s)], alone)
        np.testing.assert_array_equal(chunked.logits(np.array([s]))[0], alone)
        # the engine's own log-softmax of these logits is what `score` returned
        logp = np.asarray(layers.log_softmax(jnp.asarray(alone), m.grok.numerics))
        np.testing.assert_array_equal(logp[np.arange(len(s) - 1), s[1:]], m.score([s])[0])


@pytest.mark.parametrize("name,dtype", CASES)
def test_generation_does_not_depend_on_the_batch_slot_or_chunk(name, dtype):
    m = model(name, dtype)
    seqs = sequences(name, 8, seed=2)
    kw = dict(ignore_eos=True, return_results=True, logprobs=2)
    sampled = dict(temperature=0.9, top_p=0.9, top_k=50, seed=[11 * i for i in range(8)])

    def run(model_, prompts, seeds=None, **extra):
        args = dict(kw, **extra)
        if seeds is not None:
            args.update(sampled, seed=seeds)
        res = model_.generate(prompts, 12, **args)
        return [(r.tokens, r.logprobs, r.top_logprobs) for r in res]

    for seeds in (None, sampled["seed"]):
        alone = [run(m, [s], None if seeds is None else [seeds[i]])[0]
                 for i, s in enumerate(seqs[:3])]  # fmt: skip
        eight = run(m, seqs, seeds)
        assert eight[:3] == alone
        two = run(m, [seqs[2], seqs[0]], None if seeds is None else [seeds[2], seeds[0]])
        assert two == [alone[2], alone[0]]
        one_slot = run(m, seqs[:3], None if seeds is None else seeds[:3], max_batch=1)
        assert one_slot == alone
        chunked = run(model(name, dtype, max_bucket=16), seqs[:3],
                      None if seeds is None else seeds[:3])  # fmt: skip
        assert chunked == alone
