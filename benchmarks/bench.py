"""Inference benchmark: compile time, prefill and decode speed, and memory-bandwidth utilisation.

    python benchmarks/bench.py --config bench-cpu --batch 1 8 --json out.json
    python benchmarks/bench.py --config bench-cpu --layers 2 8 32      # compile time vs depth

For a named config (`ModelConfig.preset`: bench-cpu, tiny, grok1) with random int8 weights
(release formats: 8 scale groups on `linear` and `down`), on the default JAX device, it measures
per batch size:

  * first compile: seconds to compile the engine's prefill chunk and its decode loop;
  * prefill tokens/s: `--prompt`-token prompts (one per row) through the engine's prefill chunk,
    best of `--repeats`;
  * decode tokens/s: `--steps` decode steps inside the engine's jitted while loop (one call, all
    rows active, greedy), best of `--repeats`, compile excluded; tokens = batch × steps;
  * weight bytes per decode step: what one step must read at least: int8 attention matrices and
    their scales, router, norms, the embedding table as the model uses it (bf16(E) in bf16 mode;
    the tied unembedding reads all of it) and the int8 experts actually touched, counted per
    layer and step from the router's decisions (recorded in a separate, untimed run of the same
    steps; their mean is reported);
  * memory bandwidth, measured in the same run (`measure_bandwidth`): on the CPU the best of
    reductions and copies of a 1 GiB array (NumPy and jitted JAX; a copy counts read + write), on
    an accelerator the best of jitted reductions and copies of 4 GiB in its own memory;
  * MBU = bytes/step × steps/s ÷ bandwidth.

`--layers` compiles the same config at several depths (the layer stack is a scan, so compile time
should barely grow). `--num-layers N` benchmarks the config at depth N; `--fit F` picks the depth
whose weights fill a fraction F of the accelerator's memory, to size a full-width config to one
card:

    python benchmarks/bench.py --config grok1 --fit 0.6 --batch 1 8 --steps 64

Prints a table and writes everything to `--json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grok1 import moe, sampling  # noqa: E402
from grok1.config import ModelConfig  # noqa: E402
from grok1.engine import Engine, Request  # noqa: E402
from grok1.model import ATTN_MATRICES, MOE, ROUNDINGS, Grok1, WeightFormats, param_table  # noqa: E402
from grok1.plan import abstract_table  # noqa: E402

GiB = 1 << 30


# -- bandwidth ----------------------------------------------------------------------------------
def measure_bandwidth(nbytes: int = GiB, repeats: int = 5) -> dict:
    """Best-of-`repeats` bytes/s of the memory that holds the weights.

    On the CPU: the best of a NumPy sum (read), a NumPy copy (read + write) and a jitted JAX sum.
    On an accelerator the weights live in its memory, so only jitted JAX reductions and copies
    there count (over 4 × `nbytes`, so that launching the program is a small part of the time).
    """
    out = {}

    def best(fn, moved):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return moved / min(times)

    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu:
        a = np.ones(nbytes // 4, np.float32)
        b = np.empty_like(a)
        out["numpy_sum"] = best(functools.partial(np.sum, a), a.nbytes)
        out["numpy_copy"] = best(functools.partial(np.copyto, b, a), 2 * a.nbytes)
        del a, b
    x = jnp.ones((nbytes if on_cpu else 4 * nbytes) // 4, jnp.float32)
    for name, fn, moved in (
        ("jax_sum", jax.jit(jnp.sum), x.nbytes),
        ("jax_copy", jax.jit(lambda v: v * 2), 2 * x.nbytes),  # read + write
    ):
        jax.block_until_ready(fn(x))
        out[name] = best(lambda fn=fn: jax.block_until_ready(fn(x)), moved)
    out["best"] = max(out.values())
    return out


# -- bytes a decode step reads ----------------------------------------------------------------
def leaf_bytes(entry, dtype=None) -> int:
    """Bytes of a `param_table` entry (shape, dtype, axes), in its own dtype or `dtype`."""
    shape, own, _ = entry
    return int(np.prod(shape)) * np.dtype(dtype or own).itemsize


def weight_bytes(
    config: ModelConfig, formats: WeightFormats, experts_per_layer: float, dtype: str
) -> dict:
    """Bytes of weights a decode step reads, `experts_per_layer` distinct experts per layer.

    The embedding table counts as the model uses it, in the activation dtype: the release's
    float32 table enters the computation only as bf16(E) in bf16 mode (SPEC.md §2), which the
    decode loop converts once per call.
    """
    table = param_table(config, formats)
    size = lambda key, dtype=None: leaf_bytes(table[key], dtype)  # noqa: E731
    parts = {"embedding": 0, "attention": 0, "router_norms": 0, "experts_all": 0}
    for key in table:
        module, _ = key
        if module.startswith(MOE + "/"):
            parts["experts_all"] += size(key)
        elif any(module.endswith("/" + m) for m in ATTN_MATRICES):
            parts["attention"] += size(key)
        elif module == "grok1/embed":
            parts["embedding"] += size(key, dtype)
        else:
            parts["router_norms"] += size(key)
    parts["experts_touched"] = int(parts["experts_all"] * experts_per_layer / config.num_experts)
    parts["total"] = (
        parts["embedding"] + parts["attention"] + parts["router_norms"] + parts["experts_touched"]
    )
    return parts


def count_touched_experts(grok, params, prompts, steps, max_bucket, context=None) -> dict:
    """Mean / min / max distinct experts per (layer, decode step) from the router's decisions.

    Runs the same prefill + decode as the timed run in a separate engine whose router reports
    every decision through a host callback (so the timed program is untouched).
    """
    records = []
    original = moe.route

    def recording_route(z, router_w, k):
        gates, idx = original(z, router_w, k)
        jax.debug.callback(lambda i: records.append(np.asarray(i)), idx, ordered=True)
        return gates, idx

    moe.route = recording_route
    try:
        cache_len = context or grok.config.sequence_len
        engine = Engine(grok, params, max_bucket=max_bucket, cache_len=cache_len)
        cache, state, sp = _start(engine, prompts, steps)
        records.clear()  # prefill's decisions are not decode steps
        cache, state = engine._decode(
            params, cache, state, sp, kv_len=_kv_len(engine, prompts, steps), n_steps=steps,
            until_first_stop=False, table=engine.table,
        )  # fmt: skip
        jax.block_until_ready(state)
    finally:
        moe.route = original
    distinct = np.array([len(np.unique(r)) for r in records])
    return {
        "mean": float(distinct.mean()),
        "min": int(distinct.min()),
        "max": int(distinct.max()),
        "decisions": len(records),
    }


def layers_to_fit(config: ModelConfig, fraction: float, device) -> int:
    """The most layers whose weights (release formats) fill at most `fraction` of `device`'s
    memory: sizes a full-width config to one accelerator."""
    from grok1.plan import device_memory_limit

    limit = device_memory_limit(device)
    if limit is None:
        raise SystemExit(f"--fit: {device.device_kind} reports no memory limit (use --num-layers)")

    def weights(n):
        c = ModelConfig(**{**config.to_dict(), "num_layers": n})
        return sum(map(leaf_bytes, param_table(c, WeightFormats.release(c)).values()))

    one, two = weights(1), weights(2)
    per_layer = two - one
    n = int((fraction * limit - (one - per_layer)) // per_layer)
    if n < 1:
        raise SystemExit(f"--fit {fraction}: not even one layer fits in {limit / 1e9:.1f} GB")
    return n


# -- timing -------------------------------------------------------------------------------------
def _kv_len(engine, prompts, steps):
    from grok1.engine import bucket

    return bucket(max(len(p) for p in prompts) + steps + 1, engine.capacity)


def _start(engine: Engine, prompts, steps):
    """Prefill + the first sampled token, ready for `steps` decode steps (all rows active)."""
    cache = engine.new_cache(len(prompts))
    logits, cache = engine.prefill(cache, prompts)
    greedy = sampling.SamplingParams(temperature=0.0)
    sp = sampling.BatchSamplingParams.stack([greedy] * len(prompts))
    state = engine._empty_state(len(prompts), steps + 1, 1, False)
    for slot, p in enumerate(prompts):
        r = Request(tuple(p), max_new_tokens=steps + 1, sampling=greedy, ignore_eos=True)
        state = engine._admit(state, slot, r, 1)
    state, _ = engine._accept_jit(logits, state, sp)
    return cache, state, sp


def random_prompts(config, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, config.vocab_size, length).tolist() for _ in range(batch)]


def bench_batch(grok, params, batch, prompt_len, steps, repeats, max_bucket, context=None) -> dict:
    config = grok.config
    engine = Engine(grok, params, max_bucket=max_bucket, cache_len=context or config.sequence_len)
    prompts = random_prompts(config, batch, prompt_len)
    kv_len = _kv_len(engine, prompts, steps)
    r = {"batch": batch, "prompt": prompt_len, "steps": steps, "kv_len": kv_len}

    # first compile: the prefill chunk and the decode loop, through the engine's own jits
    cache = engine.new_cache(batch)
    m = min(max_bucket, 1 << (prompt_len - 1).bit_length())
    toks = jnp.zeros((batch, m), jnp.int32)
    n_new = jnp.full((batch,), prompt_len, jnp.int32)
    table = jax.block_until_ready(engine.table)  # the engine converts the table once, untimed
    t0 = time.perf_counter()
    engine._chunk.lower(params, cache, toks, n_new, kv_len=m, table=table).compile()
    r["compile_prefill_s"] = time.perf_counter() - t0
    cache, state, sp = _start(engine, prompts, steps)
    t0 = time.perf_counter()
    decode = engine._decode.lower(
        params, cache, state, sp, kv_len=kv_len, n_steps=steps, until_first_stop=False,
        table=table,
    ).compile()  # fmt: skip
    r["compile_decode_s"] = time.perf_counter() - t0
    r["first_compile_s"] = r["compile_prefill_s"] + r["compile_decode_s"]

    # prefill tokens/s (compiled already by _start)
    times = []
    for _ in range(repeats):
        cache = engine.new_cache(batch)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        logits, cache = engine.prefill(cache, prompts)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    r["prefill_tok_s"] = batch * prompt_len / min(times)

    # decode tokens/s: one call of the while loop running `steps` steps
    times = []
    for _ in range(repeats):
        cache, state, sp = _start(engine, prompts, steps)
        jax.block_until_ready((cache, state))
        t0 = time.perf_counter()
        cache, state = decode(params, cache, state, sp, table=table)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        assert int(np.asarray(state.steps).min()) == steps + 1, "not every row decoded every step"
    r["decode_steps_s"] = steps / min(times)
    r["decode_tok_s"] = batch * r["decode_steps_s"]
    r["decode_ms_per_step"] = 1e3 * min(times) / steps
    return r


def compile_vs_depth(config, depths, batch, max_bucket) -> list:
    rows = []
    for n in depths:
        c = ModelConfig(**{**config.to_dict(), "num_layers": n})
        grok = Grok1(c, WeightFormats.release(c))
        params = grok.param_shapes()
        engine = Engine(grok, params, max_bucket=max_bucket, cache_len=c.sequence_len)
        cache = jax.eval_shape(functools.partial(engine.new_cache, batch))
        state = jax.eval_shape(functools.partial(engine._empty_state, batch, 64, 1, False))
        sp = sampling.BatchSamplingParams.stack([sampling.SamplingParams()] * batch)
        table = abstract_table(grok, params)  # what Engine.table holds
        t0 = time.perf_counter()
        engine._decode.lower(
            params, cache, state, sp, kv_len=c.sequence_len, n_steps=64, until_first_stop=False,
            table=table,
        ).compile()  # fmt: skip
        t_dec = time.perf_counter() - t0
        m = min(128, c.sequence_len)  # a prefill chunk, within the cache
        toks = jax.ShapeDtypeStruct((batch, m), jnp.int32)
        n_new = jax.ShapeDtypeStruct((batch,), jnp.int32)
        t0 = time.perf_counter()
        engine._chunk.lower(params, cache, toks, n_new, kv_len=m, table=table).compile()
        t_pre = time.perf_counter() - t0
        rows.append({"layers": n, "compile_decode_s": t_dec, "compile_prefill_s": t_pre})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="grok1 inference benchmark")
    ap.add_argument("--config", default="bench-cpu", choices=ModelConfig.PRESETS)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="compile-time vs depth")
    ap.add_argument("--num-layers", type=int, default=None, help="the config's depth, overridden")
    ap.add_argument(
        "--fit", type=float, default=None, metavar="FRACTION",
        help="as many layers as fill FRACTION of the device's memory with weights",
    )  # fmt: skip
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=256, help="decode steps timed per call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-bucket", type=int, default=128)
    ap.add_argument(
        "--context", type=int, default=None,
        help="KV-cache slots (default: the config's sequence length; each step attends only "
        "the filled ones, rounded up to a power of two)",
    )  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--moe", default="auto", choices=moe.STRATEGIES, help="MoE strategy")
    ap.add_argument("--rounding", default="release", choices=ROUNDINGS,
                    help="see grok1.model.Grok1 (fast: int8 weights unrounded)")  # fmt: skip
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.context is not None and args.context < args.prompt + args.steps + 1:
        ap.error(f"--context {args.context} cannot hold --prompt + --steps + 1 tokens")
    config = ModelConfig.preset(args.config)
    if args.fit is not None:
        args.num_layers = layers_to_fit(config, args.fit, jax.devices()[0])
    if args.num_layers is not None:
        config = ModelConfig(**{**config.to_dict(), "num_layers": args.num_layers})
    report = {
        "config_name": args.config,
        "config": config.to_dict(),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "host": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "moe_strategy": args.moe,
        "rounding": args.rounding,
        "context": args.context or config.sequence_len,
    }
    if args.layers:
        report["compile_vs_depth"] = compile_vs_depth(config, args.layers, 1, args.max_bucket)
        print(f"{'layers':>6} {'decode compile s':>17} {'prefill compile s':>18}")
        for row in report["compile_vs_depth"]:
            print(
                f"{row['layers']:>6} {row['compile_decode_s']:>17.2f} "
                f"{row['compile_prefill_s']:>18.2f}"
            )
    else:
        grok = Grok1(config, WeightFormats.release(config), dtype=args.dtype,
                     moe_strategy=args.moe, rounding=args.rounding)  # fmt: skip
        params = jax.jit(grok.init)(jax.random.PRNGKey(args.seed))
        jax.block_until_ready(params)
        bw = measure_bandwidth()
        report["bandwidth"] = bw
        rows = []
        for batch in args.batch:
            r = bench_batch(grok, params, batch, args.prompt, args.steps, args.repeats,
                            args.max_bucket, args.context)  # fmt: skip
            prompts = random_prompts(config, batch, args.prompt)
            r["experts_touched"] = count_touched_experts(
                grok, params, prompts, args.steps, args.max_bucket, args.context
            )
            r["bytes"] = weight_bytes(
                config, grok.formats, r["experts_touched"]["mean"], args.dtype
            )
            r["bytes_per_step"] = r["bytes"]["total"]
            r["achieved_bytes_s"] = r["bytes_per_step"] * r["decode_steps_s"]
            r["mbu"] = r["achieved_bytes_s"] / bw["best"]
            rows.append(r)
        report["results"] = rows
        parts = ", ".join(
            f"{k.replace('_', ' ')} {v / 1e9:.1f}" for k, v in bw.items() if k != "best"
        )
        print(
            f"{args.config}, {config.num_layers} layers, rounding {args.rounding}; "
            f"device {report['device']} ({report['cpus']} cpus); "
            f"bandwidth {bw['best'] / 1e9:.1f} GB/s ({parts})"
        )
        head = (
            f"{'batch':>5} {'compile s':>9} {'prefill tok/s':>13} {'decode tok/s':>12} "
            f"{'ms/step':>8} {'experts/layer':>13} {'MB/step':>8} {'GB/s':>6} {'MBU':>6}"
        )
        print(head)
        for r in rows:
            print(
                f"{r['batch']:>5} {r['first_compile_s']:>9.1f} {r['prefill_tok_s']:>13.0f} "
                f"{r['decode_tok_s']:>12.1f} {r['decode_ms_per_step']:>8.2f} "
                f"{r['experts_touched']['mean']:>13.2f} {r['bytes_per_step'] / 1e6:>8.1f} "
                f"{r['achieved_bytes_s'] / 1e9:>6.1f} {100 * r['mbu']:>5.1f}%"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
