"""Batch invariance: a request's numbers depend on its own tokens only.

Scores, logits, greedy and seeded generation (tokens and log-probabilities) of a request alone
equal, bit for bit, the same request inside batches of 2 and 8 with mixed lengths, in another
slot, and with other prefill chunk sizes; `logits` and `score` of the same ids agree bit for bit.
On the demo model and a golden case, in bfloat16 and float32, with the native CPU kernels
(`grok1.numerics`), which is the default wherever they can run: on one device, and within the
meshes 1x8 and 2x4 of simulated devices (in subprocesses, the same checks).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import grok1
from grok1 import demo, kernels, layers
from grok1.config import ModelConfig
from grok1.tokenizer import Tokenizer
from tests.conftest import REPO, case_path, prompts_of, simulated_devices_env

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"CPU kernels unavailable: {kernels.status()}"
)

MODELS = {"demo": demo.demo_path(), "case2": case_path("case2_batch3_robust")}


@functools.cache
def model(
    name: str, dtype: str, max_bucket: int = 1024, mesh: str | None = None, ep: bool = False
) -> grok1.Model:
    m = grok1.load(MODELS[name], dtype=dtype, max_bucket=max_bucket, mesh=mesh,
                   expert_parallel=ep, compilation_cache=None)  # fmt: skip
    assert m.grok.numerics.kernels, "the kernels are the default wherever they can run"
    return m


def sequences(name: str, count: int, seed: int = 0) -> list[list[int]]:
    """`count` id sequences of mixed lengths (3 to ~40), inside the model's vocabulary."""
    rng = np.random.default_rng(seed)
    if name == "case2":
        base = prompts_of("case2_batch3_robust")
    else:
        tok = Tokenizer.load(os.path.join(MODELS[name], "tokenizer.model"))
        base = [tok.encode(t) for t in ("The for statement", "def f(x): return x",
                                        "Lists are mutable sequences, typically used")]  # fmt: skip
    vocab = ModelConfig.load(MODELS[name]).vocab_size
    out = []
    for i in range(count):
        head = base[i % len(base)]
        tail = rng.integers(3, vocab, int(rng.integers(1, 30))).tolist()
        out.append((head + tail)[: 3 + (i * 11) % 38])
    return out


CASES = [(name, dtype) for name in MODELS for dtype in ("bfloat16", "float32")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_scores_do_not_depend_on_the_batch_or_the_chunk(name, dtype, mesh=None, ep=False):
    m = model(name, dtype, mesh=mesh, ep=ep)
    seqs = sequences(name, 8)
    alone = [m.score([s])[0] for s in seqs[:3]]
    in_two = m.score([seqs[1], seqs[0]])
    in_eight = m.score(seqs)
    chunked = model(name, dtype, max_bucket=16, mesh=mesh, ep=ep).score(seqs[:3])
    for i in range(3):
        np.testing.assert_array_equal(in_eight[i], alone[i])
        np.testing.assert_array_equal(chunked[i], alone[i])
    np.testing.assert_array_equal(in_two[0], alone[1])
    np.testing.assert_array_equal(in_two[1], alone[0])


@pytest.mark.parametrize("name,dtype", CASES)
def test_logits_equal_scores_and_do_not_depend_on_the_batch(name, dtype, mesh=None, ep=False):
    m = model(name, dtype, mesh=mesh, ep=ep)
    seqs = sequences(name, 4, seed=1)
    width = max(map(len, seqs))
    batch = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    together = m.logits(batch, [len(s) for s in seqs])
    chunked = model(name, dtype, max_bucket=16, mesh=mesh, ep=ep)
    for i, s in enumerate(seqs):
        alone = m.logits(np.array([s]))[0]
        np.testing.assert_array_equal(together[i, : len(s)], alone)
        np.testing.assert_array_equal(chunked.logits(np.array([s]))[0], alone)
        # the engine's own log-softmax of these logits is what `score` returned
        logp = np.asarray(layers.log_softmax(jnp.asarray(alone), m.grok.numerics))
        np.testing.assert_array_equal(logp[np.arange(len(s) - 1), s[1:]], m.score([s])[0])


@pytest.mark.parametrize("name,dtype", CASES)
def test_generation_does_not_depend_on_the_batch_slot_or_chunk(name, dtype, mesh=None, ep=False):
    m = model(name, dtype, mesh=mesh, ep=ep)
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
        chunked = run(model(name, dtype, max_bucket=16, mesh=mesh, ep=ep), seqs[:3],
                      None if seeds is None else seeds[:3])  # fmt: skip
        assert chunked == alone


# The same three tests within a mesh, in one subprocess per mesh (simulated devices), all at
# once: compiling (single-threaded) is half their time. Each mesh runs one model in one dtype
# (together they cover both models and both dtypes; expert parallelism's placement is checked
# on scores and logits: generation adds no kernel call), compiled without LLVM's optimisations
# (which would change summation order in XLA's own code the same way at every batch).
MESH_SCRIPT = """
import sys
from tests import test_invariance as t
mesh, name, dtype, ep, *checks = sys.argv[1:]
for check in checks:
    getattr(t, check)(name, dtype, mesh, ep == "expert_parallel")
print("invariant", flush=True)
"""
ALL = (
    "test_scores_do_not_depend_on_the_batch_or_the_chunk",
    "test_logits_equal_scores_and_do_not_depend_on_the_batch",
    "test_generation_does_not_depend_on_the_batch_slot_or_chunk",
)
MESH_CASES = (  # mesh, model, dtype, placement, checks
    ("data=1,model=8", "demo", "bfloat16", "-", *ALL),
    ("data=2,model=4", "case2", "float32", "-", *ALL),
    ("data=1,model=8", "demo", "float32", "expert_parallel", *ALL[:2]),
)


@pytest.mark.slow
def test_invariance_within_a_mesh(tmp_path):
    env = simulated_devices_env(8)
    procs = []
    for i, case in enumerate(MESH_CASES):
        log = open(tmp_path / f"{i}.log", "w+")  # closed below
        cmd = [sys.executable, "-c", MESH_SCRIPT, *case]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log), log))
    try:
        for (proc, log), case in zip(procs, MESH_CASES, strict=True):
            code = proc.wait(timeout=400)
            log.seek(0)
            out = log.read()
            assert code == 0 and out.strip().endswith("invariant"), f"{case}:\n{out[-4000:]}"
    finally:
        for proc, log in procs:
            proc.kill()
            proc.wait()
            log.close()
