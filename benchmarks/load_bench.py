"""Checkpoint loading benchmark: load GB/s and peak host memory, release vs safetensors format.

    python benchmarks/load_bench.py --gb 2                # writes, converts, measures, cleans up
    python benchmarks/load_bench.py --gb 8 --dir /data/bench --json load.json --keep

Writes a synthetic release checkpoint of about `--gb` GB (a `ModelConfig.scaled` config: D 1024,
V 32768, int8 matrices with bf16 scales, 8 scale groups on `linear`/`down` like the release,
random values, written with the release writer), converts it with `safetensors_format.convert`
(4 GiB files), then, each in a fresh subprocess, loads each format with `load_params`
(layer-by-layer placement of leaves over 256 MiB, the default, and whole-leaf placement), and
reads the same files sequentially, through one reused 16 MiB buffer and into fresh arrays that
are kept (what a naive loader holding the checkpoint in host memory pays for first-touching that
memory). Reports GB/s (checkpoint bytes on disk / wall time) and the child's peak RSS
(`ru_maxrss`) against the checkpoint size; RSS includes the loaded parameters themselves when
the device is the CPU. Before each run it tries to drop the page cache (needs root and a writable
/proc/sys); when it cannot, every run reads a warm cache and the output says "warm".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grok1.checkpoint import release, safetensors_format  # noqa: E402
from grok1.checkpoint.tensors import BF16  # noqa: E402
from grok1.config import ModelConfig  # noqa: E402

READ_BUFFER = 16 << 20


def bench_config(gb: float) -> ModelConfig:
    """A config whose release checkpoint is at least `gb` GB, mostly MoE int8 matrices."""
    base = dict(vocab_size=32768, emb_size=1024, num_q_heads=8, num_kv_heads=2, key_size=128,
                sequence_len=1024)  # fmt: skip
    one = ModelConfig.scaled(num_layers=1, **base)
    d, f, e = one.emb_size, one.ffn_size, one.num_experts
    per_layer = 3 * e * d * f + 4 * d * one.num_q_heads * one.key_size
    layers = max(1, math.ceil((gb * 1e9 - one.vocab_size * d * 4) / per_layer))
    return ModelConfig.scaled(num_layers=layers, **base)


def random_leaf(config: ModelConfig, path: str, rng: np.random.Generator):
    shape = release.release_shape(config, path)
    _, suffix = release.parse_release_path(path)
    if not release.is_matrix(suffix):
        return rng.standard_normal(shape, np.float32)
    groups = 8 if suffix in ("moe/linear_1/w", "multi_head_attention/linear/w") else 1
    weight = rng.integers(-128, 128, size=shape, dtype=np.int8)
    scales = (rng.random((*shape[:-2], groups, shape[-1]), np.float32) * 0.02).astype(BF16)
    return release.QuantizedWeight8bit(weight, scales)


def write_synthetic(directory: str, config: ModelConfig) -> None:
    ckpt = os.path.join(directory, release.CKPT_SUBDIR)
    os.makedirs(ckpt)
    rng = np.random.default_rng(0)
    for i, path in enumerate(release.release_param_paths(config)):
        release.write_tensor(os.path.join(ckpt, release.tensor_filename(i)),
                             random_leaf(config, path, rng))  # fmt: skip
    config.save(directory)


def data_files(directory: str) -> list[str]:
    if safetensors_format.is_converted(directory):
        return sorted(os.path.join(directory, n) for n in os.listdir(directory))
    ckpt = os.path.join(directory, release.CKPT_SUBDIR)
    return sorted(os.path.join(ckpt, n) for n in os.listdir(ckpt))


def size_of(directory: str) -> int:
    return sum(os.path.getsize(f) for f in data_files(directory))


def drop_caches() -> bool:
    """Tries to empty the page cache; False when not allowed (then reads are warm)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Children: each measurement in a fresh process, so ru_maxrss is its own.
# ---------------------------------------------------------------------------------------------
def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_load(directory: str, layerwise: int, workers: int) -> dict:
    import jax

    from grok1.checkpoint import loader

    config = ModelConfig.load(directory)
    jax.block_until_ready(jax.numpy.zeros(1))  # backend up before the baseline
    baseline = max_rss()
    start = time.perf_counter()
    params, _ = loader.load_params(directory, config, layerwise_bytes=layerwise,
                                   max_workers=workers)  # fmt: skip
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    return {"seconds": seconds, "rss": max_rss(), "baseline_rss": baseline, "param_bytes": nbytes}


def child_read(directory: str, keep: bool) -> dict:
    """Reads every file: through one reused 16 MiB buffer, or (`keep`) each into a fresh array
    that is kept, like a naive loader holding the checkpoint in host memory."""
    baseline = max_rss()
    buffer, kept = memoryview(bytearray(READ_BUFFER)), []
    start, total = time.perf_counter(), 0
    for file in data_files(directory):
        with open(file, "rb", buffering=0) as f:
            if not keep:
                while n := f.readinto(buffer):
                    total += n
                continue
            kept.append(np.empty(os.fstat(f.fileno()).st_size, np.uint8))
            view, done = memoryview(kept[-1]), 0
            while n := f.readinto(view[done:]):
                done += n
            total += done
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss": max_rss(), "baseline_rss": baseline, "read": total}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=False)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------
def measure(rel: str, conv: str, workers: int, repeat: int) -> tuple[list[dict], str]:
    layered, whole = "load_params (layer-by-layer > 256 MiB)", "load_params (whole leaves)"
    runs = []
    for fmt, directory in (("release", rel), ("safetensors", conv)):
        runs += [
            (fmt, layered, directory, ["load", directory, str(256 << 20)]),
            (fmt, whole, directory, ["load", directory, str(1 << 60)]),
            (fmt, "sequential read, 16 MiB buffer", directory, ["read", directory]),
            (fmt, "read into fresh arrays, kept", directory, ["readall", directory]),
        ]
    cold = drop_caches()
    if not cold:  # equal footing: every run reads a warm cache
        for directory in (rel, conv):
            run_child(["read", directory])
    rows = []
    for fmt, what, directory, args in runs:
        best = None
        for _ in range(repeat):
            drop_caches()
            args_w = args + [str(workers)] if args[0] == "load" else args
            result = run_child(args_w)
            if best is None or result["seconds"] < best["seconds"]:
                best = result
        size = size_of(directory)
        rows.append({"format": fmt, "what": what, "bytes": size, **best,
                     "gb_per_s": size / best["seconds"] / 1e9})  # fmt: skip
    return rows, "cold" if cold else "warm"


def table(rows: list[dict], cache: str) -> str:
    lines = [
        f"| format | measurement ({cache} page cache) | size GB | s | GB/s | peak RSS GB | "
        f"RSS - imports GB | peak RSS / size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gb = r["bytes"] / 1e9
        lines.append(
            f"| {r['format']} | {r['what']} | {gb:.2f} | {r['seconds']:.2f} | "
            f"{r['gb_per_s']:.2f} | {r['rss'] / 1e9:.2f} | "
            f"{(r['rss'] - r['baseline_rss']) / 1e9:.2f} | {r['rss'] / r['bytes']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="checkpoint size to write (GB)")
    p.add_argument("--dir", default="/tmp/grok1_load_bench", help="work directory")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--workers", type=int, default=8, help="load_params max_workers")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement (best kept)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = p.parse_args(argv)
    if os.path.exists(args.dir):
        sys.exit(f"{args.dir} exists; remove it or pass another --dir")
    config = bench_config(args.gb)
    rel, conv = os.path.join(args.dir, "release"), os.path.join(args.dir, "converted")
    try:
        start = time.perf_counter()
        write_synthetic(rel, config)
        written = time.perf_counter() - start
        start = time.perf_counter()
        safetensors_format.convert(rel, conv, config)
        converted = time.perf_counter() - start
        rows, cache = measure(rel, conv, args.workers, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    size = rows[0]["bytes"]
    print(f"config: L={config.num_layers} D={config.emb_size} F={config.ffn_size} "
          f"E={config.num_experts} V={config.vocab_size}; release checkpoint {size / 1e9:.2f} GB "
          f"(written in {written:.1f} s, converted in {converted:.1f} s = "
          f"{size / converted / 1e9:.2f} GB/s); page cache: {cache}")  # fmt: skip
    print(table(rows, cache))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config.to_dict(), "cache": cache, "write_seconds": written,
                       "convert_seconds": converted, "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, directory, *rest = sys.argv[2:]
        if kind == "load":
            result = child_load(directory, int(rest[0]), int(rest[1]))
        else:
            result = child_read(directory, keep=kind == "readall")
        print(json.dumps(result))
    else:
        main()
