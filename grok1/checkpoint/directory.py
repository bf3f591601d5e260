"""What a checkpoint directory holds: the one place that tells the release's `ckpt-0/` from a
converted `model.safetensors.index.json`, and says what is wrong with a path that holds neither.

    config = directory.check(path)               # the config, once the files are known to match
    readers = directory.open_readers(path, config)  # {release path: TensorReader}

Every error is one line naming the path: `FileNotFoundError` when nothing is there,
`CheckpointError` when something is there but is not a usable checkpoint.
"""

from __future__ import annotations

import os

from grok1.checkpoint import release, safetensors_format
from grok1.checkpoint.tensors import CheckpointError, TensorReader
from grok1.config import ModelConfig

RELEASE, CONVERTED = "release", "converted"
_EXPECTED = (
    f"{release.CKPT_SUBDIR}/ (the release's tensor files) or {safetensors_format.INDEX_FILE} "
    f"(a checkpoint converted with grok1-convert)"
)


def is_checkpoint(path) -> bool:
    """Whether `path` holds something that claims to be a checkpoint (a `ckpt-0` entry or an
    index file); `check` then says whether it is a usable one."""
    path = os.fspath(path)
    return os.path.exists(os.path.join(path, release.CKPT_SUBDIR)) or os.path.exists(
        os.path.join(path, safetensors_format.INDEX_FILE)
    )


def find_format(path) -> str:
    """RELEASE or CONVERTED (the converted format wins when both are present)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no checkpoint at {path}: no such directory; pass a directory holding {_EXPECTED}"
        )
    if not os.path.isdir(path):
        raise CheckpointError(
            f"no checkpoint at {path}: it is a file; pass a directory holding {_EXPECTED}"
        )
    if safetensors_format.is_converted(path):
        return CONVERTED
    if os.path.exists(os.path.join(path, release.CKPT_SUBDIR)):
        return RELEASE
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected {os.path.join(path, '')}{_EXPECTED}; put the "
        f"release's ckpt-0/ there, or pass the directory that holds it"
    )


def check(path, config: ModelConfig | None = None) -> ModelConfig:
    """The checkpoint's config (`config`, else `<path>/config.json`, else the Grok-1 preset),
    after checking that the directory holds the files it needs; reads no tensor data."""
    fmt = find_format(path)
    if fmt == RELEASE:
        release.tensor_file_names(path)  # ckpt-0 a file, or empty: said before the config
    config = config or ModelConfig.load(os.fspath(path))
    if fmt == RELEASE:
        release.checkpoint_file_groups(path, config)
    else:
        safetensors_format.check_index(path, config)
    return config


def open_readers(path, config: ModelConfig) -> dict[str, TensorReader]:
    """{release path: reader} for every leaf, each checked against `config`."""
    if find_format(path) == CONVERTED:
        return safetensors_format.open_converted(path, config)
    return release.open_release(path, config)
