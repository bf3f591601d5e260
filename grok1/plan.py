"""Compile-only planning: how much memory a config needs per device, before loading any weight.

`dry_run` builds abstract parameters (`jax.ShapeDtypeStruct` with the `NamedSharding`s that the
logical-axis rules give) and an abstract KV cache, then lowers and compiles the engine's prefill
chunk and its one-token decode step with `jax.jit(...).lower(...).compile()`. Nothing is
allocated; XLA's own `memory_analysis()` of each compiled program gives the bytes per device
(arguments + outputs + temporaries - donated aliases). `preflight` compares such a figure with
what each device reports it can hold.

    python -m grok1.plan --config grok1 --mesh data=1,model=8 --batch 1 --context 8192

On a host without 8 devices the command re-runs itself with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (virtual CPU devices), which must be set
before JAX starts; `dry_run_subprocess` does the same from Python.

Shapes: B batch, S context (cache slots), M prefill chunk, L layers, K KV heads, Dh key size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from grok1 import sharding
from grok1.cache import CACHE_AXES, KVCache
from grok1.config import ModelConfig
from grok1.model import Grok1, WeightFormats, param_table

GB = 1e9
PREFILL_CHUNK = 1024
DEVICE_FLAG = "--xla_force_host_platform_device_count"


class InsufficientMemoryError(MemoryError):
    pass


class DryRunError(RuntimeError):
    """The dry run's child process failed (its message, or the end of its stderr)."""


def abstract_params(
    config: ModelConfig, formats: WeightFormats, mesh, rules=sharding.RULES
) -> dict:
    """{module: {leaf: ShapeDtypeStruct}} carrying the rule table's shardings."""
    table = param_table(config, formats)
    replicate = _replicated(config, mesh)
    shardings = sharding.table_shardings(table, mesh, replicate=replicate, rules=rules)
    params: dict = {}
    for (module, leaf), (shape, dtype, _) in table.items():
        params.setdefault(module, {})[leaf] = jax.ShapeDtypeStruct(
            shape, dtype, sharding=shardings[(module, leaf)]
        )
    return params


def abstract_cache(config: ModelConfig, mesh, batch: int, context: int, dtype) -> KVCache:
    """The KV cache [L, B, K, S, Dh] with batch on "data" and KV heads on "model"."""
    shapes = KVCache.shapes(config, batch, context, dtype)
    table = {
        "k": (shapes.k.shape, None, CACHE_AXES),
        "v": (shapes.v.shape, None, CACHE_AXES),
        "lengths": (shapes.lengths.shape, None, ("batch",)),
    }
    s = sharding.table_shardings(table, mesh, replicate=_replicated(config, mesh))
    leaf = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    return KVCache(
        k=leaf(shapes.k, s["k"]),
        v=leaf(shapes.v, s["v"]),
        lengths=leaf(shapes.lengths, s["lengths"]),
    )


def abstract_table(grok: Grok1, params) -> jax.ShapeDtypeStruct:
    """`Engine.table` without weights: the embedding as the model reads it, placed like the
    parameter."""
    embed = params["grok1/embed"]["embeddings"]
    dtype = jax.eval_shape(grok.embedding_table, params).dtype
    return jax.ShapeDtypeStruct(embed.shape, dtype, sharding=getattr(embed, "sharding", None))


def abstract_step_inputs(mesh, batch: int, tokens: int) -> tuple:
    """The arguments of one engine step (`grok1.steps.Steps.prefill`) after the parameters and
    the cache: cache rows [B], start positions [B], tokens [B, M], counts of new tokens [B] and
    targets [B, M], batch on "data"."""
    tokens_sharding = sharding.named(("batch", "layers"), (batch, tokens), mesh, "tokens")
    batch_sharding = sharding.named(("batch",), (batch,), mesh, "batch")
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
    toks = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=tokens_sharding)
    return rows, rows, toks, rows, toks


def lower_step(engine, params, cache, inputs: tuple, kv_len: int, table):
    """The engine's prefill step lowered for abstract arguments (`abstract_step_inputs`); one
    token per row is the decode step's forward."""
    return engine.steps.prefill.lower(params, cache, *inputs, kv_len=kv_len, table=table)


def bytes_per_device(tree) -> int:
    """Largest per-device share of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = (
            x.sharding.shard_shape(x.shape) if isinstance(x.sharding, NamedSharding) else x.shape
        )
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def memory_of(compiled) -> dict:
    """Bytes per device from XLA's memory analysis of a compiled program."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def dry_run(
    config: ModelConfig,
    mesh_shape: Mapping[str, int] | None = None,
    batch: int = 1,
    context: int = 8192,
    dtype: str = "bfloat16",
    prefill_chunk: int = PREFILL_CHUNK,
    moe_strategy: str = "auto",
    expert_parallel: bool = False,
) -> dict:
    """Compiles (never runs) the decode step and a prefill chunk on a mesh of abstract devices.

    expert_parallel: whole experts split over the model axis, as `grok1.load(...,
    expert_parallel=True)` places and runs them.

    Returns a JSON-able dict: compile seconds and per-device bytes of each program, parameter and
    cache bytes per device, and `needed_bytes_per_device` (the larger program's total).
    """
    from grok1.engine import Engine  # the engine's own jitted step functions are compiled

    mesh_shape = dict(mesh_shape or {"data": 1, "model": 8})
    want = math.prod(mesh_shape.values())
    if jax.device_count() < want:
        raise RuntimeError(
            f"mesh {mesh_shape} needs {want} devices but JAX sees {jax.device_count()}; set "
            f"XLA_FLAGS={DEVICE_FLAG}={want} before JAX starts, or use dry_run_subprocess()"
        )
    mesh = sharding.make_mesh(mesh_shape)
    sharding.check_mesh(config, mesh, expert_parallel)
    grok = Grok1(
        config, WeightFormats.release(config), dtype=dtype, moe_strategy=moe_strategy,
        expert_mesh=mesh if expert_parallel else None, mesh=mesh,
    )  # fmt: skip
    rules = sharding.EXPERT_PARALLEL_RULES if expert_parallel else sharding.RULES
    params = abstract_params(config, grok.formats, mesh, rules)
    cache = abstract_cache(config, mesh, batch, context, grok.compute_dtype)
    engine = Engine(grok, params, max_bucket=prefill_chunk, cache_len=context)
    table = abstract_table(grok, params)  # `Engine.table`, held beside the parameters
    chunk = min(prefill_chunk, context)
    report = {
        "config": config.to_dict(),
        "mesh": mesh_shape,
        "expert_parallel": expert_parallel,
        "batch": batch,
        "context": context,
        "dtype": dtype,
        "param_bytes_per_device": bytes_per_device(params),
        "cache_bytes_per_device": bytes_per_device(cache),
    }
    with mesh:
        for name, m in (("decode", 1), ("prefill", chunk)):
            inputs = abstract_step_inputs(mesh, batch, m)
            t0 = time.perf_counter()
            lowered = lower_step(engine, params, cache, inputs, context, table)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            report[name] = {
                "tokens": m,
                "lower_s": t1 - t0,
                "compile_s": t2 - t1,
                "memory": memory_of(compiled),
            }
    report["compile_s"] = report["decode"]["compile_s"] + report["prefill"]["compile_s"]
    totals = [report[n]["memory"].get("total", 0) for n in ("decode", "prefill")]
    # the programs read the embedding through the engine's table and leave the parameter out of
    # their arguments (jit drops unused ones), but the model still holds it
    embedding = bytes_per_device(params["grok1/embed"]["embeddings"])
    report["embedding_bytes_per_device"] = embedding
    if max(totals):
        report["needed_bytes_per_device"] = max(totals) + embedding
    else:  # no memory analysis on this backend: what is held, without temporaries
        held = report["param_bytes_per_device"] + report["cache_bytes_per_device"]
        report["needed_bytes_per_device"] = held + bytes_per_device(table)
    return report


def device_memory_limit(device) -> int | None:
    """Bytes a device can hold (`memory_stats()["bytes_limit"]`), None where unknown (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def preflight(needed_bytes_per_device: int, devices: Sequence | None = None) -> None:
    """Raises InsufficientMemoryError if some device cannot hold `needed_bytes_per_device`.

    Devices that report no limit (the CPU) are skipped. Pass this process's devices only: the
    runtime answers memory questions for addressable devices alone.
    """
    devices = list(jax.devices() if devices is None else devices)
    for d in devices:
        limit = device_memory_limit(d)
        if limit is None:
            continue
        if needed_bytes_per_device > limit:
            raise InsufficientMemoryError(
                f"needs {needed_bytes_per_device / GB:.3g} GB per device, this mesh has "
                f"{limit / GB:.3g} GB ({d.device_kind} {d.id}); use a larger model axis, a "
                f"smaller batch or context, or devices with more memory"
            )


def check_params_fit(config: ModelConfig, mesh) -> int:
    """Pre-flight before loading: the release-format parameters' bytes per device of `mesh`
    against each device's memory. Returns the bytes needed per device."""
    needed = bytes_per_device(abstract_params(config, WeightFormats.release(config), mesh))
    local = jax.process_index()
    preflight(needed, [d for d in mesh.devices.flat if d.process_index == local])
    return needed


def config_from(name_or_dir: str) -> ModelConfig:
    """A preset by name, else a checkpoint directory's config (`ModelConfig.load`); a directory
    named like a preset is reached as ./NAME."""
    if name_or_dir in ModelConfig.PRESETS:
        return ModelConfig.preset(name_or_dir)
    if os.path.isdir(name_or_dir):
        return ModelConfig.load(name_or_dir)
    raise ValueError(
        f"{name_or_dir!r} is neither a preset {ModelConfig.PRESETS} nor a checkpoint directory"
    )


def dry_run_subprocess(
    config_name: str = "grok1", mesh_shape=None, batch=1, context=8192, dtype="bfloat16",
    timeout: float | None = None, layers: int | None = None, expert_parallel: bool = False,
) -> dict:  # fmt: skip
    """`dry_run` in a fresh Python process with as many virtual CPU devices as the mesh needs.

    config_name: a preset name or a checkpoint directory (see `config_from`).
    """
    if config_name not in ModelConfig.PRESETS:
        config_name = os.path.abspath(config_name)  # a directory; the child runs elsewhere
    mesh_shape = dict(mesh_shape or {"data": 1, "model": 8})
    env = dict(os.environ)
    n = math.prod(mesh_shape.values())
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    mesh_arg = ",".join(f"{k}={v}" for k, v in mesh_shape.items())
    cmd = [
        sys.executable, "-m", "grok1.plan", "--config", config_name, "--mesh", mesh_arg,
        "--batch", str(batch), "--context", str(context), "--dtype", dtype, "--json", "-",
    ]  # fmt: skip
    if layers is not None:
        cmd += ["--layers", str(layers)]
    if expert_parallel:
        cmd.append("--expert-parallel")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=root, check=False
    )
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        if lines and lines[-1].startswith("error: "):  # the child's own message: just that
            raise DryRunError(lines[-1].removeprefix("error: "))
        raise DryRunError(f"dry run failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _replicated(config: ModelConfig, mesh) -> tuple:
    return ("kv_heads",) if sharding.kv_replication(config, mesh) > 1 else ()


def _parse_mesh(text: str) -> dict:
    out = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        out[axis.strip()] = int(size)
    return out


def summary(r: dict) -> str:
    """The report of `dry_run` as a few readable lines."""
    g = lambda b: f"{b / GB:.2f} GB" if b >= GB / 10 else f"{b / 1e6:.2f} MB"  # noqa: E731
    lines = [
        f"mesh {r['mesh']}{'  expert-parallel' if r.get('expert_parallel') else ''}  "
        f"batch {r['batch']}  context {r['context']}  dtype {r['dtype']}",
        f"parameters per device {g(r['param_bytes_per_device'])}, "
        f"KV cache per device {g(r['cache_bytes_per_device'])}",
    ]
    for name in ("decode", "prefill"):
        p = r[name]
        m = p["memory"]
        lines.append(
            f"{name:8s} ({p['tokens']} tok): compile {p['compile_s']:.1f} s "
            f"(lower {p['lower_s']:.1f} s); per device {g(m.get('total', 0))} = args "
            f"{g(m.get('argument', 0))} + out {g(m.get('output', 0))} + temp "
            f"{g(m.get('temp', 0))} - alias {g(m.get('alias', 0))}"
        )
    lines.append(
        f"needs {g(r['needed_bytes_per_device'])} per device (with the embedding parameter, "
        f"{g(r['embedding_bytes_per_device'])}, which the programs read through the engine's "
        f"table)"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", default="grok1",
        help=f"a preset {ModelConfig.PRESETS} or a checkpoint directory (its config.json)",
    )  # fmt: skip
    ap.add_argument("--layers", type=int, default=None, help="override num_layers")
    ap.add_argument("--mesh", default="data=1,model=8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--expert-parallel", action="store_true", help="whole experts over 'model'")
    ap.add_argument("--json", default=None, help="write the report here ('-': stdout only)")
    args = ap.parse_args(argv)
    mesh_shape = _parse_mesh(args.mesh)
    try:
        config = config_from(args.config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.layers:
        config = ModelConfig(**{**config.to_dict(), "num_layers": args.layers})
    try:
        if jax.device_count() < math.prod(mesh_shape.values()):
            r = dry_run_subprocess(
                args.config, mesh_shape, args.batch, args.context, args.dtype,
                layers=args.layers, expert_parallel=args.expert_parallel,
            )  # fmt: skip
        else:
            r = dry_run(
                config, mesh_shape, args.batch, args.context, args.dtype,
                expert_parallel=args.expert_parallel,
            )  # fmt: skip
    except (sharding.ShardingError, DryRunError) as e:  # a mesh that cannot hold this config
        raise SystemExit(f"error: {e}") from None
    if args.json == "-":
        print(json.dumps(r))
        return
    print(summary(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    preflight(r["needed_bytes_per_device"])


if __name__ == "__main__":
    main()
