"""Multi-process (multi-host) start-up: one program run by every process, one global mesh.

Every process runs the same script; `initialize` connects it to the others through JAX's
coordination service (process 0 hosts it), after which `jax.devices()` lists the devices of all
processes and `grok1.load(path, mesh=...)` builds a mesh spanning them. Each process then reads
only the checkpoint slices its own devices keep (`grok1.checkpoint.loader`).

    import grok1.distributed as dist
    dist.initialize()                        # flags, GROK1_* env vars, or TPU/SLURM detection
    model = grok1.load(path, mesh={"data": jax.process_count(), "model": -1})
    prompts = dist.broadcast_prompts(read_prompts() if dist.is_primary() else None)
    out = model.generate(prompts)            # every process runs it; process 0 prints

Failure handling. A peer that cannot be reached within `timeout_s` at start-up is an error
naming the coordinator. After start-up the coordination service watches heartbeats: when a
process dies, the others are ended by the runtime (non-zero exit) after about
`heartbeat_timeout_s`, instead of waiting forever in a collective.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np

ENV_COORDINATOR = "GROK1_COORDINATOR"
ENV_NUM_PROCESSES = "GROK1_NUM_PROCESSES"
ENV_PROCESS_ID = "GROK1_PROCESS_ID"


class DistributedError(RuntimeError):
    pass


_joined = False  # `initialize` succeeded in this process


def joined() -> bool:
    """Whether this process joined a multi-process job through `initialize`."""
    return _joined


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def resolve(coordinator=None, num_processes=None, process_id=None) -> tuple:
    """(coordinator, num_processes, process_id): the arguments, else the GROK1_* env vars, else
    None (left to JAX's cluster detection). Checks that they are consistent."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        names = ("coordinator (HOST:PORT)", "num_processes", "process_id")
        missing = [n for n, g in zip(names, given, strict=True) if not g]
        raise DistributedError(
            f"distributed flags are incomplete: missing {', '.join(missing)}. Give all three "
            f"(--coordinator, --num-processes, --process-id or {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or none of them on a TPU pod / SLURM "
            f"where they are detected"
        )
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(
                f"process_id must lie in [0, {num_processes}) for {num_processes} processes, "
                f"got {process_id}"
            )
    return coordinator, num_processes, process_id


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 60,
    local_device_count: int | None = None,
    *,
    heartbeat_timeout_s: int = 100,
    shutdown_timeout_s: int = 300,
    cpu_collectives: str = "gloo",
) -> None:
    """Joins this process to the others; call before any other JAX call.

    Args:
      coordinator: "HOST:PORT" of process 0 (it listens there); else $GROK1_COORDINATOR; else
        detected by JAX (Cloud TPU pods, SLURM, Open MPI).
      num_processes / process_id: likewise ($GROK1_NUM_PROCESSES / $GROK1_PROCESS_ID).
      timeout_s: how long to wait for the coordinator and all peers at start-up.
      local_device_count: simulate this many CPU devices in this process (testing on one
        machine); None keeps the platform's devices.
      heartbeat_timeout_s: a peer silent this long is declared dead and every process ends.
      shutdown_timeout_s: how long a finishing process waits for the others at exit.
      cpu_collectives: the CPU cross-process collectives ("gloo"; "mpi" needs an MPI build).
    """
    global _joined
    import jax

    coordinator, num_processes, process_id = resolve(coordinator, num_processes, process_id)
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    where = coordinator or "the coordinator detected from the cluster environment"
    if coordinator is not None and process_id != 0:
        # the runtime aborts the process (no Python error) when it cannot register in time;
        # waiting here for the coordinator's port first gives a clear error instead
        timeout_s = _wait_for_coordinator(coordinator, timeout_s, process_id, num_processes)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s),
            heartbeat_timeout_seconds=int(heartbeat_timeout_s),
            shutdown_timeout_seconds=int(shutdown_timeout_s),
        )
    except ValueError as e:  # nothing given and no cluster environment detected
        if coordinator is None:
            raise DistributedError(
                f"no distributed settings found and no TPU pod / SLURM / MPI environment "
                f"detected ({e}); pass --coordinator HOST:PORT --num-processes N --process-id I "
                f"or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}"
            ) from e
        raise
    except Exception as e:  # the runtime's errors (deadline exceeded, unavailable, ...)
        raise DistributedError(
            f"process {process_id} of {num_processes} could not join the job through {where} "
            f"within {timeout_s} s: {type(e).__name__}: {e}\nCheck that process 0 is running "
            f"and listening on that address, that the port is reachable from this host, and "
            f"that every process got the same --num-processes and a distinct --process-id"
        ) from e
    _joined = True


def _wait_for_coordinator(coordinator: str, timeout_s: float, process_id, num_processes) -> int:
    """Waits until the coordinator accepts TCP connections; returns the seconds left."""
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    start = time.monotonic()
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return max(1, round(timeout_s - (time.monotonic() - start)))
        except OSError as e:
            if time.monotonic() - start >= timeout_s:
                raise DistributedError(
                    f"process {process_id} of {num_processes} could not reach the coordinator "
                    f"{coordinator} within {timeout_s} s ({e}). Start process 0 (it listens "
                    f"there), check the address and that the port is open from this host"
                ) from None
            time.sleep(0.25)


def is_primary() -> bool:
    """True on process 0, the one that reads prompts and prints results."""
    import jax

    return jax.process_index() == 0


def broadcast_prompts(obj):
    """Process 0's `obj` on every process (the other processes' arguments are ignored).

    `obj` must be JSON-serialisable (lists of token ids, strings, dicts of them). It is sent as
    bytes: first its length, then the bytes padded to that length, since every process must
    contribute an array of the same shape to the collective.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return obj
    primary = is_primary()
    data = json.dumps(obj).encode() if primary else b""
    n = multihost_utils.broadcast_one_to_all(np.array(len(data), np.int64), is_source=primary)
    buf = np.zeros(int(n), np.uint8)
    if primary:
        buf[:] = np.frombuffer(data, np.uint8)
    buf = multihost_utils.broadcast_one_to_all(buf, is_source=primary)
    return json.loads(np.asarray(buf, np.uint8).tobytes().decode())


class Channel:
    """Messages from process 0 to every other process, in order, through the key-value store of
    JAX's coordination service (no device, no collective: a receiver may wait idle for hours).

    Process 0 calls `publish(obj)` once per message; every other process calls `receive()` as
    many times, getting the messages in the order they were published. `obj` must be
    JSON-serialisable. The store keeps the last `KEEP` messages, so a receiver may lag that far.
    """

    KEEP = 256
    POLL_MS = 10_000

    def __init__(self, name: str):
        from jax._src import distributed as jax_distributed

        self._client = jax_distributed.global_state.client
        if self._client is None:
            raise DistributedError("a Channel needs jax.distributed to be initialised")
        self._name = name
        self._next = 0

    def publish(self, obj) -> None:
        self._client.key_value_set(f"{self._name}/{self._next}", json.dumps(obj))
        old = self._next - self.KEEP
        if old >= 0:
            self._client.key_value_delete(f"{self._name}/{old}")
        self._next += 1

    def receive(self):
        key = f"{self._name}/{self._next}"
        while True:
            try:
                value = self._client.blocking_key_value_get(key, self.POLL_MS)
                break
            except Exception as e:  # the runtime's timeout; anything else is fatal
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self._next += 1
        return json.loads(value)
