"""One process of a local multi-process run (started by tests/test_multihost.py).

    python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID LOCAL_DEVICES MESH CKPT OUT
        [--loop SECONDS] [--heartbeat S]

MESH is "data=2,model=2" (or "auto": hosts along the data axis). Every process writes OUT.<id>.json
with the bytes it read from the checkpoint; process 0 also writes the generated tokens into OUT.
With --loop, the process writes OUT.<id>.ready after the first generation and keeps generating
for at most SECONDS (the test kills a peer meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_mesh(spec: str, num_processes: int) -> dict:
    if spec == "auto":
        return {"data": num_processes, "model": -1}
    return {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}


def main() -> int:
    p = argparse.ArgumentParser()
    positional = {"port": int, "num_processes": int, "process_id": int, "local_devices": int}
    positional.update(mesh=str, ckpt=str, out=str)
    for name, kind in positional.items():
        p.add_argument(name, type=kind)
    p.add_argument("--loop", type=float, default=0.0)
    p.add_argument("--heartbeat", type=int, default=10)
    args = p.parse_args()
    # before jax is imported: simulated CPU devices for this process, and unoptimised machine
    # code (compiling is nearly all of these tests' time; they compare tokens, not speed)
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.local_devices} "
        "--xla_backend_optimization_level=0"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import numpy as np

    from grok1 import distributed

    distributed.initialize(
        f"127.0.0.1:{args.port}",
        args.num_processes,
        args.process_id,
        timeout_s=60,
        local_device_count=args.local_devices,
        heartbeat_timeout_s=args.heartbeat,
        shutdown_timeout_s=10,
    )

    import jax

    import grok1
    from grok1.checkpoint import pickle_reader

    read_bytes = [0]
    original = pickle_reader.PickleTensor.read_part

    def counting(self, part, index=None):
        out = original(self, part, index)
        read_bytes[0] += out.nbytes
        return out

    pickle_reader.PickleTensor.read_part = counting
    model = grok1.load(args.ckpt, mesh=parse_mesh(args.mesh, args.num_processes))
    pickle_reader.PickleTensor.read_part = original

    prompts = None
    if distributed.is_primary():
        tokens = np.load(os.path.join(args.ckpt, "tokens.npy"))
        lengths = np.load(os.path.join(args.ckpt, "lengths.npy"))
        prompts = [tokens[b, : lengths[b]].tolist() for b in range(len(lengths))]
    prompts = distributed.broadcast_prompts(prompts)
    info = {
        "process_id": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "mesh": dict(model.mesh.shape),
        "read_bytes": read_bytes[0],
        "prompts": prompts,
    }
    with open(f"{args.out}.{args.process_id}.json", "w") as f:
        json.dump(info, f)
    # process 0 submits, the others run the same steps; one generation, then (with --loop) more
    out = None
    if distributed.is_primary():
        out = model.generate(prompts, max_new_tokens=8, ignore_eos=True)
        if not args.loop:
            model.engine.close()
    else:
        if args.loop:
            open(f"{args.out}.{args.process_id}.ready", "w").close()
        model.engine.follow()
    if distributed.is_primary():
        with open(args.out, "w") as f:
            json.dump(out, f)

    if args.loop:
        if distributed.is_primary():
            open(f"{args.out}.{args.process_id}.ready", "w").close()
            deadline = time.monotonic() + args.loop
            while time.monotonic() < deadline:  # a peer is killed meanwhile
                model.generate(prompts, max_new_tokens=8, ignore_eos=True)
        return 3  # the peer's death went unnoticed
    return 0


if __name__ == "__main__":
    sys.exit(main())
