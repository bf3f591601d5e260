"""Trains the demo model shipped in `grok1/demo/`, reproducibly, on CPU.

    python scripts/train_demo.py                            # rebuilds grok1/demo/
    python scripts/train_demo.py --out /tmp/demo --steps 50  # a quick try elsewhere

Steps, all seeded:
1. Corpus: CPython's pydoc help topics, split by `grok1.demo.split_corpus` (every 10th topic held
   out). The shipped model was made with CPython 3.11.7; other versions' topics differ a little.
2. Tokenizer: SentencePiece BPE, 2048 pieces, trained on the training paragraphs only, with the
   release's special ids ([PAD] 0, [BOS] 1, [EOS] 2, [UNK] 3), byte fallback and a "\\n" piece.
3. Model: a 4-layer Grok-1 (`demo_config`), float32 weights and activations, trained with a
   hand-written AdamW on next-token prediction over random windows of the training stream.
4. Export: every matrix quantised to int8 with absmax scales per output column and scale group
   (8 groups on attention `linear` and MoE `down`, as the release), written in the release format
   with `save_params`, then evaluated through `grok1.load` (bf16 numerics, as the release) into
   `metrics.json`: held-out loss against a unigram baseline and a greedy continuation of
   `grok1.demo.PROMPT`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import platform
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import sentencepiece

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grok1  # noqa: E402
from grok1 import demo, layers, model, moe  # noqa: E402
from grok1.api import causal_mask  # noqa: E402
from grok1.checkpoint import loader  # noqa: E402
from grok1.config import ModelConfig  # noqa: E402
from grok1.tokenizer import TOKENIZER_FILE, Tokenizer  # noqa: E402

SEED = 0
VOCAB_SIZE = 2048
WINDOW = 256  # training and evaluation window (= sequence_len)
GREEDY_TOKENS = 24
SUBSET_TOKENS = 2048  # the held-out prefix the tests re-evaluate
RELEASE_GROUPS = {"linear": 8, "down": 8}  # scale groups per matrix; 1 for the others
BLOCK = 128  # rows per expert block in `experts_blocked`


def demo_config() -> ModelConfig:
    """E 8 top-2, D 128, 4 layers, 8 query / 2 KV heads of 16, F 256: ~3.3 M weights."""
    return ModelConfig.scaled(
        vocab_size=VOCAB_SIZE, emb_size=128, num_layers=4, num_q_heads=8, num_kv_heads=2,
        key_size=16, widening_factor=3.0, sequence_len=WINDOW,
    )  # fmt: skip


@functools.lru_cache
def float_formats() -> model.WeightFormats:
    return model.WeightFormats(**{name: layers.MatrixFormat(None) for name in model.MATRICES})


# ---------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], path: str) -> Tokenizer:
    """A BPE SentencePiece model of the texts, written to `path`. Deterministic: no sampling of
    the input, one thread, no text normalisation (so code indentation and newlines survive)."""
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, model_type="bpe",
        vocab_size=VOCAB_SIZE, byte_fallback=True, character_coverage=1.0, split_digits=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
        user_defined_symbols=["\n"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return Tokenizer.load(path)


# ---------------------------------------------------------------------------------------------
# Training: float32 Grok-1, hand-written AdamW.
# ---------------------------------------------------------------------------------------------
def next_token_loss(grok: model.Grok1, params, batch):
    """Mean next-token cross-entropy (nats) of windows `batch` [B, W+1] (no padding)."""
    x, y = batch[:, :-1], batch[:, 1:]
    b, t = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    logits, _ = grok.apply(params, x, positions, mask)  # [B, W, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, y[..., None], axis=-1).mean()


# ---------------------------------------------------------------------------------------------
# A faster MoE dispatch for the training step (same function as the library's).
# ---------------------------------------------------------------------------------------------
def experts_blocked(z, idx, gate_p, up_p, down_p, dtype, round_down: bool):
    """`grok1.moe.experts_grouped`'s contract and result, about 3x cheaper to differentiate on CPU.

    There `lax.ragged_dot` costs as much as passing every (token, slot) pair through every expert.
    Here the N·k pairs are sorted by expert and each expert's rows padded to whole blocks of BLOCK
    rows (at most N·k + E·BLOCK rows in all), and one batched matmul multiplies each block by its
    own expert's weights. z: [N, D]; idx: [N, k]; *_p: matrix leaves with a leading [E] axis.
    Returns [N, k, D] float32.
    """
    n, k = idx.shape
    e = gate_p["w"].shape[0]
    flat = idx.reshape(-1)  # [N·k]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e)  # [E]
    padded = -(-sizes // BLOCK) * BLOCK
    ends = jnp.cumsum(padded)
    expert = flat[order]  # [N·k], sorted
    rank = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[expert]
    dest = ends[expert] - padded[expert] + rank  # row of each sorted pair in the blocks
    blocks = -(-n * k // BLOCK) + e
    rows = jnp.zeros((blocks * BLOCK, z.shape[1]), z.dtype).at[dest].set(z[order // k])
    block_expert = jnp.searchsorted(ends, jnp.arange(blocks) * BLOCK, side="right")
    block_expert = jnp.minimum(block_expert, e - 1)  # trailing all-zero blocks: any expert

    def bdot(x, w, out_dtype):  # x: [blocks·BLOCK, In]; w: [E, In, Out]
        y = layers.dot("bri,bio->bro", x.reshape(blocks, BLOCK, -1), w[block_expert], out_dtype)
        return y.reshape(blocks * BLOCK, -1)

    g = bdot(rows, layers.matrix(gate_p, dtype), dtype)
    u = bdot(rows, layers.matrix(up_p, dtype), dtype)
    w_down = layers.matrix(down_p, jnp.float32, rounded=round_down)
    o = bdot(moe.expert_hidden(u, g), w_down, jnp.float32)
    out = jnp.zeros((n * k, o.shape[1]), jnp.float32).at[order].set(o[dest])
    return out.reshape(n, k, -1)


@contextlib.contextmanager
def blocked_moe():
    """While active, functions traced with the "grouped" MoE strategy use `experts_blocked`."""
    if not callable(getattr(moe, "experts_grouped", None)):
        raise RuntimeError("grok1.moe.experts_grouped is gone: update train_demo.blocked_moe")
    saved, moe.experts_grouped = moe.experts_grouped, experts_blocked
    try:
        yield
    finally:
        moe.experts_grouped = saved


def decays(path) -> bool:
    """Weight decay on matrices and the embedding; not on norm scales or the router."""
    return path[-1].key in ("w", "embeddings")


def adamw_init(params) -> dict:
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return {"m": zeros(), "v": zeros(), "t": jnp.zeros((), jnp.int32)}


def adamw_update(params, grads, state, lr, *, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0):
    """One AdamW step (decoupled weight decay) after clipping the global gradient norm."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-6)), grads)
    t = state["t"] + 1
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    c1, c2 = 1 - b1**t, 1 - b2**t

    def update(path, p, m, v):
        step = (m / c1) / (jnp.sqrt(v / c2) + eps)
        if decays(path):
            step = step + wd * p
        return p - lr * step

    params = jax.tree_util.tree_map_with_path(update, params, m, v)
    return params, {"m": m, "v": v, "t": t}, norm


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def float32_logits(config):
    """(params, ids [B, W], lengths [B]) -> float32 logits of the float32 library model."""
    grok = model.Grok1(config, float_formats(), model.Numerics("float32"))

    @jax.jit
    def fn(params, ids, lengths):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        return grok.apply(params, ids, positions, causal_mask(valid))[0]

    return fn


def train(config, stream: np.ndarray, args, heldout=None, log=print) -> tuple[dict, dict]:
    grok = model.Grok1(config, float_formats(), model.Numerics("float32"), moe_strategy="grouped")
    eval_fn = float32_logits(config)
    start, cpu_start = time.perf_counter(), time.process_time()  # compiles included
    params = grok.init(jax.random.PRNGKey(args.seed))
    opt = adamw_init(params)
    loss_fn = functools.partial(next_token_loss, grok)

    def step(params, opt, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params, opt, norm = adamw_update(params, grads, opt, lr)
        return params, opt, loss, norm

    rng = np.random.default_rng(args.seed)
    offsets = np.arange(WINDOW + 1)
    # The step is compiled with the blocked MoE dispatch, after checking that the library's
    # forward gives the same logits with it as without it.
    check = (stream[: 2 * WINDOW].reshape(2, WINDOW), np.array([WINDOW, WINDOW // 3]))
    reference = np.asarray(eval_fn(params, *check))
    with blocked_moe():
        fast = np.asarray(float32_logits(config)(params, *check))
        example = (jnp.zeros((args.batch, WINDOW + 1), jnp.int32), jnp.float32(0))
        step_fn = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, *example).compile()
    if not np.allclose(fast, reference, rtol=0, atol=1e-4):
        raise AssertionError(f"blocked MoE differs: {np.abs(fast - reference).max()}")
    losses = []
    for step in range(args.steps):
        starts = rng.integers(0, len(stream) - WINDOW, size=args.batch)
        batch = jnp.asarray(stream[starts[:, None] + offsets])
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        params, opt, loss, norm = step_fn(params, opt, batch, jnp.float32(lr))
        losses.append(float(loss))
        if heldout is not None and args.eval_every and (step + 1) % args.eval_every == 0:
            lp = target_logprobs(functools.partial(eval_fn, params), heldout)
            log(f"step {step:4d}  held-out loss {-lp.mean():.3f}")
        if step % 25 == 0 or step == args.steps - 1:
            log(
                f"step {step:4d}  loss {np.mean(losses[-25:]):.3f}  |g| {float(norm):.2f}  "
                f"lr {lr:.2e}  {time.perf_counter() - start:6.0f} s"
            )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stats = {
        "steps": args.steps, "batch": args.batch, "window": WINDOW,
        "tokens_seen": args.steps * args.batch * WINDOW, "peak_lr": args.lr,
        "warmup_steps": args.warmup, "weight_decay": 0.1, "adam_betas": [0.9, 0.95],
        "grad_clip": 1.0, "final_train_loss": float(np.mean(losses[-25:])),
        "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
    }  # fmt: skip
    return jax.device_get(params), stats


# ---------------------------------------------------------------------------------------------
# Export: int8 with grouped absmax scales.
# ---------------------------------------------------------------------------------------------
def quantize(w: np.ndarray, groups: int) -> dict:
    """{"w": int8, "scales": bf16 [..., groups, Out]} with `w ~ bf16(q * scales)`: each group of
    rows of each output column gets the scale absmax / 127 (rounded to bf16)."""
    *lead, n_in, n_out = w.shape
    grouped = w.reshape(*lead, groups, n_in // groups, n_out)
    absmax = np.abs(grouped).max(axis=-2, keepdims=True)
    scales = (np.maximum(absmax, 1e-12) / 127).astype(ml_dtypes.bfloat16)
    q = np.clip(np.round(grouped / scales.astype(np.float32)), -127, 127).astype(np.int8)
    return {"w": q.reshape(w.shape), "scales": np.squeeze(scales, axis=-2)}


def quantize_params(params: dict) -> dict:
    out = {module: dict(leaves) for module, leaves in params.items()}
    for name in model.MATRICES:
        module = model.matrix_module(name)
        w = np.asarray(params[module]["w"], np.float32)
        out[module] = quantize(w, RELEASE_GROUPS.get(name, 1))
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation through the public API.
# ---------------------------------------------------------------------------------------------
def windows(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive WINDOW-long pieces of `stream`, right-padded with 0: (ids [N, W], lengths)."""
    n = -(-len(stream) // WINDOW)
    ids = np.zeros((n, WINDOW), np.int32)
    ids.reshape(-1)[: len(stream)] = stream
    lengths = np.minimum(WINDOW, len(stream) - WINDOW * np.arange(n))
    return ids, lengths


def target_logprobs(logits_fn, stream: np.ndarray, batch: int = 8) -> np.ndarray:
    """log p(token | earlier tokens of its window) for every token but each window's first."""
    ids, lengths = windows(stream)
    out = []
    for i in range(0, len(ids), batch):
        x, n = ids[i : i + batch], lengths[i : i + batch]
        logits = np.asarray(logits_fn(x, n), np.float32)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
        out += [picked[j, : n[j] - 1] for j in range(len(x))]
    return np.concatenate(out)


def unigram_logprobs(train_stream: np.ndarray, stream: np.ndarray, vocab: int) -> np.ndarray:
    """The same targets as `target_logprobs` under add-one-smoothed training frequencies."""
    counts = np.bincount(train_stream, minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    ids, lengths = windows(stream)
    return np.concatenate([logp[ids[j, 1 : lengths[j]]] for j in range(len(ids))])


def greedy(model_: grok1.Model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by repeated full forwards (argmax at the last real position). The buffer
    has a fixed length (the rest right-padded, given `lengths`) so that one compile serves all."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    for length in range(len(prompt), len(prompt) + n):
        logits = model_.logits(buf, lengths=[length])
        buf[0, length] = int(np.argmax(logits[0, length - 1]))
    return buf[0, len(prompt) :].tolist()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=demo.DEMO_DIR, help="output directory (default: grok1/demo)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--eval-every", type=int, default=0, help="print held-out loss every N steps")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    corpus = demo.topics()
    train_texts, heldout_texts = demo.split_corpus(corpus)
    tokenizer = train_tokenizer(train_texts, os.path.join(args.out, TOKENIZER_FILE))
    train_stream = demo.token_stream(tokenizer, train_texts)
    heldout_stream = demo.token_stream(tokenizer, heldout_texts)
    print(
        f"corpus: {len(train_texts)} training paragraphs ({len(train_stream)} tokens), "
        f"{len(heldout_texts)} held-out ({len(heldout_stream)} tokens)"
    )

    config = demo_config()
    assert config.emb_size % 8 == 0 and config.ffn_size % 8 == 0, "8 scale groups must divide"
    params, train_stats = train(config, train_stream, args, heldout_stream[:SUBSET_TOKENS])

    f32_logits = float32_logits(config)  # the float32 model, before quantisation
    f32_lp = target_logprobs(functools.partial(f32_logits, params), heldout_stream)

    ckpt = os.path.join(args.out, "ckpt-0")
    if os.path.isdir(ckpt):
        shutil.rmtree(ckpt)
    loader.save_params(args.out, config, quantize_params(params))
    demo_model = grok1.load(args.out, tokenizer=os.path.join(args.out, TOKENIZER_FILE))
    lp = target_logprobs(demo_model.logits, heldout_stream)
    uni = unigram_logprobs(train_stream, heldout_stream, config.vocab_size)
    sub_lp = target_logprobs(demo_model.logits, heldout_stream[:SUBSET_TOKENS])
    sub_uni = unigram_logprobs(train_stream, heldout_stream[:SUBSET_TOKENS], config.vocab_size)
    prompt = tokenizer.encode(demo.PROMPT)
    ids = greedy(demo_model, prompt, GREEDY_TOKENS)

    metrics = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "corpus": "pydoc_data.topics",
        "corpus_sha256": demo.corpus_digest(corpus),
        "train_paragraphs": len(train_texts),
        "train_tokens": int(len(train_stream)),
        "train_chars": sum(len(t) for t in train_texts),
        "heldout_paragraphs": len(heldout_texts),
        "heldout_tokens": int(len(heldout_stream)),
        "heldout_predictions": int(len(lp)),
        **train_stats,
        "heldout_loss": float(-lp.mean()),
        "heldout_loss_float32": float(-f32_lp.mean()),
        "unigram_heldout_loss": float(-uni.mean()),
        "heldout_subset": {
            "tokens": int(min(SUBSET_TOKENS, len(heldout_stream))),
            "loss": float(-sub_lp.mean()),
            "unigram_loss": float(-sub_uni.mean()),
        },
        "greedy": {
            "prompt": demo.PROMPT,
            "prompt_ids": prompt,
            "ids": ids,
            "text": tokenizer.decode(ids),
        },
        "checkpoint_bytes": dir_bytes(ckpt),
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python scripts/train_demo.py", *(argv or sys.argv[1:])]),
    }
    with open(os.path.join(args.out, demo.METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=1)
        f.write("\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "greedy"}, indent=1))
    print(f"greedy: {demo.PROMPT!r} -> {metrics['greedy']['text']!r}")


if __name__ == "__main__":
    main()
