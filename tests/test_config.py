"""Config tree: presets load, invalid values raise on construction, derived sizes are right."""

import dataclasses

import pytest

from osprey.config import ExtractorConfig, OspreyConfig, VisionConfig, list_presets


def test_7b_preset_equals_defaults():
    config = OspreyConfig.from_preset("osprey-7b")
    assert config == OspreyConfig()
    assert config.vision.num_image_tokens == 1024
    assert config.vision.image_token_channels == 768
    assert (config.mask_token_id, config.pos_token_id, config.vocab_size) == (32000, 32001, 32000)


def test_presets_listed_and_round_trip():
    assert {"osprey-7b", "tiny"} <= set(list_presets())
    tiny = OspreyConfig.from_preset("tiny")
    assert OspreyConfig.from_dict(tiny.to_dict()) == tiny


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: VisionConfig(image_size=500), "multiple of 32"),
        (lambda: VisionConfig(level_channels=(1, 2, 3)), "4 levels"),
        (lambda: ExtractorConfig(levels=(0, 0)), "distinct"),
        (lambda: ExtractorConfig(levels=(4,)), "distinct"),
        (lambda: OspreyConfig(mask_token_id=5), "inside the embedding table"),
        (lambda: OspreyConfig(projector_type="linear"), "projector_type"),
        (lambda: OspreyConfig(image_token_id=3), "negative"),
        (lambda: OspreyConfig.from_dict({"bogus": 1}), "unknown OspreyConfig fields"),
        (lambda: OspreyConfig.from_preset("nope"), "unknown preset"),
    ],
)
def test_invalid_configs_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        OspreyConfig().name = "x"
