"""The notebook API (`grok1.load` -> `Model`): every entry point refuses what it cannot compute
correctly, the same way, and an interrupt leaves the model usable."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

import grok1
from grok1 import demo
from tests.conftest import case_file, case_path, golden_model, prompts_of

CASE = "case2_batch3_robust"


def calls(model):
    """Each entry point with one id sequence."""
    return {
        "generate": lambda ids: model.generate([ids], 2),
        "stream": lambda ids: list(model.stream(ids, 2)),
        "score": lambda ids: model.score([ids]),
        "logits": lambda ids: model.logits(np.array([ids])),
    }


@pytest.mark.parametrize("entry", ["generate", "stream", "score", "logits"])
def test_every_entry_point_refuses_bad_ids_the_same_way(entry):
    model = golden_model(CASE)
    call = calls(model)[entry]
    vocab, context = model.config.vocab_size, model.config.sequence_len
    with pytest.raises(TypeError, match="must be integers"):
        call([5.0, 6.0, 7.0])  # a float id is refused, not truncated
    with pytest.raises(TypeError, match="must be integers"):
        call([5, 6.5, 7])
    with pytest.raises(ValueError, match=f"token id {vocab} at position 1 is outside"):
        call([5, vocab, 7])
    with pytest.raises(ValueError, match="token id -1 at position 0 is outside"):
        call([-1, 5, 7])
    with pytest.raises(ValueError, match="context"):
        call(list(range(5, 5 + context + 1)))


def test_load_refuses_unknown_options():
    for kw, name in ((dict(moe_strategy="sparse"), "moe_strategy"), (dict(dtype="fp8"), "dtype"),
                     (dict(rounding="fastest"), "rounding")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            grok1.load(case_path(CASE), **kw)


def test_generate_refuses_bad_batch_and_seeds():
    model = golden_model(CASE)
    prompts = prompts_of(CASE)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        model.generate(prompts, 2, max_batch=0)
    with pytest.raises(ValueError, match="2 seeds given for 3 prompts"):
        model.generate(prompts, 2, seed=[1, 2])
    with pytest.raises(TypeError, match="list of prompts"):
        model.generate(prompts[0], 2)


def test_demo_loads_with_its_own_tokenizer_and_closes():
    with grok1.load(demo.demo_path(), compilation_cache=None) as model:
        assert model.tokenizer is not None and model.tokenizer.vocab_size == 2048
        text = model.generate(["The for statement"], 4)[0]
        assert isinstance(text, str)
    assert not model.engine.alive
    with pytest.raises(grok1.engine.EngineDead, match="closed"):
        model.generate(["The for statement"], 4)


def test_an_interrupt_cancels_and_leaves_the_model_usable():
    model = golden_model(CASE)
    prompt = prompts_of(CASE)[0]
    want = case_file(CASE, "greedy_runner.npy")[0].tolist()
    n = model.config.sequence_len - len(prompt)
    # Python's own Ctrl-C handler, whatever this process inherited (a shell starts background
    # jobs with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(1000):  # until the interrupt lands in one of the waits
                model.generate([prompt], n, ignore_eos=True)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert model.generate([prompt], len(want), ignore_eos=True) == [want]
    assert model.engine.stats()["running"] == 0
