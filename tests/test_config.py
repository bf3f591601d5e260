"""ModelConfig: the presets against SPEC.md §1, the ffn_size rule, validation, and config.json io.

References: SPEC.md §1's table (copied here as literals: the spec's numbers, not the code's
formulas) and each golden case's generator.json (the sizes the release code derived).
"""

from __future__ import annotations

import json
import os

import pytest

from grok1.config import ModelConfig, ffn_size
from tests.conftest import CASES, case_path

# SPEC.md §1, the released Grok-1
SPEC_GROK1 = {
    "vocab_size": 131072, "emb_size": 6144, "num_layers": 64, "num_q_heads": 48,
    "num_kv_heads": 8, "key_size": 128, "widening_factor": 8, "num_experts": 8,
    "num_selected_experts": 2, "sequence_len": 8192,
    "embedding_multiplier_scale": 78.38367176906169,
    "output_multiplier_scale": 0.5773502691896257,
    "attn_output_multiplier": 0.08838834764831845, "pad_token": 0, "eos_token": 2,
    "norm_eps": 1e-5, "rope_base": 10000, "attn_logit_cap": 30,
}  # fmt: skip


def test_grok1_preset_is_the_release_configuration():
    config = ModelConfig.grok1()
    for name, value in SPEC_GROK1.items():
        assert getattr(config, name) == pytest.approx(value, rel=1e-15), name
    assert config.ffn_size == 32768 and config.q_per_kv == 6
    assert ModelConfig.preset("grok1") == config == ModelConfig()


def test_parameter_count_is_the_spec_s():
    """SPEC.md §1: ≈ 315.6 B, of which experts 309.2 B, attention 5.64 B, embedding 0.805 B."""
    config = ModelConfig.grok1()
    layers = config.num_layers
    experts = layers * 3 * 8 * 6144 * 32768
    attention = layers * (2 * 6144 * 48 * 128 + 2 * 6144 * 8 * 128)
    assert experts == pytest.approx(309.2e9, rel=1e-3)
    assert attention == pytest.approx(5.64e9, rel=1e-3)
    assert 131072 * 6144 == pytest.approx(0.805e9, rel=1e-3)
    assert config.num_params() == pytest.approx(315.6e9, rel=1e-3)
    norms_and_router = 6144 + layers * (4 * 6144 + 6144 * 8)
    assert config.num_params() == experts + attention + 131072 * 6144 + norms_and_router


@pytest.mark.parametrize("emb, want", [(6144, 32768), (128, 688), (64, 344), (512, 2736)])
def test_ffn_size_rounds_up_to_a_multiple_of_8(emb, want):
    """SPEC.md §1's examples; int(8 * D) * 2 // 3 is 4096 * D / 1024 truncated, e.g. 341 -> 344."""
    assert ffn_size(emb, 8) == want
    assert ModelConfig.tiny(emb_size=emb).ffn_size == want


def test_ffn_size_of_other_widening_factors():
    assert ffn_size(100, 1.5) == 104  # int(150) * 2 // 3 = 100 -> 104
    assert ffn_size(96, 3) == 192  # already a multiple of 8
    assert ffn_size(10, 0.35) == 8  # int(3.5) = 3 -> 2 -> 8


@pytest.mark.parametrize("case", CASES)
def test_golden_configs_give_the_release_s_derived_sizes(case):
    """Each golden case's config.json, read here, gives the sizes the release code derived."""
    config = ModelConfig.load(case_path(case))
    with open(os.path.join(case_path(case), "generator.json")) as f:
        generator = json.load(f)
    assert config.ffn_size == generator["derived"]["ffn_size"]
    assert config.q_per_kv == generator["derived"]["gqa_group"]
    assert config.emb_size == generator["TransformerConfig"]["emb_size"]
    assert config.vocab_size == generator["LanguageModelConfig"]["vocab_size"]
    assert config.norm_eps == generator["derived"]["rms_norm_eps"]


def test_scaled_configs_follow_grok1_s_multiplier_rules():
    tiny = ModelConfig.tiny()
    assert (tiny.emb_size, tiny.num_q_heads, tiny.num_kv_heads, tiny.key_size) == (64, 12, 2, 16)
    assert tiny.q_per_kv == 6  # 6:1 like Grok-1
    assert tiny.embedding_multiplier_scale == pytest.approx(8.0)  # sqrt(64)
    assert tiny.attn_output_multiplier == pytest.approx(0.25)  # 1 / sqrt(16)
    assert tiny.output_multiplier_scale == ModelConfig.grok1().output_multiplier_scale
    wide = ModelConfig.tiny(emb_size=256, key_size=64, attn_output_multiplier=1.0)
    assert wide.embedding_multiplier_scale == pytest.approx(16.0)
    assert wide.attn_output_multiplier == 1.0  # given: kept
    bench = ModelConfig.preset("bench-cpu")
    assert (bench.vocab_size, bench.emb_size, bench.num_layers) == (8192, 512, 8)
    assert bench.embedding_multiplier_scale == pytest.approx(512**0.5)
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; choose one of \['bench-cpu'"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_layers": 0}, "ModelConfig.num_layers must be a positive int, got 0"),
        ({"emb_size": 64.0}, "ModelConfig.emb_size must be a positive int, got 64.0"),
        ({"num_experts": True}, "ModelConfig.num_experts must be a positive int, got True"),
        ({"num_kv_heads": 5}, r"num_q_heads \(12\) must be a multiple of num_kv_heads \(5\)"),
        ({"num_selected_experts": 9}, r"num_selected_experts \(9\) exceeds num_experts \(8\)"),
        ({"key_size": 15}, "key_size must be even for RoPE, got 15"),
        ({"eos_token": 512}, "pad_token and eos_token must be valid token ids"),
        ({"pad_token": -1}, "pad_token and eos_token must be valid token ids"),
    ],
)
def test_invalid_configs_are_rejected_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.tiny(**fields)


def test_config_is_frozen_and_hashable():
    config = ModelConfig.tiny()
    with pytest.raises(AttributeError):
        config.num_layers = 3
    assert {config: 1}[ModelConfig.tiny()] == 1


def test_config_json_round_trip(tmp_path):
    config = ModelConfig.tiny(num_layers=3, widening_factor=1.5, norm_eps=1e-6)
    path = config.save(str(tmp_path))
    assert path == str(tmp_path / "config.json")
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left
    assert json.loads((tmp_path / "config.json").read_text())["num_layers"] == 3
    assert ModelConfig.load(str(tmp_path)) == config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_a_directory_without_config_json_is_grok1(tmp_path):
    assert ModelConfig.load(str(tmp_path)) == ModelConfig.grok1()


def test_integral_floats_are_ints_in_config_json(tmp_path):
    """JSON writers may write 8 as 8.0: integral floats are taken for int fields, others not."""
    data = {**ModelConfig.tiny().to_dict(), "num_layers": 3.0}
    assert ModelConfig.from_dict(data).num_layers == 3
    assert isinstance(ModelConfig.from_dict(data).num_layers, int)
    with pytest.raises(ValueError, match="x.json: ModelConfig.num_layers must be a positive int"):
        ModelConfig.from_dict({**data, "num_layers": 2.5}, source="x.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"emb_size": 64, "hidden": 3}', r"unknown config field\(s\) \['hidden'\]"),
        ('{"num_layers": -2}', "ModelConfig.num_layers must be a positive int, got -2"),
        ('{"num_layers": 2,', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
    ],
)
def test_config_json_errors_name_the_file(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig.load(str(tmp_path))
    assert str(info.value).startswith(str(tmp_path / "config.json") + ": ")
