"""Tests of `grok1.checkpoint.directory` through `grok1.load`: a path that holds no usable
checkpoint raises one line naming the path, what is wrong and what to do."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import grok1
from grok1.checkpoint import directory
from grok1.checkpoint import safetensors_format as sf
from grok1.checkpoint.tensors import CheckpointError
from grok1.config import ModelConfig

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
CASE = os.path.join(GOLDEN, "case1_gqa6to1_1dev_bs1")


def load_error(path, kind=(CheckpointError, FileNotFoundError), names=None) -> str:
    """The one-line message `grok1.load(path)` raises; it names `names` (default: `path`)."""
    with pytest.raises(kind) as info:
        grok1.load(str(path))
    message = str(info.value)
    assert "\n" not in message and str(names or path) in message, message
    return message


def copy_ckpt(dest, config: bool = True) -> str:
    shutil.copytree(os.path.join(CASE, "ckpt-0"), os.path.join(dest, "ckpt-0"))
    if config:
        shutil.copyfile(os.path.join(CASE, "config.json"), os.path.join(dest, "config.json"))
    return str(dest)


def test_formats_are_told_apart(tmp_path):
    assert directory.find_format(CASE) == directory.RELEASE
    converted = sf.convert(CASE, tmp_path / "st")
    assert directory.find_format(converted) == directory.CONVERTED
    assert directory.check(converted) == directory.check(CASE) == ModelConfig.load(CASE)
    assert directory.is_checkpoint(CASE) and not directory.is_checkpoint(tmp_path)


def test_load_and_run_py_read_a_converted_checkpoint(tmp_path):
    import argparse

    from grok1 import cli

    converted = sf.convert(CASE, tmp_path / "st")
    args = argparse.Namespace(checkpoint=converted, tokenizer=None)
    assert cli.resolve_model(args)[::2] == (converted, False)
    a, b = grok1.load(CASE).params, grok1.load(converted).params
    assert a.keys() == b.keys()
    for module, leaves in a.items():
        for leaf, value in leaves.items():
            x, y = np.asarray(value), np.asarray(b[module][leaf])
            assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "nope", FileNotFoundError)
    assert "no such directory" in message
    assert "ckpt-0/" in message and sf.INDEX_FILE in message


def test_a_file_where_a_directory_is_expected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    message = load_error(tmp_path / "weights.bin", CheckpointError)
    assert "it is a file; pass a directory holding ckpt-0/" in message


def test_a_directory_without_a_checkpoint(tmp_path):
    message = load_error(tmp_path, FileNotFoundError)
    assert message.startswith(f"no checkpoint in {tmp_path}: expected {tmp_path}/ckpt-0/")
    assert f"or {sf.INDEX_FILE}" in message and "put the release's ckpt-0/ there" in message


def test_ckpt0_is_a_file(tmp_path):
    (tmp_path / "ckpt-0").write_bytes(b"")
    message = load_error(tmp_path, CheckpointError)
    assert f"{tmp_path / 'ckpt-0'} is a file; expected a directory holding" in message


def test_ckpt0_is_empty(tmp_path):
    (tmp_path / "ckpt-0").mkdir()
    message = load_error(tmp_path, CheckpointError)
    assert f"{tmp_path / 'ckpt-0'} holds no tensor files" in message


def test_missing_config_json(tmp_path):
    path = copy_ckpt(tmp_path, config=False)
    message = load_error(path, CheckpointError)
    assert message == (
        f"config.json is missing from {path}, so the Grok-1 release config is assumed (770 "
        f"tensor files), but {path}/ckpt-0 holds 26; put this checkpoint's config.json in {path}"
    )


def test_random_bytes_in_a_tensor_file(tmp_path):
    path = copy_ckpt(tmp_path)
    file = os.path.join(path, "ckpt-0", "tensor00003_000")
    with open(file, "wb") as f:
        f.write(b"\xa0" + np.random.default_rng(0).bytes(1000))
    message = load_error(path, CheckpointError, names=file)
    assert f"{file} is not a valid Grok-1 release tensor file (a protocol-4 pickle" in message
    assert "does not start with a pickle header" in message and "Re-download it" in message


def test_truncated_tensor_file(tmp_path):
    path = copy_ckpt(tmp_path)
    file = os.path.join(path, "ckpt-0", "tensor00002_000")
    size = os.path.getsize(file)
    os.truncate(file, size // 2)
    message = load_error(path, CheckpointError, names=file)
    assert f"{file} is truncated: it holds {size // 2} bytes but needs at least " in message


def test_truncated_converted_file(tmp_path):
    converted = sf.convert(CASE, tmp_path / "st", shard_bytes=1)
    file = os.path.join(converted, "model-00003-of-00026.safetensors")
    size = os.path.getsize(file)
    os.truncate(file, size - 1)
    message = load_error(converted, CheckpointError, names=file)
    assert f"holds {size - 1} bytes, the index records {size}" in message
