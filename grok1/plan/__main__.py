"""`python -m grok1.plan`: the memory plan's command line (the library is `grok1.plan`)."""

from __future__ import annotations

import argparse
import json
import math

import jax

from grok1 import plan, sharding
from grok1.config import ModelConfig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m grok1.plan", description=plan.__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--config", default="grok1",
        help=f"a preset {ModelConfig.PRESETS} or a checkpoint directory (its config.json)",
    )  # fmt: skip
    ap.add_argument("--layers", type=int, default=None, help="override num_layers")
    ap.add_argument("--mesh", default="data=1,model=8", help="axis sizes, e.g. data=1,model=8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--expert-parallel", action="store_true", help="whole experts over 'model'")
    ap.add_argument("--json", default=None, help="write the report here ('-': stdout only)")
    args = ap.parse_args(argv)
    try:
        config = plan.config_from(args.config)
        # an axis left out (or -1) gets the rest of the devices JAX sees here
        mesh_shape = sharding.mesh_sizes(sharding.parse_mesh(args.mesh), jax.device_count())
    except ValueError as e:  # ShardingError is one
        raise SystemExit(f"error: {e}") from None
    if args.layers:
        config = ModelConfig(**{**config.to_dict(), "num_layers": args.layers})
    try:
        if jax.device_count() < math.prod(mesh_shape.values()):
            r = plan.dry_run_subprocess(
                args.config, mesh_shape, args.batch, args.context, args.dtype,
                layers=args.layers, expert_parallel=args.expert_parallel,
            )  # fmt: skip
        else:
            r = plan.dry_run(
                config, mesh_shape, args.batch, args.context, args.dtype,
                expert_parallel=args.expert_parallel,
            )  # fmt: skip
    except (sharding.ShardingError, plan.DryRunError) as e:  # a mesh that cannot hold this config
        raise SystemExit(f"error: {e}") from None
    if args.json == "-":
        print(json.dumps(r))
        return
    print(plan.summary(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    plan.preflight(r["needed_bytes_per_device"])


if __name__ == "__main__":
    main()
