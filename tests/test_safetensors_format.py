"""Tests of the converted format (`safetensors_format`) and its command (`grok1.convert`): the
ecosystem's layout, tensors bit-identical to the release files (read back by the safetensors
library itself), sliced reads, atomic conversion and its clean-up, and one-line errors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from grok1 import convert as convert_cli
from grok1.checkpoint import release
from grok1.checkpoint import safetensors_format as sf
from grok1.checkpoint.tensors import BF16, CheckpointError, QuantizedWeight8bit
from grok1.config import ModelConfig
from tests.conftest import random_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")
CASE = os.path.join(GOLDEN, "case3_release_layout_8dev")  # 8 scale groups on linear / down
SMALL = os.path.join(GOLDEN, "case1_gqa6to1_1dev_bs1")
SHARD = 200_000  # bytes: several files for CASE


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return sf.convert(CASE, tmp_path_factory.mktemp("st") / "out", shard_bytes=SHARD)


@pytest.fixture(scope="module")
def leaves() -> dict:
    """The release files read whole by the pickle reader."""
    return release.read_checkpoint(CASE, ModelConfig.load(CASE))


def index_of(directory) -> dict:
    with open(os.path.join(directory, sf.INDEX_FILE)) as f:
        return json.load(f)


def flat(leaves: dict) -> dict:
    """{tensor name: array} under the documented naming scheme."""
    out = {}
    for path, value in leaves.items():
        if isinstance(value, QuantizedWeight8bit):
            out[f"{path}.weight"], out[f"{path}.scales"] = value.weight, value.scales
        else:
            out[path] = value
    return out


# ---------------------------------------------------------------------------------------------
# The layout and the tensors.
# ---------------------------------------------------------------------------------------------
def test_layout_is_the_sharded_safetensors_layout(converted, leaves):
    index = index_of(converted)
    files = index["metadata"]["files"]
    assert set(os.listdir(converted)) == set(files) | {sf.INDEX_FILE, "config.json"}
    assert sorted(files) == [f"model-{k:05d}-of-{len(files):05d}.safetensors"
                             for k in range(1, len(files) + 1)]  # fmt: skip
    assert len(files) > 3
    want = flat(leaves)
    assert set(index["weight_map"]) == set(want)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    for name, size in files.items():
        assert os.path.getsize(os.path.join(converted, name)) == size
    # leaves in release file order; a file is over SHARD only when it holds a single leaf
    order = list(leaves)
    holders = [index["weight_map"][next(iter(flat({p: leaves[p]})))] for p in order]
    assert holders == sorted(holders)
    for name in files:
        held = [p for p, h in zip(order, holders, strict=True) if h == name]
        data = sum(a.nbytes for a in flat({p: leaves[p] for p in held}).values())
        assert data <= SHARD or len(held) == 1, (name, held)
    assert ModelConfig.load(converted) == ModelConfig.load(CASE)


def test_tensors_are_bit_identical_to_the_release_files(converted, leaves):
    """Read back with the safetensors library alone, every tensor equals the release's bits,
    scales included (BF16 <-> ml_dtypes.bfloat16)."""
    got = {}
    for name in index_of(converted)["metadata"]["files"]:
        got.update(load_file(os.path.join(converted, name)))
    want = flat(leaves)
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert (got[name].dtype, got[name].shape) == (array.dtype, array.shape), name
        assert got[name].tobytes() == array.tobytes(), name
    assert got[next(n for n in want if n.endswith(".scales"))].dtype == BF16


def test_sliced_reads_equal_numpy_indexing(converted, leaves):
    rng = np.random.default_rng(5)
    readers = sf.open_converted(converted, ModelConfig.load(CASE))
    for path in list(leaves)[:14]:
        value, reader = leaves[path], readers[path]
        parts = vars(value) if isinstance(value, QuantizedWeight8bit) else {"array": value}
        assert reader.parts == tuple(parts)
        for part, array in parts.items():
            for _ in range(6):
                index = random_index(rng, array.shape)
                got = reader.read_part(part, index)
                want = np.ascontiguousarray(array[index])
                assert got.dtype == want.dtype and got.shape == want.shape, (path, index)
                assert got.tobytes() == want.tobytes(), (path, part, index)
                assert got.flags.c_contiguous


def test_a_slice_asks_the_library_for_that_region_only(converted, leaves, monkeypatch):
    """A device's read of an [E, D, F] leaf's columns goes to `get_slice` as that box alone."""
    asked = []
    real_open = sf.safe_open

    class Slice:
        def __init__(self, view, name):
            self.view, self.name = view, name

        def get_shape(self):
            return self.view.get_shape()

        def get_dtype(self):
            return self.view.get_dtype()

        def __getitem__(self, key):
            asked.append((self.name, key))
            return self.view[key]

    @contextlib.contextmanager
    def recording_open(file, framework):
        with real_open(file, framework=framework) as f:
            yield type("F", (), {"get_slice": lambda self, n: Slice(f.get_slice(n), n)})()

    path = "transformer/decoder_layer_0/moe/linear_v/w"
    reader = sf.open_converted(converted, ModelConfig.load(CASE))[path]
    monkeypatch.setattr(sf, "safe_open", recording_open)
    e, d, f = reader.shape
    got = reader.read_weight((slice(None), slice(None), slice(f // 4, f // 2)))
    want = np.ascontiguousarray(leaves[path].weight[..., f // 4 : f // 2])
    assert got.tobytes() == want.tobytes()
    box = (slice(0, e), slice(0, d), slice(f // 4, f // 2))
    assert asked == [(f"{path}.weight", box)]


# ---------------------------------------------------------------------------------------------
# Atomic conversion and clean-up (issue: no hidden temporary folder left behind).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [OSError("disk full (simulated)"), KeyboardInterrupt()])
def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch, error):
    real, calls = sf._write_file, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(*args)

    monkeypatch.setattr(sf, "_write_file", failing)
    with pytest.raises(type(error)):
        sf.convert(SMALL, tmp_path / "out", shard_bytes=1)
    assert len(calls) == 3 and os.listdir(tmp_path) == []  # neither out nor a temporary dir


def test_the_next_conversion_removes_a_stale_temporary_directory(tmp_path):
    stale = tmp_path / ".out.converting-k1ll3d"  # what a conversion killed outright leaves
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"x" * 100)
    other = tmp_path / ".other.converting-abc"  # another destination's: not ours to remove
    other.mkdir()
    sf.convert(SMALL, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == [".other.converting-abc", "out"]


def test_a_running_conversion_is_not_taken_for_stale(tmp_path):
    running = tmp_path / ".out.converting-live"
    running.mkdir()
    fd = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running conversion holds it
        with pytest.raises(CheckpointError, match="another conversion into .*out is running"):
            sf.convert(SMALL, tmp_path / "out")
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == [".out.converting-live"]


def test_convert_refuses_an_existing_destination_and_a_converted_source(tmp_path, converted):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(CheckpointError, match="taken already exists"):
        sf.convert(SMALL, tmp_path / "taken")
    with pytest.raises(CheckpointError, match="already a converted checkpoint"):
        sf.convert(converted, tmp_path / "again")
    (tmp_path / "empty").mkdir()  # an empty directory is replaced
    assert sf.convert(SMALL, tmp_path / "empty") == str(tmp_path / "empty")
    assert sf.is_converted(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Errors name the file; nothing in a file is executed.
# ---------------------------------------------------------------------------------------------
def damaged(tmp_path, converted: str, damage) -> str:
    """The message `open_converted` raises after `damage(copy, index)` on a copy."""
    copy = str(tmp_path / "copy")
    shutil.copytree(converted, copy)
    index = index_of(copy)
    damage(copy, index)
    with open(os.path.join(copy, sf.INDEX_FILE), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError) as info:
        sf.open_converted(copy, ModelConfig.load(CASE))
    assert "\n" not in str(info.value)
    return str(info.value)


def file_of(index: dict, tensor: str) -> str:
    return index["weight_map"][tensor]


ROUTER = "transformer/decoder_layer_0/router/w"


def test_truncated_file(tmp_path, converted):
    def cut(copy, index):
        name = file_of(index, ROUTER)
        os.truncate(os.path.join(copy, name), index["metadata"]["files"][name] - 7)

    message = damaged(tmp_path, converted, cut)
    name = file_of(index_of(converted), ROUTER)
    size = index_of(converted)["metadata"]["files"][name]
    assert f"{name} is truncated or damaged: it holds {size - 7} bytes" in message
    assert f"the index records {size}" in message


def test_missing_file(tmp_path, converted):
    name = file_of(index_of(converted), ROUTER)
    message = damaged(tmp_path, converted, lambda c, i: os.remove(os.path.join(c, name)))
    assert f"{name}: missing" in message


def test_garbage_header_and_a_pickle_are_refused_without_running_anything(tmp_path, converted):
    name = file_of(index_of(converted), ROUTER)
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    for data in (b"\xff" * 64, pickle.dumps(Evil(), protocol=4)):

        def replace(copy, index, data=data):
            with open(os.path.join(copy, name), "wb") as f:
                f.write(data)
            index["metadata"]["files"][name] = len(data)

        message = damaged(tmp_path, converted, replace)
        assert f"{name} is not a valid safetensors file" in message
        shutil.rmtree(tmp_path / "copy")
    assert not canary.exists()


def test_wrong_shape_names_the_file_and_the_parameter(tmp_path, converted):
    def reshape(copy, index):
        name = file_of(index, ROUTER)
        file = os.path.join(copy, name)
        tensors = load_file(file)
        tensors[ROUTER] = np.zeros((3, 3), np.float32)
        save_file(tensors, file)
        index["metadata"]["files"][name] = os.path.getsize(file)

    message = damaged(tmp_path, converted, reshape)
    assert file_of(index_of(converted), ROUTER) in message and ROUTER in message
    assert "(3, 3)" in message


def test_index_problems(tmp_path, converted):
    name = file_of(index_of(converted), ROUTER)

    def outside(copy, index):
        index["metadata"]["files"]["../elsewhere.safetensors"] = 10

    def renamed(copy, index):
        index["weight_map"][ROUTER + ".weight"] = index["weight_map"].pop(ROUTER)

    def old_format(copy, index):
        index["metadata"]["version"] = 0

    assert "is not a plain file name" in damaged(tmp_path, converted, outside)
    shutil.rmtree(tmp_path / "copy")
    message = damaged(tmp_path, converted, renamed)
    assert f"missing ['{ROUTER}']" in message and "config.json" in message
    shutil.rmtree(tmp_path / "copy")
    assert "Convert the release checkpoint again" in damaged(tmp_path, converted, old_format)
    assert name.endswith(".safetensors")


# ---------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str]:
    code = convert_cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_convert_command(tmp_path, capsys):
    out = str(tmp_path / "out")
    code, err = run_cli(capsys, SMALL, out, "--shard-gb", "0.0002")
    assert code == 0 and f"into {out}" in err
    assert sf.is_converted(out) and len(index_of(out)["metadata"]["files"]) > 1
    errors = [
        ((SMALL, out), f"error: {out} already exists"),
        ((str(tmp_path / "nope"), str(tmp_path / "b")), "error: no checkpoint at"),
        ((out, str(tmp_path / "c")), "already a converted checkpoint"),
    ]
    for argv, text in errors:
        code, err = run_cli(capsys, *argv)
        assert code == 1 and err.startswith("error: ") and text in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as info:
        convert_cli.main([SMALL, out, "--shard-gb", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: --shard-gb") and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_convert_command_interrupted(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sf, "_write_file", interrupted)
    code, err = run_cli(capsys, SMALL, str(tmp_path / "out"))
    assert code == 130 and err.startswith("interrupted") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


SIGTERM_CHILD = """
import os, signal, sys
from grok1.checkpoint import safetensors_format as sf
from grok1.convert import main
real = sf._write_file
def write_then_terminate(*args):
    size = real(*args)
    os.kill(os.getpid(), signal.SIGTERM)
    return size
sf._write_file = write_then_terminate
sys.exit(main([sys.argv[1], sys.argv[2], "--shard-gb", "0.0002"]))
"""


def test_sigterm_cleans_up(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_CHILD), SMALL, str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.startswith("interrupted")
    assert os.listdir(tmp_path) == []
