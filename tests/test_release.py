"""Tests of the release checkpoint directory: names, order, shapes, reading and writing."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from grok1.checkpoint.release import (
    GLOBALS,
    LAYER_SUFFIXES,
    MODULES,
    CheckpointError,
    QuantizedWeight8bit,
    ShardedTensor,
    check_leaf,
    is_matrix,
    open_release,
    open_tensor,
    parse_release_path,
    read_checkpoint,
    release_param_paths,
    release_shape,
    tensor_filename,
    write_checkpoint,
    write_tensor,
)
from grok1.config import ModelConfig
from grok1.model import WeightFormats, param_table

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
CASES = sorted(glob.glob(os.path.join(GOLDEN, "*", "")))


def param_index(case: str) -> list[dict]:
    with open(os.path.join(case, "param_index.json")) as f:
        return json.load(f)["tensors"]


def copy_case(case: str, dest) -> str:
    """A writable copy of a golden case's checkpoint and config."""
    os.makedirs(os.path.join(dest, "ckpt-0"))
    shutil.copyfile(os.path.join(case, "config.json"), os.path.join(dest, "config.json"))
    for name in os.listdir(os.path.join(case, "ckpt-0")):
        shutil.copyfile(os.path.join(case, "ckpt-0", name), os.path.join(dest, "ckpt-0", name))
    return str(dest)


# ---------------------------------------------------------------------------------------------
# The name table.
# ---------------------------------------------------------------------------------------------
def test_grok1_name_table():
    paths = release_param_paths(ModelConfig.grok1())
    assert len(paths) == 770 == 2 + 64 * 12 and len(set(paths)) == 770
    assert paths[0] == "language_model/in_out_embed/embeddings"
    assert paths[1] == "language_model/rms_norm/scale"
    assert paths[2] == "transformer/decoder_layer_0/moe/linear/w"
    assert paths[13] == "transformer/decoder_layer_0/router/w"
    assert paths[14] == "transformer/decoder_layer_1/moe/linear/w"
    assert paths[26] == "transformer/decoder_layer_10/moe/linear/w"
    assert paths[2 + 12 * 12 + 5] == "transformer/decoder_layer_2/multi_head_attention/query/w"
    assert paths[-1] == "transformer/decoder_layer_9/router/w"
    assert paths == sorted(paths, key=lambda p: (not p.startswith("language_model"), p))


def test_layers_in_lexicographic_order():
    paths = release_param_paths(ModelConfig.tiny(num_layers=12))
    layers = [parse_release_path(p)[0] for p in paths[2::12]]
    assert layers == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [parse_release_path(p)[1] for p in paths[2:14]] == list(LAYER_SUFFIXES)


def test_name_table_matches_every_golden_param_index():
    quantized = set()
    for case in CASES:
        config = ModelConfig.load(case)
        entries = param_index(case)
        assert [e["path"].removeprefix("params/") for e in entries] == release_param_paths(config)
        assert [e["file"] for e in entries] == [tensor_filename(e["index"]) for e in entries]
        assert [e["index"] for e in entries] == list(range(len(entries)))
        for e in entries:
            path = e["path"].removeprefix("params/")
            assert list(release_shape(config, path)) == e["init_shape"], (case, path)
            if e["stored"] == "__main__.QuantizedWeight8bit":  # some cases keep f32 matrices
                quantized.add(parse_release_path(path)[1])
    # the release's generator quantised exactly the seven matrices (all of them in some cases)
    assert quantized == {s for s in LAYER_SUFFIXES if is_matrix(s)}


# SPEC.md §3: the scales of each matrix in the Grok-1 release
SPEC_GROK1_SCALES = {
    "moe/linear/w": (8, 1, 32768),
    "moe/linear_1/w": (8, 8, 6144),
    "moe/linear_v/w": (8, 1, 32768),
    "multi_head_attention/key/w": (1, 1024),
    "multi_head_attention/linear/w": (8, 6144),
    "multi_head_attention/query/w": (1, 6144),
    "multi_head_attention/value/w": (1, 1024),
}


@pytest.mark.parametrize("config", [ModelConfig.grok1(), ModelConfig.tiny(num_layers=3)],
                         ids=["grok1", "tiny"])  # fmt: skip
def test_name_table_reaches_every_model_parameter_once(config):
    """Each release leaf (`MODULES`, `GLOBALS`) names one model parameter, of the release shape
    stacked over the layers; together they reach every parameter (scales: with their matrix)."""
    table = param_table(config, WeightFormats.release(config))
    reached = []
    for path in release_param_paths(config):
        layer, suffix = parse_release_path(path)
        shape = release_shape(config, path)
        if layer is None:
            reached.append(GLOBALS[path])
            assert table[GLOBALS[path]][0] == shape, path
            continue
        module, leaf, matrix = MODULES[suffix]
        assert (matrix is not None) == is_matrix(suffix), suffix
        if layer == 0:
            reached.append((module, leaf))
            assert table[(module, leaf)][0] == (config.num_layers, *shape), path
            if matrix is not None:
                reached.append((module, "scales"))
                if config == ModelConfig.grok1():
                    scales = table[(module, "scales")][0]
                    assert scales == (config.num_layers, *SPEC_GROK1_SCALES[suffix]), path
    assert len(reached) == len(set(reached)) and set(reached) == set(table)


def test_parse_release_path():
    assert parse_release_path("language_model/rms_norm/scale") == (
        None, "language_model/rms_norm/scale",
    )  # fmt: skip
    assert parse_release_path("transformer/decoder_layer_63/router/w") == (63, "router/w")
    bad_paths = [
        "params/language_model/rms_norm/scale",
        "transformer/decoder_layer_01/router/w",
        "transformer/decoder_layer_1/moe/linear_2/w",
        "transformer/decoder_layer_x/router/w",
        "language_model/other",
    ]
    for bad in bad_paths:
        with pytest.raises(CheckpointError, match="not a release parameter path"):
            parse_release_path(bad)
    for path in release_param_paths(ModelConfig.grok1()):
        layer, suffix = parse_release_path(path)
        assert path == (suffix if layer is None else f"transformer/decoder_layer_{layer}/{suffix}")


def test_grok1_shapes():
    config = ModelConfig.grok1()
    layer = "transformer/decoder_layer_0/"
    expected = {
        "language_model/in_out_embed/embeddings": (131072, 6144),
        "language_model/rms_norm/scale": (6144,),
        layer + "moe/linear/w": (8, 6144, 32768),
        layer + "moe/linear_1/w": (8, 32768, 6144),
        layer + "moe/linear_v/w": (8, 6144, 32768),
        layer + "multi_head_attention/key/w": (6144, 1024),
        layer + "multi_head_attention/linear/w": (6144, 6144),
        layer + "multi_head_attention/query/w": (6144, 6144),
        layer + "multi_head_attention/value/w": (6144, 1024),
        layer + "rms_norm_3/scale": (6144,),
        layer + "router/w": (6144, 8),
    }
    for path, shape in expected.items():
        assert release_shape(config, path) == shape
    total = sum(math.prod(release_shape(config, p)) for p in release_param_paths(config))
    assert total == config.num_params()
    with pytest.raises(CheckpointError, match="layer 64"):
        release_shape(config, "transformer/decoder_layer_64/router/w")


def test_tensor_filename():
    assert tensor_filename(0) == "tensor00000_000"
    assert tensor_filename(769) == "tensor00769_000"
    assert tensor_filename(5, process=12) == "tensor00005_012"


# ---------------------------------------------------------------------------------------------
# Reading and writing directories.
# ---------------------------------------------------------------------------------------------
def test_read_golden_checkpoints():
    for case in CASES:
        config = ModelConfig.load(case)
        leaves = read_checkpoint(case, config)
        assert list(leaves) == release_param_paths(config)
        for entry in param_index(case):
            value = leaves[entry["path"].removeprefix("params/")]
            if isinstance(value, QuantizedWeight8bit):
                assert list(value.weight.shape) == entry["weight_shape"]
                assert list(value.scales.shape) == entry["scales_shape"]
            else:
                assert list(value.shape) == entry["shape"] and value.dtype == np.float32


def test_write_checkpoint_round_trip_is_byte_identical(tmp_path):
    case = CASES[2]  # release layout: 8 scale groups on row-parallel matrices
    config = ModelConfig.load(case)
    leaves = read_checkpoint(case, config)
    write_checkpoint(tmp_path, config, leaves)
    assert ModelConfig.load(str(tmp_path)) == config
    for name in os.listdir(os.path.join(case, "ckpt-0")):
        with open(os.path.join(case, "ckpt-0", name), "rb") as a:
            assert (tmp_path / "ckpt-0" / name).read_bytes() == a.read(), name
    again = read_checkpoint(tmp_path, config)
    for path, value in leaves.items():
        if isinstance(value, QuantizedWeight8bit):
            assert again[path].weight.tobytes() == value.weight.tobytes()
            assert again[path].scales.tobytes() == value.scales.tobytes()
        else:
            assert again[path].tobytes() == value.tobytes()


def test_write_checkpoint_with_float32_matrices(tmp_path):
    config = ModelConfig.tiny(num_layers=1, vocab_size=64, emb_size=16)
    rng = np.random.default_rng(0)
    leaves = {p: rng.standard_normal(release_shape(config, p)).astype(np.float32)
              for p in release_param_paths(config)}  # fmt: skip
    write_checkpoint(tmp_path, config, leaves)
    again = read_checkpoint(tmp_path, config)
    assert all(again[p].tobytes() == v.tobytes() for p, v in leaves.items())


def test_write_checkpoint_checks_leaves_before_writing(tmp_path):
    config = ModelConfig.tiny(num_layers=1, vocab_size=64, emb_size=16)
    leaves = {p: np.zeros(release_shape(config, p), np.float32)
              for p in release_param_paths(config)}  # fmt: skip
    router = "transformer/decoder_layer_0/router/w"
    with pytest.raises(CheckpointError, match="missing.*router"):
        write_checkpoint(tmp_path, config, {k: v for k, v in leaves.items() if k != router})
    with pytest.raises(CheckpointError, match="unexpected.*decoder_layer_1"):
        write_checkpoint(tmp_path, config, {**leaves, router.replace("_0", "_1"): leaves[router]})
    with pytest.raises(CheckpointError, match=r"tensor00013_000.*router/w.*\(16, 8\).*\(16, 7\)"):
        write_checkpoint(tmp_path, config, {**leaves, router: np.zeros((16, 7), np.float32)})
    assert os.listdir(tmp_path) == []


def test_read_checkpoint_missing_file(tmp_path):
    case = copy_case(CASES[0], tmp_path / "c")
    os.remove(os.path.join(case, "ckpt-0", "tensor00007_000"))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(case, ModelConfig.load(case))
    message = str(info.value)
    assert "tensor00007_000" in message
    assert "transformer/decoder_layer_0/multi_head_attention/query/w" in message


def test_read_checkpoint_extra_file(tmp_path):
    case = copy_case(CASES[0], tmp_path / "c")
    shutil.copyfile(os.path.join(case, "ckpt-0", "tensor00001_000"),
                    os.path.join(case, "ckpt-0", "tensor00026_000"))  # fmt: skip
    with pytest.raises(CheckpointError, match="unexpected file.*tensor00026_000"):
        read_checkpoint(case, ModelConfig.load(case))


def test_read_checkpoint_wrong_shape(tmp_path):
    case = copy_case(CASES[0], tmp_path / "c")
    file = os.path.join(case, "ckpt-0", "tensor00013_000")
    write_tensor(file, np.zeros((128, 7), np.float32))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(case, ModelConfig.load(case))
    message = str(info.value)
    for part in (file, "transformer/decoder_layer_0/router/w", "(128, 8)", "(128, 7)"):
        assert part in message


def test_read_checkpoint_wrong_kinds(tmp_path):
    case = copy_case(CASES[0], tmp_path / "c")
    config = ModelConfig.load(case)
    norm = os.path.join(case, "ckpt-0", "tensor00009_000")  # layer 0 rms_norm/scale
    q = QuantizedWeight8bit(np.zeros((128, 128), np.int8), np.zeros((1, 128), ml_dtypes.bfloat16))
    write_tensor(norm, q)
    with pytest.raises(
        CheckpointError, match=r"rms_norm/scale: expected float32 .*QuantizedWeight8bit"
    ):
        read_checkpoint(case, config)
    write_tensor(norm, np.zeros(128, np.float32))
    key = os.path.join(case, "ckpt-0", "tensor00005_000")  # layer 0 attention key [128, 32]
    write_tensor(key, QuantizedWeight8bit(np.zeros((128, 16), np.int8),
                                          np.zeros((4, 16), ml_dtypes.bfloat16)))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"key/w: expected int8 .*\(128, 32\).*\(128, 16\)"):
        read_checkpoint(case, config)


def test_read_checkpoint_with_the_wrong_config():
    case1 = CASES[0]  # 2 layers, emb 128
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(case1, ModelConfig.load(CASES[3]))  # 12 layers
    with pytest.raises(CheckpointError, match=r"expected float32 .* \(512, 256\)"):
        read_checkpoint(case1, ModelConfig.load(case1).__class__.scaled(
            **{**ModelConfig.load(case1).to_dict(), "emb_size": 256}))  # fmt: skip


def test_check_leaf_accepts_tensor_files():
    case = CASES[2]
    config = ModelConfig.load(case)
    for i, path in enumerate(release_param_paths(config)):
        check_leaf(config, path, open_tensor(os.path.join(case, "ckpt-0", tensor_filename(i))))
    with pytest.raises(CheckpointError, match="tensor00000_000"):
        check_leaf(config, "language_model/rms_norm/scale",
                   open_tensor(os.path.join(case, "ckpt-0", "tensor00000_000")),
                   where="tensor00000_000")  # fmt: skip


def test_sharded_tensor_reads_equal_numpy_indexing(tmp_path):
    """Per-host files (P column slices per leaf) read like the whole leaf, for any index."""
    config = ModelConfig.tiny(num_layers=1, vocab_size=64, emb_size=16)
    rng = np.random.default_rng(6)
    leaves = {}
    for path in release_param_paths(config):
        shape = release_shape(config, path)
        if is_matrix(parse_release_path(path)[1]):
            leaves[path] = QuantizedWeight8bit(
                rng.integers(-128, 128, shape).astype(np.int8),
                rng.standard_normal((*shape[:-2], 2, shape[-1])).astype(ml_dtypes.bfloat16),
            )
        else:
            leaves[path] = rng.standard_normal(shape).astype(np.float32)
    write_checkpoint(tmp_path, config, leaves, num_files=4)
    readers = open_release(tmp_path, config)
    for path, value in leaves.items():
        reader = readers[path]
        assert isinstance(reader, ShardedTensor) and len(reader.files) == 4
        parts = vars(value) if isinstance(value, QuantizedWeight8bit) else {"array": value}
        for part, array in parts.items():
            for index in [(), (0,), (-1, slice(3, None, 2)), (slice(None), -1), (slice(5, 2),)]:
                index = index[: array.ndim]
                got = reader.read_part(part, index)
                want = np.ascontiguousarray(array[index])
                assert (got.shape, got.dtype, got.tobytes()) == (
                    want.shape, want.dtype, want.tobytes()
                ), (path, part, index)  # fmt: skip
