"""Training-data provenance: recorded in the config, and overlap of generated datasets named before evaluation."""

import json

from osprey.config import OspreyConfig
from osprey.data.provenance import merge_training_data, training_entry, training_overlap


def _dataset(root, n, seed=0, image_size=256):
    root.mkdir(parents=True)
    config = {"n": n, "seed": seed, "image_size": image_size, "image_format": "png", "max_objects": 6,
              "val_fraction": 0.05, "test_fraction": 0.05}
    (root / "manifest.json").write_text(json.dumps({"version": 1, "generator": "osprey data synth", "config": config}))
    return root


def test_smaller_dataset_of_the_same_seed_overlaps_and_the_same_dataset_test_split_does_not(tmp_path):
    big, small = _dataset(tmp_path / "big", 20000), _dataset(tmp_path / "small", 6000)
    other_seed, other_size = _dataset(tmp_path / "seed1", 6000, seed=1), _dataset(tmp_path / "px", 6000, image_size=128)
    trained = (training_entry(big, "train", 3),)
    assert training_overlap(trained, big, "test") is None
    assert "trained on the train split of this dataset" in training_overlap(trained, big, "train")
    warning = training_overlap(trained, small, "test")
    assert "--n 20000" in warning and "--n 6000" in warning and "0..5999" in warning
    assert training_overlap(trained, other_seed, "test") is None
    assert training_overlap(trained, other_size, "test") is None
    assert training_overlap((), small, "test") is None  # nothing recorded: nothing claimed
    assert training_overlap(trained, tmp_path, "test") is None  # not a generated dataset


def test_entries_merge_once_and_round_trip_through_the_config(tmp_path):
    big = _dataset(tmp_path / "big", 20000)
    first = merge_training_data((), training_entry(big, "train", 1))
    both = merge_training_data(merge_training_data(first, training_entry(big, "train", 3)), training_entry(big, "train", 3))
    assert [e["stage"] for e in both] == [1, 3]
    assert training_entry(tmp_path / "plain", "train", 2)["root"] == str(tmp_path / "plain")
    config = OspreyConfig.from_preset("tiny").replace(training_data=both)
    again = OspreyConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.training_data == both and again == config
