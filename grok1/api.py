"""The notebook API: `grok1.load(path)` returns a `Model` that computes logits, scores, generates
and streams.

    model = grok1.load("checkpoints")            # holds ckpt-0/ (and maybe config.json)
    logits = model.logits(tokens)                # [B, T] ids -> [B, T, V] float32
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from grok1.checkpoint import loader, release
from grok1.config import ModelConfig
from grok1.model import DTYPES, Grok1


def check_tokens(tokens, config: ModelConfig) -> np.ndarray:
    """[B, T] int ids in [0, vocab); a clear error otherwise."""
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        raise ValueError(f"tokens must be [batch, length], got a 1-D array of {arr.shape[0]} ids")
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty [batch, length] array, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= config.vocab_size)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(
            f"token id {int(arr[b, t])} at [{b}, {t}] is outside the vocabulary [0, "
            f"{config.vocab_size})"
        )
    return arr.astype(np.int32)


def causal_mask(valid: jax.Array) -> jax.Array:
    """[B, T] key validity -> [B, T, T] mask: query t sees valid keys s <= t."""
    t = valid.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & valid[:, None, :]


class Model:
    """A loaded Grok-1: parameters on devices plus the compiled functions that use them."""

    def __init__(self, grok: Grok1, params: dict, *, path: str | None = None, tokenizer=None):
        self.grok = grok
        self.config = grok.config
        self.params = params
        self.path = path
        self.tokenizer = tokenizer

    @functools.cached_property
    def _forward(self):
        def fn(params, tokens, valid):
            b, t = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            logits, _ = self.grok.apply(params, tokens, positions, causal_mask(valid))
            return logits.astype(jnp.float32)

        return jax.jit(fn)

    def logits(self, tokens, lengths=None) -> np.ndarray:
        """Full-sequence logits, float32 [B, T, V], of right-padded ids [B, T].

        `lengths[b]` is row b's real length (positions at or past it are padding and their logits
        unspecified); without it, ids equal to the pad id are padding, as in the release.
        """
        toks = check_tokens(tokens, self.config)
        if lengths is None:
            valid = toks > self.config.pad_token
        else:
            lengths = np.asarray(lengths).reshape(-1)
            if lengths.shape[0] != toks.shape[0]:
                raise ValueError(f"{lengths.shape[0]} lengths given for {toks.shape[0]} rows")
            if (lengths < 0).any() or (lengths > toks.shape[1]).any():
                raise ValueError(f"lengths must lie in [0, {toks.shape[1]}], got {lengths}")
            valid = np.arange(toks.shape[1])[None, :] < lengths[:, None]
        return np.asarray(self._forward(self.params, jnp.asarray(toks), jnp.asarray(valid)))


def load(
    path: str,
    *,
    dtype: str = "bfloat16",
    config: ModelConfig | None = None,
    moe_strategy: str = "auto",
    tokenizer=None,
) -> Model:
    """Loads a release-format checkpoint directory (holding `ckpt-0/`, maybe `config.json`).

    Args:
      path: the directory; `config.json` in it sets the architecture (else the Grok-1 preset).
      dtype: "bfloat16" (the release's numerics) or "float32".
      config: overrides the directory's config.
      moe_strategy: "auto", "gather" or "grouped" (see `grok1.moe`).
      tokenizer: a `grok1.tokenizer.Tokenizer`, or a path to a SentencePiece model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not os.path.isdir(os.path.join(path, release.CKPT_SUBDIR)):
        raise FileNotFoundError(
            f"no checkpoint at {path!r}: expected a directory holding {release.CKPT_SUBDIR}/ "
            f"(put the release's ckpt-0/ under checkpoints/, or pass its parent directory)"
        )
    config = config or ModelConfig.load(path)
    params, formats = loader.load_params(path, config, dtype=dtype)
    grok = Grok1(config, formats, dtype=dtype, moe_strategy=moe_strategy)
    if isinstance(tokenizer, str | os.PathLike):
        from grok1.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer is not None:
        tokenizer.check_vocab(config.vocab_size)
    return Model(grok, params, path=path, tokenizer=tokenizer)
