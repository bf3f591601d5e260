"""Device-memory traffic of a decode step, estimated from the program XLA compiles for a GPU.

No GPU is needed: XLA compiles for a described CUDA target without one (deviceless
ahead-of-time compilation). The script compiles the engine's one-token step (prefill chunk of
one token, given the engine's converted embedding table) on a mesh of such devices and
reads the optimized program. Every instruction that runs on its own, not inside a fusion, is
taken to read its operands and write its result, once per execution (layer loops count their
trip count, a conditional's branch the expected share of experts that some token selects). A
fusion parameter read only through slices counts the slices; in-place updates count the update.
Caches are ignored, so this is an estimate of the traffic, made to compare formulations. It is
printed next to the bytes a step must read at least (the int8 weights it uses, the embedding
table in bf16, the attended KV cache).

Needs the CUDA plugin matching the installed jaxlib, and no driver:

    pip install "jax-cuda13-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"
    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \
        python benchmarks/gpu_traffic.py --devices 8 --batch 1 8 --top 6

The target is an H100 SXM (80 GB); `--target FILE` takes another XLA `GpuTargetConfig` text.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 12 }
runtime_version { major: 13 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
            "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (.+?) ([\w\-]+)\((.*?)\)(, .*)?$")
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}  # op: its update operand
FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "while", "conditional",
        "call", "partition-id", "replica-id", "after-all", "copy-start", "copy-done"}  # fmt: skip


def type_bytes(text: str) -> int:
    total = 0
    for dtype, dims in SHAPE.findall(text):
        if dtype in ITEMSIZE:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * ITEMSIZE[dtype]
    return total


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    op: str
    operands: str  # the text between the parentheses
    attrs: str

    @property
    def args(self) -> list:
        return re.findall(r"%([\w.\-]+)", self.operands)


def parse(hlo: str) -> dict:
    """{computation name: [Instr]} of an optimized HLO module's text."""
    computations, current = {}, None
    for line in hlo.splitlines():
        if m := COMPUTATION.match(line):
            current = computations.setdefault(m.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := INSTRUCTION.match(line)):
            current.append(Instr(*m.groups()[:4], m.group(5) or ""))
    return computations


def _called(instr: Instr, key: str) -> str | None:
    m = re.search(key + r"=%([\w.\-]+)", instr.attrs)
    return m.group(1) if m else None


def executions(computations: dict, entry: str, branch_share: float) -> dict:
    """How many times each computation that runs on its own runs per run of `entry`."""
    count = collections.Counter({entry: 1.0})
    order = [entry]
    for name in order:
        for instr in computations[name]:
            calls = []
            if instr.op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
                n = int(trips.group(1)) if trips else 1
                calls = [(_called(instr, "body"), n), (_called(instr, "condition"), n + 1)]
            elif instr.op == "conditional":
                calls = [(_called(instr, "true_computation"), branch_share),
                         (_called(instr, "false_computation"), 1 - branch_share)]  # fmt: skip
            elif instr.op == "call":
                calls = [(_called(instr, "to_apply"), 1)]
            for callee, n in calls:
                if callee in computations:
                    if callee not in count:
                        order.append(callee)
                    count[callee] += count[name] * n
    return count


def parameter_reads(fused: list) -> list:
    """Bytes a fused computation reads of each parameter, by parameter number: the slices
    taken of it where it is only sliced, nothing where it is only updated in place."""
    users = collections.defaultdict(list)
    for instr in fused:
        for a in instr.args:
            users[a].append(instr)

    def only_operand_0_of(ops, name: str) -> bool:
        return bool(users[name]) and all(u.op in ops and u.args[0] == name for u in users[name])

    reads = {}
    for instr in fused:
        if instr.op != "parameter":
            continue
        if only_operand_0_of(IN_PLACE, instr.name):
            size = 0
        elif only_operand_0_of(("dynamic-slice", "slice"), instr.name):
            size = sum(type_bytes(u.type) for u in users[instr.name])
        else:
            size = type_bytes(instr.type)
        reads[int(instr.operands)] = size
    return [reads[i] for i in sorted(reads)]


def updated_bytes(fused: list) -> int | None:
    """Bytes written in place by a fused computation's updates; None if it updates nothing."""
    types = {i.name: i.type for i in fused}
    updates = [i.args[IN_PLACE[i.op]] for i in fused if i.op in IN_PLACE]
    return sum(type_bytes(types[u]) for u in updates) if updates else None


def traffic(hlo: str, branch_share: float) -> tuple[float, list]:
    """(estimated bytes moved per run of the program, [(bytes, what)] largest first)."""
    computations = parse(hlo)
    fused = {_called(i, "calls") for c in computations.values() for i in c if i.op == "fusion"}
    entry = re.search(r"^ENTRY %(\S+) ", hlo, re.M).group(1)
    rows = []
    for name, runs in executions(computations, entry, branch_share).items():
        if name in fused:
            continue
        types = {i.name: i.type for i in computations[name]}
        for instr in computations[name]:
            if instr.op in FREE or instr.op.endswith("-done"):
                continue
            written = type_bytes(instr.type)
            if instr.op == "fusion":
                body = computations[_called(instr, "calls")]
                read = sum(parameter_reads(body))
                if (updated := updated_bytes(body)) is not None:
                    written = updated  # in place (a loop-carried buffer, such as the KV cache)
            else:
                read = sum(type_bytes(types[a]) for a in instr.args if a in types)
            rows.append(((read + written) * runs, f"{instr.op} -> {instr.type[:56]} x{runs:g}"))
    rows.sort(key=lambda r: -r[0])
    return sum(r[0] for r in rows), rows


def distinct_experts(tokens: int, k: int, experts: int) -> float:
    """Expected number of experts some token selects, for uniform routing."""
    return experts * (1 - ((experts - k) / experts) ** tokens)


def compile_step(config, devices, data, batch, context, moe_strategy, target, rounding="release"):
    """The compiled one-token step for `devices` GPUs described by `target`."""
    from jax.experimental import topologies

    from grok1 import plan, sharding
    from grok1.engine import Engine
    from grok1.model import Grok1, WeightFormats
    from grok1.numerics import Numerics

    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{devices}", target_config=target
    )
    mesh = sharding.make_mesh({"data": data, "model": devices // data}, topology.devices)
    numerics = Numerics(rounding=rounding, backend="gpu")
    grok = Grok1(config, WeightFormats.release(config), numerics, moe_strategy=moe_strategy,
                 mesh=mesh)  # fmt: skip
    params = plan.abstract_params(config, grok.formats, mesh)
    cache = plan.abstract_cache(config, mesh, batch, context, grok.compute_dtype)
    inputs = plan.abstract_step_inputs(mesh, batch, 1)
    table = plan.abstract_table(grok, params)
    engine = Engine(grok, params, max_bucket=1, cache_len=context)
    with jax.set_mesh(mesh):
        return plan.lower_step(engine, params, cache, inputs, context, table).compile()


def main(argv=None) -> None:
    from bench import weight_bytes

    from grok1 import moe
    from grok1.config import ModelConfig
    from grok1.model import ROUNDINGS, WeightFormats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="grok1", choices=ModelConfig.PRESETS)
    ap.add_argument("--num-layers", type=int, default=None, help="default: the config's")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--data", type=int, default=1, help="size of the mesh's data axis")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=8192, help="cache slots, all attended")
    ap.add_argument("--moe", default="auto", choices=moe.STRATEGIES, help="MoE strategy")
    ap.add_argument("--rounding", default="release", choices=ROUNDINGS, help="see grok1.model")
    ap.add_argument("--target", default=None, help="GpuTargetConfig text file (default H100)")
    ap.add_argument("--top", type=int, default=5, help="largest movers to list per batch")
    args = ap.parse_args(argv)

    config = ModelConfig.preset(args.config)
    if args.num_layers:
        config = dataclasses.replace(config, num_layers=args.num_layers)
    target = open(args.target).read() if args.target else H100
    model = args.devices // args.data
    mesh = f"data {args.data} x model {model}"
    print(f"{args.config}, {config.num_layers} layers, {args.devices} devices ({mesh}), "
          f"context {args.context}, MoE {args.moe}, rounding {args.rounding}; "
          f"per device and step:")  # fmt: skip
    for batch in args.batch:
        compiled = compile_step(
            config, args.devices, args.data, batch, args.context, args.moe, target, args.rounding
        )
        k, e = config.num_selected_experts, config.num_experts
        used = distinct_experts(batch, k, e)
        total, rows = traffic(compiled.as_text(), used / e)
        weights = weight_bytes(config, WeightFormats.release(config), used, "bfloat16")["total"]
        kv = 2 * config.num_layers * batch * config.num_kv_heads * args.context
        kv *= config.key_size * 2 // min(model, config.num_kv_heads)
        floor = weights / model + kv / args.data
        print(f"  batch {batch}: {total / 1e9:.2f} GB moved (estimate), at least "
              f"{floor / 1e9:.2f} GB ({used:.2f} experts per layer), "
              f"{total / floor:.1f}x")  # fmt: skip
        for moved, what in rows[: args.top]:
            print(f"    {moved / 1e9:8.3f} GB  {what}")


if __name__ == "__main__":
    main()
