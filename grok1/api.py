"""The notebook API: `grok1.load(path)` returns a `Model` that computes logits, scores, generates
and streams.

    model = grok1.load("checkpoints")            # holds ckpt-0/ (and maybe config.json)
    logits = model.logits(tokens)                # [B, T] ids -> [B, T, V] float32
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from grok1 import compile_cache, sharding
from grok1.checkpoint import directory, loader
from grok1.config import ModelConfig
from grok1.engine import Engine, EngineDead, Request, bucket, run_all, to_host
from grok1.model import Grok1
from grok1.moe import STRATEGIES
from grok1.numerics import Numerics
from grok1.sampling import SamplingParams


def _token_ids(seq, vocab_size: int, what: str) -> list[int]:
    """One sequence of token ids as ints: integers only (a float or bool is refused, never
    truncated), each in [0, vocab_size)."""
    if isinstance(seq, str):
        raise TypeError(f"{what}: expected token ids, got a string")
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat sequence of token ids, got shape {arr.shape}")
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise ValueError(
            f"{what}: token id {int(arr[bad[0]])} at position {int(bad[0])} is outside the "
            f"vocabulary [0, {vocab_size})"
        )
    return arr.astype(np.int64).tolist()


def check_tokens(tokens, config: ModelConfig) -> np.ndarray:
    """[B, T] int ids in [0, vocab), T at most the context; a clear error otherwise."""
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        raise ValueError(f"tokens must be [batch, length], got a 1-D array of {arr.shape[0]} ids")
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty [batch, length] array, got {arr.shape}")
    for b, row in enumerate(arr):
        _token_ids(row, config.vocab_size, f"tokens[{b}]")
    if arr.shape[1] > config.sequence_len:
        raise ValueError(
            f"tokens has {arr.shape[1]} positions, more than the context of {config.sequence_len}"
        )
    return arr.astype(np.int32)


class Model:
    """A loaded Grok-1: parameters on devices, the engine that serves them, and a tokenizer."""

    def __init__(
        self,
        grok: Grok1,
        params: dict,
        *,
        mesh=None,
        path=None,
        tokenizer=None,
        max_bucket: int = 1024,
        max_slots: int = 8,
        horizon: int = 8,
        max_queue: int = 256,
    ):
        self.grok = grok
        self.config = grok.config
        self.params = params
        self.mesh = mesh
        self.path = path
        self.engine = Engine(
            grok,
            params,
            max_bucket=max_bucket,
            max_slots=max_slots,
            horizon=horizon,
            max_queue=max_queue,
            tokenizer=tokenizer,
            slot_multiple=self._data_size(),
        )

    def close(self) -> None:
        """Stops the engine's scheduler thread (requests still running end "cancelled"); the
        parameters stay. `with grok1.load(...) as model:` closes at the end of the block."""
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        """The tokenizer (text prompts, text output, stop strings), or None."""
        return self.engine.tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.engine.tokenizer = value

    def logits(self, tokens, lengths=None) -> np.ndarray:
        """Full-sequence logits, float32 [B, T, V], of right-padded ids [B, T].

        `lengths[b]` is row b's real length (positions at or past it are padding and their logits
        unspecified); without it, a row ends after its last id that is not the pad id. The
        logits come from the engine's prefill chunks, so they equal what `score` reads.
        """
        toks = check_tokens(tokens, self.config)
        batch, t = toks.shape
        if lengths is None:
            real = toks > self.config.pad_token
            lengths = np.where(real.any(1), t - np.argmax(real[:, ::-1], axis=1), 0)
        else:
            lengths = np.asarray(lengths).reshape(-1)
            if lengths.shape[0] != batch:
                raise ValueError(f"{lengths.shape[0]} lengths given for {batch} rows")
            if (lengths < 0).any() or (lengths > t).any():
                raise ValueError(f"lengths must lie in [0, {t}], got {lengths}")
        engine = self.engine
        rows = engine._rows_for(batch)  # noqa: SLF001 - the engine's row padding rule
        cache = engine.new_cache(rows)
        slots = np.arange(rows, dtype=np.int32)
        slots[batch:] = rows  # padding rows: nowhere
        out = np.zeros((batch, t, self.config.vocab_size), np.float32)
        for start in range(0, t, engine.max_bucket):
            width = min(engine.max_bucket, t - start)
            m = bucket(width, engine.max_bucket)
            chunk = np.zeros((rows, m), np.int32)
            chunk[:batch, :width] = toks[:, start : start + width]
            n_new = np.zeros(rows, np.int32)
            n_new[:batch] = np.clip(lengths - start, 0, width)
            starts = np.full(rows, start, np.int32)
            logits, cache = engine.logits_chunk(cache, slots, starts, chunk, n_new)
            out[:, start : start + width] = to_host(logits)[:batch, :width]
        return out

    # -- generation ---------------------------------------------------------------------------
    def _requests(self, prompts, max_new_tokens, stop, stop_ids, ignore_eos, **sampling_kw):
        seed = sampling_kw.pop("seed", 0)
        if isinstance(seed, list | tuple) and len(seed) != len(prompts):
            raise ValueError(f"{len(seed)} seeds given for {len(prompts)} prompts")
        if isinstance(stop, str):
            stop = [stop]
        out = []
        for i, prompt in enumerate(prompts):
            ids = self._encode(prompt, f"prompts[{i}]")
            seed_i = seed[i] if isinstance(seed, list | tuple) else seed
            sp = SamplingParams(seed=seed_i, **sampling_kw)
            out.append(
                Request(
                    tuple(ids),
                    int(max_new_tokens),
                    sp,
                    tuple(int(t) for t in stop_ids or ()),
                    tuple(stop or ()),
                    ignore_eos,
                )
            )
        for request in out:
            self.engine.check(request)
        return out

    def _encode(self, prompt, what: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer: load(..., tokenizer=PATH) or pass token ids"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = _token_ids(prompt, self.config.vocab_size, what)
        if not ids:
            raise ValueError(f"{what}: empty prompt: give at least one token (or non-empty text)")
        return ids

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

        The prompts go to the model's engine, at most `max_batch` at a time (and at most its
        `max_slots` decode together); a seed gives the same tokens whatever the batch.
        With `return_results`, returns `grok1.requests.Result`s instead: tokens, their
        log-probabilities, the finish reason, the text and, when `logprobs=k`, the k most
        likely (id, log-probability) alternatives at every step."""
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and isinstance(prompts[0], int | np.integer)
        )
        if single:
            raise TypeError("generate takes a list of prompts; wrap a single prompt in a list")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
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
        results = run_all(self.engine, reqs, max_batch)
        if return_results:
            return results
        return [self._output(p, r) for p, r in zip(prompts, results, strict=True)]

    def stream(self, prompt, max_new_tokens: int = 32, **kw) -> Iterator:
        """Yields new token ids one by one (or text pieces, for a text prompt). Stopping the
        iteration early (or an interrupt) cancels the request."""
        ignore_eos = kw.pop("ignore_eos", False)
        stop, stop_ids = kw.pop("stop", None), kw.pop("stop_ids", None)
        (request,) = self._requests([prompt], max_new_tokens, stop, stop_ids, ignore_eos, **kw)
        text = isinstance(prompt, str)
        handle = self.engine.submit(request)
        try:
            for event in handle:
                if event.finish_reason == "error":
                    raise EngineDead("the engine failed") from handle.result().error
                if text:
                    if event.text:
                        yield event.text
                else:
                    yield from event.tokens
        finally:
            handle.cancel()

    def score(self, sequences) -> list[np.ndarray]:
        """Per-token log-probabilities log p(x_t | x_<t), t >= 1, of each id sequence."""
        reqs = []
        for i, seq in enumerate(sequences):
            ids = self._encode(seq, f"sequences[{i}]")
            if len(ids) < 2:
                raise ValueError(f"sequences[{i}]: a scored sequence needs at least 2 tokens")
            reqs.append(Request(tuple(ids), 0, prompt_logprobs=True))
        for request in reqs:
            self.engine.check(request)
        results = run_all(self.engine, reqs)
        return [np.asarray(r.prompt_logprobs, np.float32) for r in results]

    def _output(self, prompt, result):
        if not isinstance(prompt, str):
            return list(result.tokens)
        return result.text if result.text is not None else self.tokenizer.decode(result.tokens)

    def _data_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"]


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
    max_slots: int = 8,
    horizon: int = 8,
    max_queue: int = 256,
    compilation_cache=compile_cache.DEFAULT,
    cpu_kernels: bool | None = None,
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
      tokenizer: a `grok1.tokenizer.Tokenizer`, or a path to a SentencePiece model; by
        default the directory's own `tokenizer.model`, if it has one (the demo model does).
      mesh: a `jax.sharding.Mesh` or a dict of axis sizes such as {"data": 1, "model": 8};
        None keeps everything on the first device.
      expert_parallel: split the experts whole over the mesh's model axis (each device runs
        its own experts for every token; for throughput at large batches) instead of splitting
        every expert's hidden size over it (the default; lowest latency). Needs a mesh.
      max_bucket: largest prefill chunk (a power of two); longer prompts are prefilled in chunks.
      max_slots, horizon, max_queue: the engine's requests decoded together, decode steps between
        admissions, and requests that may wait (`grok1.engine.Engine`).
      compilation_cache: directory of JAX's persistent compilation cache (compiled programs are
        reused by the next process); default `$GROK1_COMPILATION_CACHE`, else
        `~/.cache/grok1/jax`; None or "" leaves JAX's setting alone.
      cpu_kernels: compute every product and row reduction in the native CPU kernels, so that a
        request's numbers depend on its own tokens only (`grok1.numerics`; on a mesh, each device
        runs them on its shards): None (default) wherever they can run (the CPU, a C++ compiler
        present), False never, True insists (an error where they cannot run).
      progress: True for a "GB done, GB/s, ETA" line on a terminal, or a callable taking the
        bytes of each finished read.
    """
    if moe_strategy not in STRATEGIES:
        raise ValueError(f"moe_strategy must be one of {STRATEGIES}, got {moe_strategy!r}")
    Numerics(dtype, rounding)  # checks both before any file is read
    config = directory.check(path, config)  # one-line errors naming the path, before any read
    compile_cache.enable(compilation_cache)
    if expert_parallel and mesh is None:
        raise ValueError("expert_parallel=True needs a mesh (e.g. mesh={'data': 1, 'model': 8})")
    if mesh is not None:
        mesh = sharding.make_mesh(mesh)
        sharding.check_mesh(config, mesh, expert_parallel)
    rules = sharding.EXPERT_PARALLEL_RULES if expert_parallel else sharding.RULES
    params, formats = loader.load_params(
        path, config, dtype=dtype, mesh=mesh, rules=rules, progress=progress or None
    )
    numerics = Numerics.choose(dtype, rounding, cpu_kernels, mesh=mesh)
    grok = Grok1(
        config, formats, numerics, moe_strategy=moe_strategy,
        expert_mesh=mesh if expert_parallel else None, mesh=mesh,
    )  # fmt: skip
    from grok1.tokenizer import TOKENIZER_FILE, Tokenizer

    if tokenizer is None and os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        tokenizer = os.path.join(path, TOKENIZER_FILE)
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer is not None:
        tokenizer.check_vocab(config.vocab_size)
    return Model(
        grok, params, mesh=mesh, path=path, tokenizer=tokenizer, max_bucket=max_bucket,
        max_slots=max_slots, horizon=horizon, max_queue=max_queue,
    )  # fmt: skip
