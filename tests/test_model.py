"""grok1.model's parameter table: what the model's Haiku modules create is what the table declares
(shapes, dtypes, one logical axis per dimension), for the release's formats and for plain float32
matrices, and the Grok-1 table holds SPEC.md §1's parameter count. The release's names for these
parameters are tests/test_release.py's; the forward pass is checked against the golden cases
(tests/test_golden.py)."""

from __future__ import annotations

import math

import pytest

from grok1.config import ModelConfig
from grok1.layers import MatrixFormat
from grok1.model import MATRICES, Grok1, WeightFormats, param_table

TINY = ModelConfig.tiny(num_layers=3)
F32_ATTENTION = WeightFormats(  # as golden case 2 stores them: attention in float32
    **{m: MatrixFormat(None) for m in ("query", "key", "value", "linear")},
    down=MatrixFormat(8),
)
CONFIGS = {
    "grok1-release": (ModelConfig.grok1(), WeightFormats.release(ModelConfig.grok1())),
    "tiny-release": (TINY, WeightFormats.release(TINY)),
    "tiny-f32-attention": (TINY, F32_ATTENTION),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_the_table_is_what_the_model_creates(name):
    config, formats = CONFIGS[name]
    model = Grok1(config, formats)
    created = {
        (module, leaf): (s.shape, s.dtype)
        for module, leaves in model.param_shapes().items()
        for leaf, s in leaves.items()
    }
    table = param_table(config, formats)
    assert created == {key: (shape, dtype) for key, (shape, dtype, _) in table.items()}
    for key, (shape, _, axes) in table.items():
        assert len(axes) == len(shape), key
    quantized = {m for m in MATRICES if getattr(formats, m).quantized}
    assert {k[0].rsplit("/", 1)[1] for k in table if k[1] == "scales"} == quantized


def test_formats_read_back_off_the_parameters():
    params = Grok1(TINY, F32_ATTENTION).param_shapes()
    assert WeightFormats.of_params(params) == F32_ATTENTION
    assert WeightFormats.of_params(Grok1(TINY).param_shapes()) == WeightFormats()


def test_grok1_table_holds_the_spec_s_parameter_count():
    """SPEC.md §1: about 315.6 B weights (int8 matrices count one per element, scales apart)."""
    config = ModelConfig.grok1()
    table = param_table(config, WeightFormats.release(config))
    weights = sum(
        math.prod(shape) for (_, leaf), (shape, _, _) in table.items() if leaf != "scales"
    )
    assert weights == config.num_params()
    assert 315.5e9 < weights < 315.7e9
