"""Tests of checkpoint loading: release and converted (safetensors) formats, the layer-by-layer
path, sharded reads on a simulated 8-device mesh, errors, the one pass (one parameter table, the
memory checked before any read, no planner), progress, and saved parameters loading back.

References are independent of the loader: the release files read whole with `read_checkpoint`
and stacked in NumPy here, and a single-device load for the sharded runs.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from grok1.checkpoint import loader
from grok1.checkpoint import safetensors_format as sf
from grok1.checkpoint.pickle_reader import PickleTensor
from grok1.checkpoint.release import (
    GLOBALS,
    MODULES,
    CheckpointError,
    QuantizedWeight8bit,
    read_checkpoint,
    release_param_paths,
    release_path,
    tensor_filename,
    write_tensor,
)
from grok1.config import ModelConfig
from grok1.model import MOE, param_table
from grok1.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")
CASES = sorted(c for c in os.listdir(GOLDEN) if os.path.isdir(os.path.join(GOLDEN, c, "ckpt-0")))
CASE = os.path.join(GOLDEN, "case1_gqa6to1_1dev_bs1")


def as_numpy(params: dict) -> dict:
    return {(m, k): np.asarray(v) for m, leaves in params.items() for k, v in leaves.items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert x.tobytes() == y.tobytes(), f"{key} differs"


def reference(case: str, config: ModelConfig) -> dict:
    """Every model leaf built in NumPy from the whole release files (float32 mode)."""
    leaves = read_checkpoint(case, config)
    out = {key: leaves[path] for path, key in GLOBALS.items()}
    for suffix, (module, leaf, _) in MODULES.items():
        values = [leaves[release_path(suffix, i)] for i in range(config.num_layers)]
        if isinstance(values[0], QuantizedWeight8bit):
            out[(module, "scales")] = np.stack([v.scales for v in values])
            values = [v.weight for v in values]
        out[(module, leaf)] = np.stack(values)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Each golden case converted once: {case name: converted dir}."""
    root = tmp_path_factory.mktemp("converted")
    return {case: sf.convert(os.path.join(GOLDEN, case), root / case, shard_bytes=1 << 20)
            for case in CASES}  # fmt: skip


def copy_case(case: str, dest) -> str:
    shutil.copytree(case, dest, ignore=shutil.ignore_patterns("*.npy", "*.md", "*json"))
    shutil.copyfile(os.path.join(case, "config.json"), os.path.join(dest, "config.json"))
    return str(dest)


# ---------------------------------------------------------------------------------------------
# Release and converted formats, small and layer-by-layer paths: all bitwise equal.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_release_and_converted_load_identically(case, converted):
    path = os.path.join(GOLDEN, case)
    config = ModelConfig.load(path)
    release_params, formats = loader.load_params(path, config, dtype="float32")
    want = reference(path, config)
    assert_identical(as_numpy(release_params), want)
    conv_params, conv_formats = loader.load_params(converted[case], config, dtype="float32")
    assert conv_formats == formats
    assert_identical(as_numpy(conv_params), want)
    bf16 = [loader.load_params(d, config)[0] for d in (path, converted[case])]
    assert_identical(*map(as_numpy, bf16))


@pytest.mark.parametrize("source", ["release", "converted"])
def test_layer_by_layer_equals_whole_leaf(source, converted):
    case = "case4_12layers"
    path = os.path.join(GOLDEN, case) if source == "release" else converted[case]
    config = ModelConfig.load(path)
    whole, _ = loader.load_params(path, config, layerwise_bytes=1 << 40)
    layered, _ = loader.load_params(path, config, layerwise_bytes=0, max_workers=3)
    assert_identical(as_numpy(whole), as_numpy(layered))


# ---------------------------------------------------------------------------------------------
# Errors name the file and the parameter.
# ---------------------------------------------------------------------------------------------
def release_error(tmp_path, index: int, damage) -> tuple[str, str, str]:
    directory = copy_case(CASE, tmp_path / "ckpt")
    config = ModelConfig.load(directory)
    file = os.path.join(directory, "ckpt-0", tensor_filename(index))
    damage(file)
    with pytest.raises(CheckpointError) as info:
        loader.load_params(directory, config)
    return str(info.value), tensor_filename(index), release_param_paths(config)[index]


def truncate(file: str) -> None:
    os.truncate(file, os.path.getsize(file) // 2)


@pytest.mark.parametrize(
    "index, damage",
    [
        (5, truncate),
        (13, lambda f: write_tensor(f, np.zeros((3, 3), np.float32))),
        (7, os.remove),
    ],
    ids=["truncated", "wrong_shape", "missing"],
)
def test_release_errors_name_file_and_parameter(tmp_path, index, damage):
    message, file, param = release_error(tmp_path, index, damage)
    assert file in message and param in message, message


def test_failure_during_reads_stops_the_load(tmp_path, monkeypatch):
    """A file that goes bad after opening fails the load with its name; no hang, no params."""
    directory = sf.convert(CASE, tmp_path / "conv", shard_bytes=1 << 20)
    config = ModelConfig.load(directory)
    victim_path = release_param_paths(config)[2]
    real = sf.SafetensorsTensor.read_part

    def read_part(self, part, index=None):
        if self.locations[part][1] == f"{victim_path}.weight":
            truncate(self.path)
        return real(self, part, index)

    monkeypatch.setattr(sf.SafetensorsTensor, "read_part", read_part)
    with pytest.raises(CheckpointError, match="model-000") as info:
        loader.load_params(directory, config, layerwise_bytes=0)
    assert victim_path in str(info.value) and "not a valid safetensors file" in str(info.value)


# ---------------------------------------------------------------------------------------------
# One pass: the table built once, the memory checked before any read, no planner.
# ---------------------------------------------------------------------------------------------
def test_memory_is_checked_against_the_placed_bytes_before_any_read(monkeypatch):
    from grok1 import sharding

    config = ModelConfig.load(CASE)
    held = sum(a.nbytes for a in as_numpy(loader.load_params(CASE, config)[0]).values())
    reads = []
    real = loader._LeafReader._read_one  # noqa: SLF001

    def read_one(self, path, index):
        reads.append(path)
        return real(self, path, index)

    monkeypatch.setattr(loader._LeafReader, "_read_one", read_one)  # noqa: SLF001
    monkeypatch.setattr(sharding, "device_memory_limit", lambda device: held - 1)
    with pytest.raises(sharding.InsufficientMemoryError, match=f"needs {held / 1e9:.3g} GB per"):
        loader.load_params(CASE, config)
    assert reads == []
    monkeypatch.setattr(sharding, "device_memory_limit", lambda device: held)
    loader.load_params(CASE, config)  # exactly enough
    assert reads


ONE_PASS = """
import sys
import grok1
from grok1 import model
real, calls = model.param_table, []
def counted(*args, **kw):
    calls.append(args)
    return real(*args, **kw)
for module in list(sys.modules.values()):  # wherever it was imported by name
    if vars(module).get("param_table") is real:
        setattr(module, "param_table", counted)
grok1.load(sys.argv[1], mesh={"data": 1, "model": 1})
print(len(calls), "grok1.plan" in sys.modules)
"""


def test_one_load_builds_the_table_once_and_never_imports_the_planner():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", ONE_PASS, CASE], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-2:] == ["1", "False"]


# ---------------------------------------------------------------------------------------------
# Progress: the loader counts every read and drives a meter to its total (the meter itself is
# tests/test_progress.py's).
# ---------------------------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_callable_sums_to_total_bytes():
    config = ModelConfig.load(CASE)
    seen: list[int] = []
    params, _ = loader.load_params(CASE, config, progress=seen.append, layerwise_bytes=50_000)
    assert len(seen) > len(as_numpy(params))  # per read, not per leaf
    assert sum(seen) == sum(a.nbytes for a in as_numpy(params).values())


def test_load_sets_the_meter_s_total_and_closes_it():
    config = ModelConfig.load(CASE)
    term = FakeTerminal()
    meter = Progress(stream=term, interval=0.0)
    params, _ = loader.load_params(CASE, config, progress=meter)
    assert meter.closed and meter.done == meter.total == sum(
        a.nbytes for a in as_numpy(params).values()
    )
    text = term.getvalue()
    assert text.startswith("\rloading") and "GB/s" in text and "100%" in text
    assert text.endswith("\n") and text.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Sharded reads on 8 simulated devices (in a subprocess: the device count is fixed at start).
# ---------------------------------------------------------------------------------------------
RULES = {"ffn": "model", "q_heads": "model", "kv_heads": "model", "vocab": "data"}  # others whole


def _normalize(index, shape) -> tuple:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)).indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _expected_reads(arr, key, config, files) -> list:
    """(file, part, index) each leaf should read: each distinct device shard once, per layer."""
    unique = {
        _normalize(i, arr.shape) for i in arr.sharding.devices_indices_map(arr.shape).values()
    }
    glob_path = next((p for p, k in GLOBALS.items() if k == key), None)
    if glob_path is not None:
        return [(files[glob_path], "array", norm) for norm in unique]
    suffix, matrix = next(
        (s, mat) for s, (m, n, mat) in MODULES.items() if m == key[0] and n in (key[1], "w")
    )
    part = "scales" if key[1] == "scales" else "weight" if matrix else "array"
    return [
        (files[release_path(suffix, layer)], part, norm[1:])
        for norm in unique
        for layer in range(*norm[0])
    ]


def _sharded_child(case: str, converted_dir: str) -> None:
    """Loads `case` on a (2, 4) mesh from the release files and from a conversion with one leaf
    per file, each twice (whole-leaf and layer-by-layer), recording every read."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from grok1 import sharding
    from grok1.checkpoint import directory

    assert jax.device_count() == 8
    config = ModelConfig.load(case)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    single, formats = loader.load_params(case, config, dtype="float32")
    single = as_numpy(single)
    table = param_table(config, formats)

    def shardings(module, leaf, shape):
        axes = table[(module, leaf)][2]
        return NamedSharding(mesh, PartitionSpec(*[RULES.get(a) for a in axes]))

    reads = []

    def recording(real):
        def read_part(self, part, index=None):
            out = real(self, part, index)
            shape = self.scales_shape if part == "scales" else self.shape
            reads.append((self.path, part, _normalize(index or (), shape), out.nbytes))
            return out

        return read_part

    PickleTensor.read_part = recording(PickleTensor.read_part)
    sf.SafetensorsTensor.read_part = recording(sf.SafetensorsTensor.read_part)
    sf.convert(case, converted_dir, shard_bytes=1)  # one leaf per file
    for path in (case, converted_dir):
        files = {p: r.path for p, r in directory.open_readers(path, config).items()}
        assert len(set(files.values())) == len(files)
        for layerwise in (1 << 40, 0):
            reads.clear()
            params, _ = loader.load_params(
                path, config, dtype="float32", mesh=mesh,
                rules={**dict.fromkeys(sharding.RULES), **RULES}, layerwise_bytes=layerwise,
            )  # fmt: skip
            expected, kept = [], 0
            for (module, leaf), arr in ((k, params[k[0]][k[1]]) for k in table):
                assert arr.sharding == shardings(module, leaf, arr.shape)
                expected += _expected_reads(arr, (module, leaf), config, files)
                kept += sum({_normalize(s.index, arr.shape): s.data.nbytes
                             for s in arr.addressable_shards}.values())  # fmt: skip
            # each callback read its own devices' slices, each distinct shard once
            assert sorted(r[:3] for r in reads) == sorted(expected)
            requested = sum(r[3] for r in reads)
            file_bytes = sum(a.nbytes for a in single.values())
            assert requested == kept == file_bytes, (requested, kept, file_bytes)  # not 2x, 8x
            moe_up = [r for r in reads if r[0] == files[release_path("moe/linear_v/w", 0)]]
            up = single[(f"{MOE}/up", "w")][0].nbytes
            assert sum(r[3] for r in moe_up if r[1] == "weight") == up
            # 4 distinct F-slices, each read once though 2 devices keep it
            assert_identical(as_numpy(params), single)
    print("SHARDED-OK", requested, file_bytes)


def test_sharded_load_reads_only_own_slices(tmp_path):
    case = os.path.join(GOLDEN, "case3_release_layout_8dev")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")  # fmt: skip
    converted = str(tmp_path / "converted")
    code = f"from tests.test_loader import _sharded_child; _sharded_child({case!r}, {converted!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED-OK" in result.stdout


def test_saved_params_load_back_identically(tmp_path):
    """`save_params` writes the release layout (11 layers: file order differs from layer
    order) and `grok1.load` reads back every leaf bit for bit."""
    import jax

    import grok1
    from grok1.model import Grok1, WeightFormats

    config = ModelConfig.tiny(num_layers=11)
    params = Grok1(config, WeightFormats.release(config)).init(jax.random.PRNGKey(1))
    loader.save_params(str(tmp_path), config, params)
    back = grok1.load(str(tmp_path), dtype="float32").params
    for module, leaves in params.items():
        for leaf, value in leaves.items():
            np.testing.assert_array_equal(np.asarray(back[module][leaf]), np.asarray(value))


def test_per_host_files_load_identically_and_read_only_their_columns(tmp_path):
    """Our per-host layout: P files per leaf, split along the last axis."""
    import jax

    import grok1
    from grok1.checkpoint import release as rel
    from grok1.model import Grok1, WeightFormats

    config = ModelConfig.tiny()
    params = Grok1(config, WeightFormats.release(config)).init(jax.random.PRNGKey(3))
    loader.save_params(str(tmp_path / "one"), config, params)
    loader.save_params(str(tmp_path / "four"), config, params, num_files=4)
    names = sorted(os.listdir(tmp_path / "four" / "ckpt-0"))
    assert names[:4] == [f"tensor00000_00{p}" for p in range(4)]
    a = grok1.load(str(tmp_path / "one")).params
    b = grok1.load(str(tmp_path / "four")).params
    for module, leaves in a.items():
        for leaf, value in leaves.items():
            np.testing.assert_array_equal(np.asarray(b[module][leaf]), np.asarray(value))
    groups = dict(rel.checkpoint_file_groups(str(tmp_path / "four"), config))
    path = "transformer/decoder_layer_0/moe/linear/w"  # [E, D, F]
    sharded = rel.open_leaf(groups[path])
    full = sharded.read_part("weight")
    width = full.shape[-1] // 4
    calls = []
    for f in sharded.files:
        original = f.read_part
        f.read_part = lambda part, index=None, f=f, o=original: (
            calls.append(f.path) or o(part, index)
        )
    got = sharded.read_part("weight", (slice(1, 3), slice(None), slice(width + 2, 2 * width)))
    np.testing.assert_array_equal(got, full[1:3, :, width + 2 : 2 * width])
    assert calls == [groups[path][1]]  # only the second host's file was touched
    np.testing.assert_array_equal(sharded.read_part("weight", (0, 5, -1)), full[0, 5, -1])
