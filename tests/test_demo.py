"""Tests for the demo model shipped in grok1/demo/ (built by scripts/train_demo.py).

It loads through the public API with its own tokenizer; it predicts held-out pydoc text far better
than a unigram model of the training text (both computed here, with NumPy); its greedy continuation
of the fixed prompt is the recorded one; and its files are release-format pickles that name only
the release's globals.
"""

import fnmatch
import os
import pathlib
import pickletools

import numpy as np
import pytest

import grok1
from grok1 import demo
from grok1.checkpoint import release
from grok1.config import ModelConfig
from grok1.tokenizer import Tokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WINDOW = 256
SUBSET_TOKENS = 2048  # the held-out prefix metrics.json's "heldout_subset" was measured on
RELEASE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("ml_dtypes", "bfloat16"),
    ("__main__", "QuantizedWeight8bit"),
}
ROW_PARALLEL = ("multi_head_attention/linear/w", "moe/linear_1/w")  # 8 scale groups


@pytest.fixture(scope="module")
def model():
    return grok1.load(demo.demo_path(), tokenizer=demo.tokenizer_path())


@pytest.fixture(scope="module")
def metrics():
    return demo.metrics()


@pytest.fixture(scope="module")
def corpus():
    return demo.split_corpus()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loads_with_matching_tokenizer(model):
    tok = Tokenizer.load(demo.tokenizer_path())
    config = ModelConfig.load(demo.DEMO_DIR)
    assert model.config == config
    assert tok.vocab_size == config.vocab_size
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (config.pad_token, 1, config.eos_token) == (
        0, 1, 2,
    )  # fmt: skip
    assert tok.id_to_piece(3) == "[UNK]"
    assert config.emb_size % 8 == 0 and config.ffn_size % 8 == 0
    text = 'The "for" statement:\n\n   for i in range(10):\n       print(i)  # é'
    assert tok.decode(tok.encode(text)) == text


def test_corpus_split_is_disjoint(corpus):
    train, heldout = corpus
    assert len(heldout) > 100 and len(train) > 10 * len(heldout)
    assert not set(train) & set(heldout)


def test_heldout_loss_beats_unigram(model, metrics, corpus):
    train, heldout = corpus
    tok = model.tokenizer
    stream = demo.token_stream(tok, heldout)[:SUBSET_TOKENS]
    assert len(stream) == SUBSET_TOKENS
    ids = stream.reshape(-1, WINDOW)  # no pad ids in the stream: every position is real
    logp = log_softmax(model.logits(ids).astype(np.float64))
    loss = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1).mean()

    counts = np.bincount(demo.token_stream(tok, train), minlength=tok.vocab_size) + 1.0
    unigram = -np.log(counts / counts.sum())[ids[:, 1:]].mean()

    assert loss < unigram - 1.5, (loss, unigram)
    recorded = metrics["heldout_subset"]
    assert recorded["tokens"] == SUBSET_TOKENS
    if metrics["corpus_sha256"] == demo.corpus_digest():  # the Python the demo was trained with
        assert unigram == pytest.approx(recorded["unigram_loss"], abs=1e-6)
        assert loss == pytest.approx(recorded["loss"], abs=0.02)
    assert metrics["heldout_loss"] < metrics["unigram_heldout_loss"] - 1.5


def test_greedy_continuation_is_recorded(model, metrics):
    greedy = metrics["greedy"]
    prompt = model.tokenizer.encode(demo.PROMPT)
    assert greedy["prompt"] == demo.PROMPT and greedy["prompt_ids"] == prompt
    n = len(greedy["ids"])
    buf = np.zeros((1, len(prompt) + n), np.int32)  # one shape: a single compile
    buf[0, : len(prompt)] = prompt
    for length in range(len(prompt), len(prompt) + n):
        logits = model.logits(buf, lengths=[length])  # full forward of the first `length` ids
        buf[0, length] = np.argmax(logits[0, length - 1])
    ids = buf[0, len(prompt) :].tolist()
    assert ids == greedy["ids"]
    assert model.tokenizer.decode(ids) == greedy["text"]
    assert len(set(ids)) > n // 3  # not one token repeated


def _pickle_globals(path: str) -> set:
    """(module, name) of every GLOBAL / STACK_GLOBAL a pickle file names, read with pickletools."""
    found, pushed, memo = set(), [], {}
    with open(path, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
            if op.name == "GLOBAL":
                found.add(tuple(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL":
                found.add((pushed[-2], pushed[-1]))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                pushed.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(arg))
    return found


def test_checkpoint_is_release_format():
    config = ModelConfig.load(demo.DEMO_DIR)
    leaves = release.read_checkpoint(demo.DEMO_DIR, config)  # the restricted reader
    for path, value in leaves.items():
        layer, suffix = release.parse_release_path(path)
        if layer is not None and release.is_matrix(suffix):
            assert isinstance(value, release.QuantizedWeight8bit), path
            assert value.weight.dtype == np.int8
            assert value.scales.shape[-2] == (8 if suffix in ROW_PARALLEL else 1), path
        else:
            assert isinstance(value, np.ndarray) and value.dtype == np.float32, path
    ckpt = os.path.join(demo.DEMO_DIR, release.CKPT_SUBDIR)
    for name in sorted(os.listdir(ckpt)):
        assert _pickle_globals(os.path.join(ckpt, name)) <= RELEASE_GLOBALS, name


def test_demo_is_small_and_packaged():
    files = [p for p in pathlib.Path(demo.DEMO_DIR).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    # Every shipped asset is matched by pyproject's package-data globs.
    tomllib = pytest.importorskip("tomllib")
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["grok1"]
    package = pathlib.Path(grok1.__file__).parent
    for p in files:
        rel = p.relative_to(package).as_posix()
        if "__pycache__" not in rel and not rel.endswith(".py"):
            assert any(fnmatch.fnmatchcase(rel, g) for g in globs), rel
