"""The notebook API: `grok1.load(path)` returns a `Model` that computes logits, scores, generates
and streams.

    model = grok1.load("checkpoints")            # holds ckpt-0/ (and maybe config.json)
    logits = model.logits(tokens)                # [B, T] ids -> [B, T, V] float32
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import sharding
from grok1.cache import CACHE_AXES, KVCache
from grok1.checkpoint import directory, loader
from grok1.config import ModelConfig
from grok1.engine import Engine, Request, to_host
from grok1.model import DTYPES, Grok1, param_table
from grok1.sampling import SamplingParams


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

    def __init__(
        self,
        grok: Grok1,
        params: dict,
        *,
        mesh=None,
        path=None,
        tokenizer=None,
        max_bucket: int = 1024,
    ):
        self.grok = grok
        self.config = grok.config
        self.params = params
        self.mesh = mesh
        self.path = path
        self.tokenizer = tokenizer
        self.engine = Engine(
            grok, params, max_bucket=max_bucket, shardings=_CacheShardings(mesh, grok.config)
        )

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
        return to_host(self._forward(self.params, jnp.asarray(toks), jnp.asarray(valid)))

    # -- generation ---------------------------------------------------------------------------
    def _requests(self, prompts, max_new_tokens, stop, stop_ids, ignore_eos, **sampling_kw):
        seed = sampling_kw.pop("seed", 0)
        out = []
        for i, prompt in enumerate(prompts):
            ids = self._encode(prompt)
            seed_i = seed[i] if isinstance(seed, list | tuple) else seed
            sp = SamplingParams(seed=seed_i, **sampling_kw)
            out.append(
                Request(
                    tuple(ids),
                    int(max_new_tokens),
                    sp,
                    tuple(stop_ids or ()),
                    tuple(stop or ()),
                    ignore_eos,
                )
            )
        return out

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer: load(..., tokenizer=PATH) or pass token ids"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token (or non-empty text)")
        return ids

    def _stop_check(self, requests):
        if not any(r.stop_strings for r in requests):
            return None
        if self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

        def check(i, tokens):
            stops = requests[i].stop_strings
            text = self.tokenizer.decode(tokens)
            found = [text.index(s) for s in stops if s in text]
            if not found:
                return None
            start = min(found)  # keep the tokens whose text ends before the stop string
            keep = len(tokens)
            while keep > 0 and len(self.tokenizer.decode(tokens[:keep])) > start:
                keep -= 1
            return keep

        return check

    def generate(
        self,
        prompts,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed=0,
        stop=None,
        stop_ids=None,
        ignore_eos: bool = False,
        logprobs: int = 0,
        max_batch: int = 8,
        return_results: bool = False,
    ):
        """Continues each prompt; returns per prompt the new token ids (prompts given as id
        lists) or the new text (prompts given as strings). Stops at EOS (unless `ignore_eos`),
        `stop_ids`, `stop` strings or `max_new_tokens`; the stop itself is not returned.

        With `return_results`, returns `engine.Result`s instead: tokens, their log-probabilities,
        the finish reason and, when `logprobs=k`, the k most likely (id, log-probability)
        alternatives at every step."""
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and isinstance(prompts[0], int | np.integer)
        )
        if single:
            raise TypeError("generate takes a list of prompts; wrap a single prompt in a list")
        reqs = self._requests(
            prompts,
            max_new_tokens,
            stop,
            stop_ids,
            ignore_eos,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            logprobs=logprobs,
        )
        results = [None] * len(reqs)
        for i, _, result in self.engine.run(
            reqs,
            max_batch=max_batch,
            stop_check=self._stop_check(reqs),
            batch_multiple=self._data_size(),
        ):
            if result is not None:
                results[i] = result
        if return_results:
            return results
        return [self._output(p, r.tokens) for p, r in zip(prompts, results, strict=True)]

    def stream(self, prompt, max_new_tokens: int = 32, **kw) -> Iterator:
        """Yields new token ids one by one (or text pieces, for a text prompt)."""
        ignore_eos = kw.pop("ignore_eos", False)
        stop, stop_ids = kw.pop("stop", None), kw.pop("stop_ids", None)
        reqs = self._requests([prompt], max_new_tokens, stop, stop_ids, ignore_eos, **kw)
        text = isinstance(prompt, str)
        decoder = self.tokenizer.stream_decoder() if text else None
        for _, new, _ in self.engine.run(
            reqs, stream=True, stop_check=self._stop_check(reqs), batch_multiple=self._data_size()
        ):
            for tok in new:
                if decoder is None:
                    yield tok
                else:
                    piece = decoder.feed(tok)
                    if piece:
                        yield piece
        if decoder is not None:
            tail = decoder.flush()
            if tail:
                yield tail

    def score(self, sequences) -> list[np.ndarray]:
        """Per-token log-probabilities log p(x_t | x_<t), t >= 1, of each id sequence."""
        return self.engine.score([self._encode(s) for s in sequences])

    def _output(self, prompt, tokens):
        return self.tokenizer.decode(tokens) if isinstance(prompt, str) else list(tokens)

    def _data_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"]


class _CacheShardings:
    """Shardings of the KV cache on the model's mesh (None: default placement)."""

    def __init__(self, mesh, config: ModelConfig):
        self.mesh, self.config = mesh, config

    def cache(self, cache: KVCache):
        if self.mesh is None:
            return jax.tree.map(lambda _: None, cache)
        rep = ("kv_heads",) if sharding.kv_replication(self.config, self.mesh) > 1 else ()
        table = {
            "k": (cache.k.shape, None, CACHE_AXES),
            "v": (cache.v.shape, None, CACHE_AXES),
            "lengths": (cache.lengths.shape, None, ("batch",)),
        }
        s = sharding.table_shardings(table, self.mesh, replicate=rep)
        return KVCache(k=s["k"], v=s["v"], lengths=s["lengths"])


def load(
    path: str,
    *,
    mesh=None,
    dtype: str = "bfloat16",
    config: ModelConfig | None = None,
    moe_strategy: str = "auto",
    rounding: str = "release",
    expert_parallel: bool = False,
    tokenizer=None,
    max_bucket: int = 1024,
    progress=None,
) -> Model:
    """Loads a checkpoint directory: the release's `ckpt-0/` or a converted checkpoint's
    `model.safetensors.index.json` (`grok1-convert`), maybe with `config.json`.

    Args:
      path: the directory; `config.json` in it sets the architecture (else the Grok-1 preset).
      dtype: "bfloat16" (the release's numerics) or "float32".
      config: overrides the directory's config.
      moe_strategy: "auto", "gather", "dense" or "grouped" (see `grok1.moe`).
      rounding: "release" (the release's default-flag numerics), "strict" (every rounding of
        SPEC.md §2) or "fast" ("release" with the int8 weights unrounded: faster on CPU, not
        the release's numerics); see `grok1.model.Grok1`.
      tokenizer: a `grok1.tokenizer.Tokenizer`, or a path to a SentencePiece model.
      mesh: a `jax.sharding.Mesh` or a dict of axis sizes such as {"data": 1, "model": 8};
        None keeps everything on the first device.
      expert_parallel: split the experts whole over the mesh's model axis (each device runs
        its own experts for every token; for throughput at large batches) instead of splitting
        every expert's hidden size over it (the default; lowest latency). Needs a mesh.
      max_bucket: largest prefill chunk (a power of two); longer prompts are prefilled in chunks.
      progress: True for a "GB done, GB/s, ETA" line on a terminal, or a callable taking the
        bytes of each finished read.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = directory.check(path, config)  # one-line errors naming the path, before any read
    shardings = None
    if expert_parallel and mesh is None:
        raise ValueError("expert_parallel=True needs a mesh (e.g. mesh={'data': 1, 'model': 8})")
    if mesh is not None:
        mesh = sharding.make_mesh(mesh)
        sharding.check_mesh(config, mesh, expert_parallel)
        rules = sharding.EXPERT_PARALLEL_RULES if expert_parallel else sharding.RULES
        shardings = _param_shardings(path, config, mesh, rules)
    from grok1 import plan

    plan_mesh = mesh or sharding.make_mesh({"data": 1, "model": 1}, jax.local_devices()[:1])
    plan.check_params_fit(config, plan_mesh)  # before reading any weights
    params, formats = loader.load_params(
        path, config, dtype=dtype, shardings=shardings, progress=progress or None
    )
    grok = Grok1(
        config, formats, dtype=dtype, moe_strategy=moe_strategy, rounding=rounding,
        expert_mesh=mesh if expert_parallel else None, mesh=mesh,
    )  # fmt: skip
    if isinstance(tokenizer, str | os.PathLike):
        from grok1.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer is not None:
        tokenizer.check_vocab(config.vocab_size)
    return Model(grok, params, mesh=mesh, path=path, tokenizer=tokenizer, max_bucket=max_bucket)


def _param_shardings(path, config, mesh, rules=sharding.RULES):
    """(module, leaf, shape) -> NamedSharding from the logical-axis rules."""
    rep = ("kv_heads",) if sharding.kv_replication(config, mesh) > 1 else ()
    cache: dict = {}

    def get(module, leaf, shape):
        key = (module, leaf)
        if key not in cache:
            axes = _LEAF_AXES(config)[key]
            table = {key: (shape, None, axes)}
            cache[key] = sharding.table_shardings(table, mesh, replicate=rep, rules=rules)[key]
        return cache[key]

    return get


@functools.lru_cache(maxsize=8)
def _LEAF_AXES(config: ModelConfig) -> dict:  # noqa: N802
    """Logical axes of every leaf, for either storage of each matrix."""
    from grok1.layers import MatrixFormat
    from grok1.model import MATRICES, WeightFormats

    out = {}
    for fmt in (MatrixFormat(1), MatrixFormat(None)):
        table = param_table(config, WeightFormats(**{m: fmt for m in MATRICES}))
        out.update({k: v[2] for k, v in table.items()})
    return out
