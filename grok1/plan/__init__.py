"""Compile-only planning: how much memory a config needs per device, before loading any weight.

`dry_run` builds abstract parameters (`jax.ShapeDtypeStruct` with the `NamedSharding`s that the
logical-axis rules give) and an abstract KV cache, then lowers and compiles the engine's prefill
chunk and its one-token decode step with `jax.jit(...).lower(...).compile()`. Nothing is
allocated; XLA's own `memory_analysis()` of each compiled program gives the bytes per device
(arguments + outputs + temporaries - donated aliases). `preflight` compares such a figure with
what each device reports it can hold (`grok1.sharding.preflight`).

    python -m grok1.plan --config grok1 --mesh data=1,model=8 --batch 1 --context 8192

(the command line is `grok1/plan/__main__.py`). On a host without 8 devices the command re-runs
itself with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (virtual CPU devices), which must be set
before JAX starts; `dry_run_subprocess` does the same from Python.

Shapes: B batch, S context (cache slots), M prefill chunk, L layers, K KV heads, Dh key size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from grok1 import sharding
from grok1.cache import KVCache
from grok1.config import ModelConfig
from grok1.model import Grok1, WeightFormats, param_table
from grok1.numerics import Numerics
from grok1.sharding import GB
from grok1.sharding import InsufficientMemoryError as InsufficientMemoryError  # re-exported
from grok1.sharding import device_memory_limit as device_memory_limit  # re-exported
from grok1.sharding import preflight as preflight  # re-exported

PREFILL_CHUNK = 1024
DEVICE_FLAG = "--xla_force_host_platform_device_count"


class DryRunError(RuntimeError):
    """The dry run's child process failed (its message, or the end of its stderr)."""


def abstract_params(
    config: ModelConfig, formats: WeightFormats, mesh, rules=sharding.RULES
) -> dict:
    """{module: {leaf: ShapeDtypeStruct}} carrying the rule table's shardings."""
    table = param_table(config, formats)
    shardings = sharding.table_shardings(table, config, mesh, rules)
    params: dict = {}
    for (module, leaf), (shape, dtype, _) in table.items():
        params.setdefault(module, {})[leaf] = jax.ShapeDtypeStruct(
            shape, dtype, sharding=shardings[(module, leaf)]
        )
    return params


def abstract_cache(config: ModelConfig, mesh, batch: int, context: int, dtype) -> KVCache:
    """The KV cache [L, B, K, S, Dh] placed on `mesh` as the engine places it (`KVCache.shapes`:
    batch on "data", KV heads on "model")."""
    return KVCache.shapes(config, batch, context, dtype, mesh)


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

    mesh_shape = sharding.mesh_sizes(mesh_shape or {"data": 1, "model": 8}, jax.device_count())
    want = math.prod(mesh_shape.values())
    if jax.device_count() < want:
        raise RuntimeError(
            f"mesh {mesh_shape} needs {want} devices but JAX sees {jax.device_count()}; set "
            f"XLA_FLAGS={DEVICE_FLAG}={want} before JAX starts, or use dry_run_subprocess()"
        )
    mesh = sharding.make_mesh(mesh_shape)
    sharding.check_mesh(config, mesh, expert_parallel)
    # a mesh's plan is for accelerators, which run XLA's own products (the CPU kernels would
    # leave out their temporaries); one device's is for a CPU host, which runs the kernels
    one_device = mesh.devices.size == 1 and not expert_parallel
    numerics = Numerics.choose(dtype, kernels=None if one_device else False)
    grok = Grok1(
        config, WeightFormats.release(config), numerics, moe_strategy=moe_strategy,
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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=root, check=False
    )
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        if lines and lines[-1].startswith("error: "):  # the child's own message: just that
            raise DryRunError(lines[-1].removeprefix("error: "))
        raise DryRunError(f"dry run failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
