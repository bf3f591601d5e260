"""Inference benchmark: compile time, prefill and decode speed, and memory-bandwidth utilisation.

    python benchmarks/bench.py --config bench-cpu-mem --batch 1 8 --json out.json
    python benchmarks/bench.py --config bench-cpu --batch 1 8          # the small config
    python benchmarks/bench.py --config bench-cpu --layers 2 8 32      # compile time vs depth

Configs: the `ModelConfig` presets (bench-cpu, tiny, grok1) and `bench-cpu-mem`: bench-cpu's width
with the fewest layers (at least bench-cpu's 8) whose weights are `--llc-multiple` (4) times the
last-level cache this machine's OS reports, so that decoding streams its weights from memory.
bench-cpu is the small config: cache-resident on a CPU whose last-level cache holds its weights
(the output says which case each run is, from the machine's cache sizes). Random int8 weights in
the release formats (8 scale groups on `linear` and `down`), on the default JAX device. Per batch
size it measures:

  * first compile: the first call of the prefill chunk and of the decode loop, each less its
    median later call (so mostly compile time; `--layers` times compilation alone);
  * prefill tokens/s: one `--prompt`-token prompt per row through one prefill chunk;
  * decode tokens/s: `--steps` decode steps inside the engine's jitted loop, all rows active,
    compile excluded; tokens = batch x steps. The tokens are sampled at temperature 1 from the
    random model (`--decode-tokens sampled`, the default), so that, as with real text, each step
    routes to other experts than the last; `greedy` repeats one token for every step, each layer
    then re-reads the same few experts from the cache;
  * bytes per decode step, what one step must read at least: int8 attention matrices and scales,
    router, norms, the embedding table as the model uses it (bf16(E) in bf16 mode; the tied
    unembedding reads all of it), the int8 experts the step's router chose (distinct experts per
    layer and step, recorded from the router's decisions in a separate untimed run of the same
    steps) and the KV cache's filled slots (mean over the steps);
  * memory bandwidth (`BandwidthProbe`): on the CPU, reads of a read-only buffer the size of the
    weights (written once before any timing, so no page fault is timed) by as many threads as
    XLA:CPU runs, one sample before each decode repeat (bandwidth, decode, bandwidth, decode,
    ...); on an accelerator, jitted reductions and copies of 4 GiB in its own memory;
  * MBU = bytes/step x steps/s / bandwidth, from the medians of the run (and per repeat, each
    decode against the bandwidth sample just before it, for the spread).

Every timed figure is given as min / median / max over `--repeats`. The CPU model, its vector
instruction sets, the ISA the native kernels were built for, its caches and XLA's thread count
are printed and recorded in the JSON.

`--layers` compiles the same config at several depths (the layer stack is a scan, so compile time
should barely grow). `--num-layers N` benchmarks the config at depth N; `--fit F` picks the depth
whose weights fill a fraction F of the accelerator's memory, to size a full-width config to one
card:

    python benchmarks/bench.py --config grok1 --fit 0.6 --batch 1 8 --steps 64

`benchmarks/llama_cpp_bench.py` runs the same measurement alternating with llama.cpp.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import glob
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grok1 import kernels, moe, sampling, sharding  # noqa: E402
from grok1.config import ModelConfig  # noqa: E402
from grok1.engine import Engine, bucket  # noqa: E402
from grok1.model import ATTN_MATRICES, MOE, ROUNDINGS, Grok1, WeightFormats, param_table  # noqa: E402
from grok1.numerics import Numerics  # noqa: E402
from grok1.plan import abstract_params, abstract_table  # noqa: E402
from grok1.steps import DecodeState  # noqa: E402

GiB = 1 << 30
MEM_CONFIG = "bench-cpu-mem"  # bench-cpu's width, as deep as the machine's cache requires
CONFIGS = (*ModelConfig.PRESETS, MEM_CONFIG)


# -- the engine: bench.py calls it only in these four functions -----------------------------
def prefill_chunk(engine: Engine, cache, tokens, n_new):
    """Appends tokens [B, M] (the first n_new [B] of each row real) to the empty rows of `cache`
    (from `engine.new_cache(B)`): (logits [B, V] at each row's last token, cache)."""
    batch = tokens.shape[0]
    rows, starts = np.arange(batch, dtype=np.int32), np.zeros(batch, np.int32)
    return engine.prefill_chunk(cache, rows, starts, tokens, n_new)


def decode_start(engine: Engine, prompts, steps: int, temperature: float, seed: int):
    """Prefills `prompts` (one per row) and samples each row's first token: (cache, state,
    sampling params) ready for `steps` decode steps with every row active (no stop ids). Row b
    samples at `temperature` (0: greedy) with seed `seed + b`."""
    batch, vocab = len(prompts), engine.config.vocab_size
    sp = sampling.BatchSamplingParams.stack(
        [sampling.SamplingParams(temperature=temperature, seed=seed + b) for b in range(batch)]
    )
    prompts = np.array(prompts, np.int32)
    tokens = np.zeros((batch, bucket(prompts.shape[1], engine.max_bucket)), np.int32)
    tokens[:, : prompts.shape[1]] = prompts
    cache = engine.new_cache(batch)
    logits, cache = prefill_chunk(engine, cache, tokens, np.full(batch, prompts.shape[1], np.int32))
    seen = np.zeros((batch, vocab), bool)
    seen[np.arange(batch)[:, None], prompts] = True
    first = sampling.sample(logits, sp, jnp.zeros(batch, jnp.int32), jnp.asarray(seen))
    state = DecodeState.zeros(batch, vocab)
    state = dataclasses.replace(
        state, last=first, steps=jnp.ones(batch, jnp.int32),
        budget=jnp.full(batch, steps + 1, jnp.int32), active=jnp.ones(batch, bool),
        seen=jnp.asarray(seen).at[jnp.arange(batch), first].set(True),
    )  # fmt: skip
    return cache, state, sp


def decode_steps(engine: Engine, cache, state, sp, steps: int, kv_len: int):
    """`steps` decode steps of every row, attending `kv_len` cache slots: (cache, state, tokens
    [B, steps], new tokens per row [B])."""
    cache, state, out = engine.decode_steps(cache, state, sp, steps, kv_len=kv_len)
    return cache, state, out.tokens, out.count


def compile_steps(engine: Engine, batch: int, chunk: int, steps: int, kv_len: int) -> tuple:
    """Seconds to compile the prefill chunk ([batch, chunk] tokens) and the decode loop (`steps`
    steps attending `kv_len` slots) from shapes alone, as `grok1.plan` does (no weights)."""
    params, grok = engine.params, engine.grok
    cache = jax.eval_shape(functools.partial(engine.new_cache, batch))
    table = abstract_table(grok, params)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    toks = jax.ShapeDtypeStruct((batch, chunk), jnp.int32)
    t0 = time.perf_counter()
    engine.steps.prefill.lower(
        params, cache, rows, rows, toks, rows, toks, kv_len=chunk, table=table
    ).compile()
    t_prefill = time.perf_counter() - t0
    state = jax.eval_shape(functools.partial(DecodeState.zeros, batch, grok.config.vocab_size))
    sp = sampling.BatchSamplingParams.stack([sampling.SamplingParams()] * batch)
    t0 = time.perf_counter()
    engine.steps.decode.lower(
        params, cache, state, sp, jnp.bool_(False), kv_len=kv_len, n_steps=steps, table=table
    ).compile()
    return t_prefill, time.perf_counter() - t0


# -- the machine --------------------------------------------------------------------------------
ISA_FLAGS = (  # /proc/cpuinfo flags that decide which vector code can run
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
NATIVE_MACROS = (  # what the compiler enables under -march=native, as grok1.kernels builds
    "__AVX2__", "__FMA__", "__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512VNNI__",
    "__AVX512BF16__", "__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__",
)  # fmt: skip


def _size_bytes(text: str) -> int:
    """A sysfs cache size ("32K", "32768K", "1M") in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def cpu_caches() -> list[dict]:
    """cpu0's caches as the OS reports them (Linux sysfs): level, type, bytes, CPUs sharing it."""
    caches = []
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            read = lambda name, d=index: open(os.path.join(d, name)).read().strip()  # noqa: E731
            caches.append({"level": int(read("level")), "type": read("type"),
                           "bytes": _size_bytes(read("size")),
                           "shared_cpu_list": read("shared_cpu_list")})  # fmt: skip
        except (OSError, ValueError):
            continue
    return caches


def last_level_cache(caches: list[dict]) -> dict | None:
    """The highest-level data or unified cache, or None."""
    data = [c for c in caches if c["type"] != "Instruction"]
    return max(data, key=lambda c: c["level"]) if data else None


def _cpuinfo() -> dict:
    """The first processor's "model name", "cpu family", "model" and "flags" of /proc/cpuinfo."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def kernel_build() -> dict:
    """What grok1.kernels runs on this machine: whether it is built, the ISA macros its
    -march=native build gets from the compiler, and the vector path its sources take there."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    cmd = [*cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull]
    try:
        defined = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        defined = ""
    macros = [m for m in NATIVE_MACROS if f"#define {m} " in defined]
    # kernels/common.h: the AVX2 code path needs __AVX2__ and __FMA__; scalar loops otherwise
    path = "avx2+fma" if {"__AVX2__", "__FMA__"} <= set(macros) else "scalar"
    return {"status": kernels.status(), "march_native": macros, "vector_path": path}


def machine_info() -> dict:
    """The CPU (model, ISA flags, caches), XLA's thread count and the kernels' build."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    caches = cpu_caches()
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "arch": platform.machine(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "caches": caches,
        "llc_bytes": (last_level_cache(caches) or {}).get("bytes"),
        # XLA:CPU sizes its intra-op pool (which the native kernels share) to the CPUs this
        # process may run on
        "threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "kernels": kernel_build(),
    }


def describe_machine(m: dict) -> str:
    size = lambda n: f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"  # noqa: E731
    caches = ", ".join(
        f"L{c['level']}{'d' if c['type'] == 'Data' else ''} {size(c['bytes'])}"
        f"{' (cpus ' + c['shared_cpu_list'] + ')' if c['level'] >= 3 else ''}"
        for c in m["caches"]
        if c["type"] != "Instruction"
    )
    k = m["kernels"]
    return (
        f"CPU {m['cpu_model']} (family/model {m['cpu_family_model']}), "
        f"ISA {' '.join(m['isa']) or 'no AVX2'}; {caches or 'caches ?'}; "
        f"{m['threads']} XLA threads\nkernels: {k['status']}; vector path {k['vector_path']} "
        f"(-march=native: {' '.join(k['march_native']) or 'no AVX2'})"
    )


# -- bytes a decode step reads ------------------------------------------------------------------
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
    engine converts once.
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


def decode_weights(config: ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes of all the weights as decoding reads them (every expert, the bf16 table)."""
    c = config
    return weight_bytes(c, WeightFormats.release(c), c.num_experts, dtype)["total"]


def kv_bytes(config: ModelConfig, batch: int, slots: float, dtype: str) -> int:
    """Bytes of keys and values of `slots` cache slots, every layer and row."""
    per_slot = 2 * config.num_kv_heads * config.key_size * np.dtype(dtype).itemsize
    return int(config.num_layers * batch * slots * per_slot)


def count_touched_experts(grok, params, prompts, steps, args) -> dict:
    """Distinct experts per (layer, decode step) from the router's decisions, and how often a
    layer's set differs from its set at the step before; the tokens decoded.

    Runs the same prefill + decode as the timed run in a separate engine whose router reports
    every decision through a host callback (so the timed program is untouched).
    """
    records = []
    original = moe.route
    # JAX orders callbacks on one device only; on a mesh the per-decision counts stand, and
    # "changed" compares decisions in the order they arrived
    ordered = grok.mesh is None

    def recording_route(*args, **kwargs):
        gates, idx = original(*args, **kwargs)
        jax.debug.callback(lambda i: records.append(np.asarray(i)), idx, ordered=ordered)
        return gates, idx

    moe.route = recording_route
    try:
        engine = new_engine(grok, params, len(prompts), args)
        start = decode_start(engine, prompts, steps, args.temperature, args.seed)
        jax.block_until_ready(start)
        records.clear()  # prefill's decisions are not decode steps
        _, state, tokens, _ = decode_steps(engine, *start, steps, kv_len_of(engine, args))
        jax.block_until_ready(state)
    finally:
        moe.route = original
    layers = grok.config.num_layers
    sets = [frozenset(np.unique(r).tolist()) for r in records]  # step-major, then layer
    distinct = np.array([len(s) for s in sets])
    changed = [sets[i] != sets[i - layers] for i in range(layers, len(sets))]
    decoded = np.asarray(tokens)
    return {
        "mean": float(distinct.mean()),
        "min": int(distinct.min()),
        "max": int(distinct.max()),
        "changed_from_previous_step": float(np.mean(changed)) if changed else 0.0,
        "decisions": len(records),
        "distinct_tokens": int(len(np.unique(decoded))),
        "tokens_decoded": int(decoded.size),
    }


# -- sizing ---------------------------------------------------------------------------------------
def with_layers(config: ModelConfig, n: int) -> ModelConfig:
    return ModelConfig(**{**config.to_dict(), "num_layers": n})


def _layers_for(bytes_at, target: float) -> int:
    """The most layers n with bytes_at(n) <= target (bytes_at is linear in n)."""
    one, two = bytes_at(1), bytes_at(2)
    per_layer = two - one
    return int((target - (one - per_layer)) // per_layer)


def layers_to_fit(config: ModelConfig, fraction: float, device) -> int:
    """The most layers whose weights (release formats) fill at most `fraction` of `device`'s
    memory: sizes a full-width config to one accelerator."""
    from grok1.plan import device_memory_limit

    limit = device_memory_limit(device)
    if limit is None:
        raise SystemExit(f"--fit: {device.device_kind} reports no memory limit (use --num-layers)")

    def weights(n):
        c = with_layers(config, n)
        return sum(map(leaf_bytes, param_table(c, WeightFormats.release(c)).values()))

    n = _layers_for(weights, fraction * limit)
    if n < 1:
        raise SystemExit(f"--fit {fraction}: not even one layer fits in {limit / 1e9:.1f} GB")
    return n


def layers_beyond_cache(config: ModelConfig, llc_bytes: int, multiple: float) -> int:
    """The fewest layers, at least `config`'s, whose weights (as decoding reads them) are at
    least `multiple` times the last-level cache."""
    bytes_at = lambda n: decode_weights(with_layers(config, n))  # noqa: E731
    n = _layers_for(bytes_at, multiple * llc_bytes)
    if bytes_at(n) < multiple * llc_bytes:
        n += 1
    return max(config.num_layers, n)


def cache_regime(weights: int, llc: int | None) -> str:
    if not llc:
        return "unknown (the OS reports no cache sizes)"
    where = "cache-resident" if weights <= llc else "beyond the cache"
    return f"{where}: weights {weights / 1e6:.0f} MB = {weights / llc:.1f}x the {llc >> 20} MiB LLC"


# -- bandwidth ------------------------------------------------------------------------------------
class BandwidthProbe:
    """Samples of the bytes/s at which this process can read the memory that holds the weights.

    On the CPU: a read-only buffer of `nbytes` (the weights' size), written once here so that
    every page exists before any timing, read by `threads` threads (NumPy reductions release
    the GIL; a byte-wise max is one vector instruction per 32 bytes), each a contiguous share.
    On an accelerator, whose weights leave no room for a
    second copy: the best of a jitted sum and a jitted copy (read + write) of 4 GiB there.
    """

    def __init__(self, nbytes: int, threads: int):
        self.on_cpu = jax.devices()[0].platform == "cpu"
        self.threads = max(1, threads)
        if self.on_cpu:
            self.buffer = np.ones(nbytes, np.uint8)
            self.shares = np.array_split(self.buffer, self.threads)
            self.pool = concurrent.futures.ThreadPoolExecutor(self.threads)
            self.nbytes = self.buffer.nbytes
        else:
            self.buffer = jnp.ones(4 * GiB // 4, jnp.float32)
            self.nbytes = self.buffer.nbytes
            self.programs = [(jax.jit(jnp.sum), 1), (jax.jit(lambda v: v * 2), 2)]
            for fn, _ in self.programs:
                jax.block_until_ready(fn(self.buffer))
        self.sample()  # a first pass, untimed

    def sample(self) -> float:
        if self.on_cpu:
            t0 = time.perf_counter()
            list(self.pool.map(np.max, self.shares))
            return self.nbytes / (time.perf_counter() - t0)
        best = 0.0
        for fn, passes in self.programs:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(self.buffer))
            best = max(best, passes * self.nbytes / (time.perf_counter() - t0))
        return best

    def method(self) -> str:
        if self.on_cpu:
            mb = self.nbytes / 1e6
            return f"NumPy uint8 max over {mb:.0f} MB read-only, {self.threads} threads"
        return "best of a jitted sum and copy of 4 GiB on the device"


# -- timing ---------------------------------------------------------------------------------------
def spread(values) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def show(d: dict, spec: str = "{:.0f}") -> str:
    """A `spread` as "median [min-max]"."""
    return f"{spec.format(d['median'])} [{spec.format(d['min'])}-{spec.format(d['max'])}]"


def new_engine(grok, params, batch, args) -> Engine:
    data = 1 if grok.mesh is None else grok.mesh.shape["data"]
    return Engine(grok, params, max_slots=batch, max_bucket=args.max_bucket,
                  cache_len=args.context, slot_multiple=data)  # fmt: skip


def kv_len_of(engine: Engine, args) -> int:
    return bucket(args.prompt + args.steps + 1, engine.capacity)


def random_prompts(config, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, config.vocab_size, length).tolist() for _ in range(batch)]


def bench_batch(grok, params, batch, args, probe, between=None) -> dict:
    """Compile, then `args.repeats` rounds of: a bandwidth sample, a decode call, a prefill call
    and `between(batch, round)` (e.g. a peer's run). Times in seconds per round."""
    config = grok.config
    engine = new_engine(grok, params, batch, args)
    prompts = random_prompts(config, batch, args.prompt, args.seed)
    kv_len = kv_len_of(engine, args)
    chunk = bucket(args.prompt, engine.max_bucket)
    r = {"batch": batch, "prompt": args.prompt, "steps": args.steps, "kv_len": kv_len}

    tokens = np.zeros((batch, chunk), np.int32)
    tokens[:, : args.prompt] = prompts
    n_new = np.full(batch, args.prompt, np.int32)
    start = lambda: decode_start(engine, prompts, args.steps, args.temperature, args.seed)  # noqa: E731

    def timed_decode():
        cache, state, sp = start()
        jax.block_until_ready((cache, state))
        t0 = time.perf_counter()
        cache, state, _, counts = decode_steps(engine, cache, state, sp, args.steps, kv_len)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0
        if int(np.asarray(counts).min()) != args.steps:
            raise RuntimeError("not every row decoded every step")
        return seconds

    def timed_prefill():
        cache = engine.new_cache(batch)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        logits, cache = prefill_chunk(engine, cache, tokens, n_new)
        jax.block_until_ready(logits)
        return time.perf_counter() - t0

    first_prefill, first_decode = timed_prefill(), timed_decode()  # compile + one run each
    held = (params, engine.table, jax.eval_shape(functools.partial(engine.new_cache, batch)))
    r["memory_bytes"] = sum(  # weights, the engine's table, the KV cache
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(held)
    )
    bw, dec, pre = [], [], []
    for i in range(args.repeats):
        bw.append(probe.sample())
        dec.append(timed_decode())
        pre.append(timed_prefill())
        if between is not None:
            between(batch, i)
    r["compile_prefill_s"] = first_prefill - statistics.median(pre)
    r["compile_decode_s"] = first_decode - statistics.median(dec)
    r["first_compile_s"] = r["compile_prefill_s"] + r["compile_decode_s"]
    r["seconds"] = {"bandwidth_bytes_s": bw, "decode": dec, "prefill": pre}
    r["bandwidth"] = spread(bw)
    r["decode_tok_s"] = spread(sorted(batch * args.steps / t for t in dec))
    r["decode_ms_per_step"] = 1e3 * statistics.median(dec) / args.steps
    r["prefill_tok_s"] = spread(sorted(batch * args.prompt / t for t in pre))

    r["experts_touched"] = count_touched_experts(grok, params, prompts, args.steps, args)
    r["bytes"] = weight_bytes(config, grok.formats, r["experts_touched"]["mean"], args.dtype)
    filled = args.prompt + 1 + (args.steps - 1) / 2  # slots holding keys, mean over the steps
    r["bytes"]["kv_cache"] = kv_bytes(config, batch, filled, args.dtype)
    r["bytes"]["kv_cache_attended"] = kv_bytes(config, batch, kv_len, args.dtype)  # read, masked
    r["bytes"]["total"] += r["bytes"]["kv_cache"]
    r["bytes_per_step"] = r["bytes"]["total"]
    steps_s = args.steps / statistics.median(dec)
    r["achieved_bytes_s"] = r["bytes_per_step"] * steps_s
    r["mbu"] = r["achieved_bytes_s"] / r["bandwidth"]["median"]
    r["mbu_per_round"] = spread(
        sorted(r["bytes_per_step"] * args.steps / t / b for t, b in zip(dec, bw, strict=True))
    )
    return r


def compile_vs_depth(config, depths, batch, args) -> list:
    rows = []
    for n in depths:
        c = with_layers(config, n)
        grok = Grok1(c, WeightFormats.release(c), Numerics.choose(args.dtype, args.rounding))
        engine = Engine(grok, grok.param_shapes(), max_slots=batch, cache_len=c.sequence_len)
        chunk = min(128, c.sequence_len)  # a prefill chunk, within the cache
        t_pre, t_dec = compile_steps(engine, batch, chunk, 64, c.sequence_len)
        rows.append({"layers": n, "compile_decode_s": t_dec, "compile_prefill_s": t_pre})
    return rows


# -- command line ---------------------------------------------------------------------------------
def build_parser(description="grok1 inference benchmark") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="bench-cpu", choices=CONFIGS)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="compile-time vs depth")
    ap.add_argument("--num-layers", type=int, default=None, help="the config's depth, overridden")
    ap.add_argument(
        "--fit", type=float, default=None, metavar="FRACTION",
        help="as many layers as fill FRACTION of the device's memory with weights",
    )  # fmt: skip
    ap.add_argument(
        "--llc-multiple", type=float, default=4.0,
        help=f"{MEM_CONFIG}: its weights are at least this many times the last-level cache",
    )  # fmt: skip
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=256, help="decode steps timed per call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-bucket", type=int, default=128)
    ap.add_argument(
        "--context", type=int, default=None,
        help="KV-cache slots (default: the config's sequence length; each step attends only "
        "the filled ones, rounded up to a power of two)",
    )  # fmt: skip
    ap.add_argument(
        "--decode-tokens", default="sampled", choices=("sampled", "greedy"),
        help="sampled: temperature 1 (each step routes anew, like text); greedy: one token "
        "repeated on random weights",
    )  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--mesh", default=None,
        help="e.g. data=1,model=8: the model placed on a mesh (on the CPU, simulate devices with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8)",
    )  # fmt: skip
    ap.add_argument(
        "--cpu-kernels", default="auto", choices=("auto", "on", "off"),
        help="the native CPU kernels (auto: wherever they can run)",
    )  # fmt: skip
    ap.add_argument("--moe", default="auto", choices=moe.STRATEGIES, help="MoE strategy")
    ap.add_argument("--rounding", default="release", choices=ROUNDINGS,
                    help="see grok1.model.Grok1 (fast: int8 weights unrounded)")  # fmt: skip
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def resolve(ap: argparse.ArgumentParser, args, machine: dict) -> tuple[ModelConfig, dict]:
    """The benchmarked config (depth from --num-layers, --fit or the machine's cache) and how
    its depth was chosen."""
    if args.prompt > args.max_bucket:
        ap.error(f"--prompt {args.prompt} exceeds --max-bucket {args.max_bucket}: one prefill "
                 "chunk is timed; raise --max-bucket")  # fmt: skip
    args.temperature = 1.0 if args.decode_tokens == "sampled" else 0.0
    base = "bench-cpu" if args.config == MEM_CONFIG else args.config
    config = ModelConfig.preset(base)
    sizing = {"rule": f"the {base} preset"}
    if args.fit is not None:
        args.num_layers = layers_to_fit(config, args.fit, jax.devices()[0])
        sizing = {"rule": f"--fit {args.fit}"}
    elif args.config == MEM_CONFIG and args.num_layers is None:
        if not machine["llc_bytes"]:
            ap.error(f"--config {MEM_CONFIG}: the OS reports no cache sizes "
                     "(/sys/devices/system/cpu/cpu0/cache); give --num-layers")  # fmt: skip
        args.num_layers = layers_beyond_cache(config, machine["llc_bytes"], args.llc_multiple)
        sizing = {"rule": f"fewest layers >= {config.num_layers} with weights >= "
                          f"{args.llc_multiple:g}x the LLC"}  # fmt: skip
    elif args.num_layers is not None:
        sizing = {"rule": f"--num-layers {args.num_layers}"}
    if args.num_layers is not None:
        config = with_layers(config, args.num_layers)
    args.context = args.context or config.sequence_len
    if not args.layers and args.context < args.prompt + args.steps + 1:
        ap.error(f"--context {args.context} cannot hold --prompt + --steps + 1 tokens")
    sizing["num_layers"] = config.num_layers
    sizing["weights_bytes"] = decode_weights(config, args.dtype)
    sizing["regime"] = cache_regime(sizing["weights_bytes"], machine["llc_bytes"])
    return config, sizing


def print_table(report: dict) -> None:
    m, s = report["machine"], report["sizing"]
    print(describe_machine(m))
    print(f"{report['config_name']}: {s['num_layers']} layers ({s['rule']}); {s['regime']}; "
          f"rounding {report['rounding']}, {report['decode_tokens']} decode tokens")  # fmt: skip
    print(f"bandwidth: {report['bandwidth_method']}, one sample per decode repeat")
    head = (
        f"{'batch':>5} {'compile s':>9} {'prefill tok/s':>17} {'decode tok/s':>17} "
        f"{'ms/step':>7} {'experts/layer':>13} {'changed':>7} {'MB/step':>7} "
        f"{'bandwidth GB/s':>16} {'MBU (rounds)':>18}"
    )
    print(head)
    for r in report["results"]:
        gb = {k: v / 1e9 for k, v in r["bandwidth"].items()}
        mbu = {k: 100 * v for k, v in r["mbu_per_round"].items()}
        print(
            f"{r['batch']:>5} {r['first_compile_s']:>9.1f} {show(r['prefill_tok_s']):>17} "
            f"{show(r['decode_tok_s'], '{:.1f}'):>17} {r['decode_ms_per_step']:>7.2f} "
            f"{r['experts_touched']['mean']:>13.2f} "
            f"{100 * r['experts_touched']['changed_from_previous_step']:>6.0f}% "
            f"{r['bytes_per_step'] / 1e6:>7.1f} {show(gb, '{:.1f}'):>16} "
            f"{100 * r['mbu']:>5.1f}% [{mbu['min']:.0f}-{mbu['max']:.0f}]"
        )


def run(args, ap, between=None, extra: dict | None = None, resolved=None) -> dict:
    """Benchmarks per args (from `build_parser`); `between(batch, round)` runs after each
    round's own measurements; `resolved`: (machine_info(), resolve(...)) if already made.
    Prints the table, writes --json, returns the report."""
    if resolved is None:
        machine = machine_info()
        resolved = machine, resolve(ap, args, machine)
    machine, (config, sizing) = resolved
    report = {
        "config_name": args.config,
        "config": config.to_dict(),
        "sizing": sizing,
        "machine": machine,
        "host": f"{machine['cpu_model']} ({machine['arch']}, {os.cpu_count()} cpus)",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "dtype": args.dtype,
        "moe_strategy": args.moe,
        "rounding": args.rounding,
        "decode_tokens": args.decode_tokens,
        "context": args.context,
        "mesh": args.mesh,
        "cpu_kernels": args.cpu_kernels,
        **(extra or {}),
    }
    if args.layers:
        report["compile_vs_depth"] = compile_vs_depth(config, args.layers, 1, args)
        print(f"{'layers':>6} {'decode compile s':>17} {'prefill compile s':>18}")
        for row in report["compile_vs_depth"]:
            print(f"{row['layers']:>6} {row['compile_decode_s']:>17.2f} "
                  f"{row['compile_prefill_s']:>18.2f}")  # fmt: skip
    else:
        mesh = sharding.make_mesh(args.mesh) if args.mesh else None
        kernels = {"auto": None, "on": True, "off": False}[args.cpu_kernels]
        numerics = Numerics.choose(args.dtype, args.rounding, kernels, mesh=mesh)
        formats = WeightFormats.release(config)
        grok = Grok1(config, formats, numerics, moe_strategy=args.moe, mesh=mesh)
        placed = None
        if mesh is not None:  # every leaf where `grok1.load` places it
            shapes = abstract_params(config, formats, mesh)
            placed = jax.tree.map(lambda s: s.sharding, shapes)
        params = jax.jit(grok.init, out_shardings=placed)(jax.random.PRNGKey(args.seed))
        jax.block_until_ready(params)
        probe = BandwidthProbe(sizing["weights_bytes"], machine["threads"] or 1)
        report["bandwidth_method"] = probe.method()
        report["results"] = [bench_batch(grok, params, b, args, probe, between) for b in args.batch]
        del probe
        print_table(report)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    return report


def main(argv=None):
    ap = build_parser()
    return run(ap.parse_args(argv), ap)


if __name__ == "__main__":
    main()
