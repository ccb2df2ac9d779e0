"""Training-data provenance: recorded in the config, and overlap of generated datasets named before evaluation."""

import json

from osprey.config import OspreyConfig
from osprey.data.provenance import merge_training_data, training_entry, training_overlap


def _dataset(root, n, seed=0, image_size=256, extra_train=0):
    root.mkdir(parents=True)
    config = {"n": n, "seed": seed, "image_size": image_size, "image_format": "png", "max_objects": 6,
              "val_fraction": 0.05, "test_fraction": 0.05}
    if extra_train:  # as SynthConfig.manifest_config writes it
        config["extra_train"] = extra_train
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


def test_extra_training_images_keep_the_held_out_splits_and_a_redrawn_split_overlaps(tmp_path):
    # Trained on --n 20000 --extra-train 40000 (the built-in model): images 0..59999, test/val drawn over 0..19999.
    grown, plain = _dataset(tmp_path / "grown", 20000, extra_train=40000), _dataset(tmp_path / "plain", 20000)
    bigger, smaller = _dataset(tmp_path / "n60k", 60000), _dataset(tmp_path / "n6k", 6000, extra_train=100)
    trained = (training_entry(grown, "train", 3),)
    for held_out in ("test", "val"):
        assert training_overlap(trained, grown, held_out) is None
        assert training_overlap(trained, plain, held_out) is None  # the same split without the extra images
    assert "trained on the train split of this dataset" in training_overlap(trained, plain, "train")
    warning = training_overlap(trained, bigger, "test")  # --n 60000 redraws the split over the same 60,000 images
    assert "--n 20000" in warning and "--n 60000" in warning and "0..59999" in warning
    assert "0..6099" in training_overlap(trained, smaller, "test")
    # and the other way round: trained on --n 20000, evaluated on a grown copy's test split (the same images)
    assert training_overlap((training_entry(plain, "train", 3),), grown, "test") is None


def test_entries_merge_once_and_round_trip_through_the_config(tmp_path):
    big = _dataset(tmp_path / "big", 20000)
    first = merge_training_data((), training_entry(big, "train", 1))
    both = merge_training_data(merge_training_data(first, training_entry(big, "train", 3)), training_entry(big, "train", 3))
    assert [e["stage"] for e in both] == [1, 3]
    assert training_entry(tmp_path / "plain", "train", 2)["root"] == str(tmp_path / "plain")
    config = OspreyConfig.from_preset("tiny").replace(training_data=both)
    again = OspreyConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.training_data == both and again == config
