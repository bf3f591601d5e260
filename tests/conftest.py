"""Shared fixtures: the golden cases made by the release code (tests/data/golden, SPEC.md §8),
models loaded once per test run, and the settings every test runs under.

Settings, for this process and the processes the tests start (run.py, servers, multi-process
runs): JAX raises on implicit rank promotion (an operation between arrays of different ranks must
say how they broadcast), and every `grok1.load` shares one persistent compilation cache made
fresh for the run (`$GROK1_COMPILATION_CACHE`, unless already set), so that a program compiled by
one test or process is read back by the next instead of compiled again, and no result depends on
what a user's own cache holds.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
if "GROK1_COMPILATION_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="grok1-tests-jax-cache-")
    os.environ["GROK1_COMPILATION_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", os.environ["JAX_NUMPY_RANK_PROMOTION"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data", "golden")
CASES = sorted(d for d in os.listdir(GOLDEN_DIR) if os.path.isdir(os.path.join(GOLDEN_DIR, d)))


def case_path(case: str) -> str:
    return os.path.join(GOLDEN_DIR, case)


def case_file(case: str, name: str):
    path = os.path.join(GOLDEN_DIR, case, name)
    return np.load(path) if os.path.exists(path) else None


def prompts_of(case: str) -> list[list[int]]:
    tokens, lengths = case_file(case, "tokens.npy"), case_file(case, "lengths.npy")
    return [tokens[b, : lengths[b]].tolist() for b in range(len(lengths))]


def simulated_devices_env(devices: int) -> dict:
    """The environment of a child process that sees `devices` simulated CPU devices and can
    import `tests`. It compiles unoptimised machine code: such tests compare meshes within one
    run, LLVM's optimisation level changes float32 summation order a little and compile time a
    lot, and compiling is nearly all of their time."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=flags)


def random_index(rng, shape):
    """A random NumPy basic index into `shape`: integers (negative too) and slices (empty,
    strided, reversed) on a leading run of the axes."""
    index = []
    for n in shape[: rng.integers(0, len(shape) + 1)]:
        kind = rng.integers(0, 4)
        if kind == 0:
            index.append(int(rng.integers(-n, n)))
        elif kind == 1:
            index.append(slice(None))
        else:
            a, b = sorted(rng.integers(0, n + 1, 2))
            index.append(slice(a, b, 1 if kind == 2 else int(rng.choice([2, 3, -1, -2]))))
    return tuple(index)


@functools.cache
def golden_model(case: str, dtype: str = "bfloat16", rounding: str = "release"):
    import grok1

    return grok1.load(case_path(case), dtype=dtype, rounding=rounding)


@pytest.fixture(params=CASES)
def case(request) -> str:
    return request.param
