"""The demo model that ships with the package: a 4-layer Grok-1 (same architecture, int8 release
format) with its own SentencePiece tokenizer, trained by `scripts/train_demo.py` on the help topics
every CPython carries (`pydoc_data.topics`). It lets the package run end to end without the 318 GB
release checkpoint:

    import grok1
    from grok1 import demo
    model = grok1.load(demo.demo_path(), tokenizer=demo.tokenizer_path())

The corpus is defined here, not in the script, so that training and the tests agree on it:
the topics sorted by name, every `HELDOUT_EVERY`-th one (starting with the first) held out; each
topic split into paragraphs at blank lines; a held-out paragraph that also occurs in a training
topic is dropped (topics such as "compound" repeat others' text). Token streams are the
paragraphs' ids, each followed by EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
METRICS_FILE = "metrics.json"
PROMPT = "The for statement"  # the fixed prompt of metrics.json's greedy continuation
HELDOUT_EVERY = 10
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def demo_path() -> str:
    """The demo checkpoint directory (holds `ckpt-0/`, `config.json`, `tokenizer.model`)."""
    if not os.path.isdir(os.path.join(DEMO_DIR, "ckpt-0")):
        raise FileNotFoundError(
            f"the demo checkpoint is missing from {DEMO_DIR}; rebuild it with "
            "`python scripts/train_demo.py` from the repository root"
        )
    return DEMO_DIR


def tokenizer_path() -> str:
    """The demo's SentencePiece model (2048 pieces; not the release's tokenizer)."""
    return os.path.join(demo_path(), "tokenizer.model")


def metrics() -> dict:
    """The figures `scripts/train_demo.py` recorded (held-out losses, greedy sample, ...)."""
    with open(os.path.join(demo_path(), METRICS_FILE)) as f:
        return json.load(f)


def topics() -> dict[str, str]:
    """CPython's pydoc help topics {name: text} (they vary a little between Python versions)."""
    from pydoc_data.topics import topics as pydoc_topics

    return dict(pydoc_topics)


def paragraphs(text: str) -> list[str]:
    """The non-blank paragraphs of `text` (split at blank lines; indentation kept)."""
    return [p.strip("\n") for p in _BLANK_LINES.split(text) if p.strip()]


def split_corpus(corpus: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(training paragraphs, held-out paragraphs), deterministic (see the module docstring)."""
    corpus = topics() if corpus is None else corpus
    names = sorted(corpus)
    held = {name for i, name in enumerate(names) if i % HELDOUT_EVERY == 0}
    train = [p for name in names if name not in held for p in paragraphs(corpus[name])]
    seen = set(train)
    heldout = [p for name in names if name in held for p in paragraphs(corpus[name])]
    return train, [p for p in heldout if p not in seen]


def corpus_digest(corpus: dict[str, str] | None = None) -> str:
    """sha256 of the topics (sorted by name), to tell whether this Python's corpus is the one the
    demo was trained on."""
    corpus = topics() if corpus is None else corpus
    h = hashlib.sha256()
    for name in sorted(corpus):
        h.update(name.encode() + b"\0" + corpus[name].encode() + b"\0")
    return h.hexdigest()


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """int32 ids of `texts`, each followed by the tokenizer's EOS id."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, np.int32)
