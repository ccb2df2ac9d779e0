"""Stage-specific samples (exact strings, caps, binding order) and the dataset/collator/tiny-model path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from osprey.data.dataset import (
    MODEL_INPUT_KEYS,
    RegionCollator,
    RegionDataset,
    SubsetSpec,
    count_fully_masked,
    manifest_subsets,
    specs_for_files,
)
from osprey.data.records import parse_record
from osprey.data.samples import (
    DETAILED_QUESTIONS,
    OVERVIEW,
    SHORT_ANSWER_SUFFIX,
    STAGE2_OPENINGS,
    build_sample,
    image_first,
    rewrite_region_refs,
)
from osprey.masks import encode_rle
from osprey.prompts import multi_region_prefix
from osprey.tokenization import IGNORE_INDEX

FIXTURE = Path(__file__).parent / "fixtures" / "synth"
H = W = 16


def _square(k: int) -> np.ndarray:
    """A distinct small mask per region number: a 1-pixel-high bar on row k (k < 16) or column k - 16."""
    mask = np.zeros((H, W), dtype=bool)
    if k < H:
        mask[k, : k + 1] = True
    else:
        mask[:, k - H] = True
    return mask


def _record(n: int, **text) -> dict:
    annotation = [{"segmentation": encode_rle(_square(k)), "bbox": [0, 0, 1, 1]} for k in range(n)]
    return {"id": 7, "file_name": "images/x.png", "height": H, "width": W, "annotation": annotation, **text}


def _conv(*pairs: tuple[str, str]) -> list[dict]:
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def _region_ids(sample) -> list[int]:
    """Which test region (by its row/column) each bound mask is."""
    out = []
    for mask in sample.masks():
        matches = [k for k in range(2 * H) if np.array_equal(mask, _square(k))]
        assert len(matches) == 1
        out.append(matches[0])
    return out


RNG = np.random.default_rng(0)


def test_image_first_moves_the_placeholder_to_the_front():
    assert image_first("Describe the image.\n<image>") == "<image>\nDescribe the image."
    assert image_first("<image>\nWhat is this?") == "<image>\nWhat is this?"
    assert image_first("What is this?") == "<image>\nWhat is this?"
    assert rewrite_region_refs("Is <region2> left of <region10>?") == "Is region2 left of region10?"


def test_stage1_caption_sample():
    record = _record(2, conversations=_conv(("Give a short caption.\n<image>", "Two things.")))
    sample = build_sample(record, 1, "captions", "/data", RNG)
    assert sample.messages == (("human", "<image>\nGive a short caption."), ("gpt", "Two things."))
    assert sample.regions == () and sample.masks() == []
    assert sample.image_path == Path("/data/images/x.png")


@pytest.mark.parametrize("kind", sorted(STAGE2_OPENINGS))
def test_stage2_one_turn_per_region_with_opening(kind):
    record = _record(4, description=[f"<region{k + 1}>: label{k}" for k in range(4)])
    sample = build_sample(record, 2, kind, "/data", np.random.default_rng(1))
    humans = [t for r, t in sample.messages if r == "human"]
    answers = [t for r, t in sample.messages if r == "gpt"]
    assert humans[0] == "<image>\n" + STAGE2_OPENINGS[kind] + "<mask><pos>"
    assert humans[1:] == ["<mask><pos>"] * 3
    assert sorted(answers) == [f"label{k}" for k in range(4)]
    # The i-th answer belongs to the i-th bound mask, whatever the shuffle.
    assert [int(a[len("label"):]) for a in answers] == _region_ids(sample)


def test_stage2_shuffle_is_seeded_and_capped():
    record = parse_record(_record(25, description=[f"<region{k + 1}>: label{k}" for k in range(25)]))
    orders = {tuple(_region_ids(build_sample(record, 2, "referring", "/d", np.random.default_rng(s)))) for s in range(4)}
    assert len(orders) > 1  # different seeds shuffle differently
    same = [_region_ids(build_sample(record, 2, "referring", "/d", np.random.default_rng(9))) for _ in range(2)]
    assert same[0] == same[1]
    assert len(same[0]) == 15  # non-COCO kinds: 15 regions
    assert len(build_sample(record, 2, "categories", "/d", np.random.default_rng(9)).regions) == 20  # COCO: 20


@pytest.mark.parametrize("kind, suffix", [("conversations", ""), ("short_form", SHORT_ANSWER_SUFFIX),
                                          ("parts", SHORT_ANSWER_SUFFIX)])
def test_stage3_multi_region_prefix_suffix_and_refs(kind, suffix):
    record = _record(3, conversations=_conv(("What is <region2>?", "The ring in <region2>."),
                                            ("Is <region3> left of <region1>?", "Yes.")))
    sample = build_sample(record, 3, kind, "/d", RNG)
    assert sample.messages == (
        ("human", multi_region_prefix(3) + " What is region2?" + suffix),
        ("gpt", "The ring in region2."),
        ("human", "Is region3 left of region1?" + suffix),
        ("gpt", "Yes."),
    )
    assert sample.messages[0][1].startswith(
        "<image>\nThis provides an overview of the picture.\nTher are 3 part regions in the picture: "
        "region1<mask><pos>,region2<mask><pos>,region3<mask><pos>. What is region2?")
    assert _region_ids(sample) == [0, 1, 2]  # annotation order = order of the listed <mask>s


def test_stage3_one_region_says_part_region():
    sample = build_sample(_record(1, conversations=_conv(("What is <region1>?", "a"))), 3, "short_form", "/d", RNG)
    assert "Ther are 1 part region in the picture: region1<mask><pos>. What is region1?" in sample.messages[0][1]


def test_stage3_pos_neg_binds_regions_inline_in_order_of_occurrence():
    record = _record(3, conversations=_conv(("Is <region3> red?", "Yes"), ("Is <region1> a ring?", "No")))
    sample = build_sample(record, 3, "pos_neg", "/d", RNG)
    assert sample.messages == (("human", OVERVIEW + "Is <mask><pos> red?"), ("gpt", "Yes"),
                               ("human", "Is <mask><pos> a ring?"), ("gpt", "No"))
    assert _region_ids(sample) == [2, 0]


def test_stage3_detailed_one_question_per_description():
    record = _record(2, description=["<region2>: A blue ring around <region1>.", "<region1>: A red disc."])
    sample = build_sample(record, 3, "detailed", "/d", np.random.default_rng(3))
    humans = [t for r, t in sample.messages if r == "human"]
    assert humans[0].startswith(OVERVIEW)
    templates = [q.replace("<region>", "<mask><pos>") for q in DETAILED_QUESTIONS]
    assert humans[0][len(OVERVIEW):] in templates and humans[1] in templates
    assert [t for r, t in sample.messages if r == "gpt"] == ["A blue ring around region1.", "A red disc."]
    assert _region_ids(sample) == [1, 0]


def test_builders_reject_bad_records_by_name():
    with pytest.raises(ValueError, match="<region4>"):
        build_sample(_record(2, conversations=_conv(("What is <region4>?", "x"))), 3, "conversations", "/d", RNG)
    with pytest.raises(ValueError, match="stage/kind"):
        build_sample(_record(1, description=["<region1>: x"]), 2, "detailed", "/d", RNG)
    with pytest.raises(ValueError, match="no 'conversations'"):
        build_sample(_record(1, description=["<region1>: x"]), 3, "short_form", "/d", RNG)


# ---------------------------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from osprey.checkpoint import load_pretrained

    model, tokenizer, _ = load_pretrained(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def dataset(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return RegionDataset(manifest_subsets(FIXTURE, "train"), tokenizer, model.config.vision, max_length=1024)


def test_manifest_subsets_select_stage_and_names():
    assert {s.kind for s in manifest_subsets(FIXTURE, "train", stages=[2])} == {"categories", "parts", "referring"}
    specs = manifest_subsets(FIXTURE, "test", names=["stage3_pos_neg"])
    assert specs == [SubsetSpec(FIXTURE / "test" / "stage3_pos_neg.json", 3, "pos_neg", FIXTURE)]
    with pytest.raises(ValueError, match="nope"):
        manifest_subsets(FIXTURE, "train", names=["nope"])


def test_specs_for_files_from_manifest_or_explicit(tmp_path):
    specs = specs_for_files(["train/stage2_parts.json", "test/stage3_detailed.json"], FIXTURE)
    assert [(s.stage, s.kind) for s in specs] == [(2, "parts"), (3, "detailed")]
    assert specs[0].image_root == FIXTURE
    other = tmp_path / "coco.json"
    assert specs_for_files([other], tmp_path, stage=2, kind="categories")[0].kind == "categories"
    with pytest.raises(ValueError, match="stage and kind"):
        specs_for_files([other], tmp_path)


def test_dataset_items_and_epoch_reseeding(dataset):
    assert len(dataset) == 8 * 7 + 5 * 2  # 8 images in 7 sub-sets, 5 of them with parts
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        assert item["input_ids"].shape == item["labels"].shape
        assert item["pixel_values"].shape == (3, 128, 128)
        assert item["masks"].dtype == torch.bool and item["masks"].shape[1:] == (128, 128)
        mask_id = dataset.tokenizer.convert_tokens_to_ids("<mask>")
        assert int((item["input_ids"] == mask_id).sum()) == item["masks"].shape[0]
    assert dataset.record(0)["file_name"].startswith("images/")
    with pytest.raises(IndexError, match="out of range"):
        dataset.record(len(dataset))
    stage2 = next(i for i in range(len(dataset)) if dataset.subset(i).kind == "categories"
                  and len(dataset.sample(i).regions) >= 4)
    first = [t for _, t in dataset.sample(stage2).messages]
    assert first == [t for _, t in dataset.sample(stage2).messages]  # same epoch: same sample
    dataset.set_epoch(1)
    try:
        assert first != [t for _, t in dataset.sample(stage2).messages]  # new epoch: new region order
    finally:
        dataset.set_epoch(0)


def test_collator_pads_right_and_runs_through_the_tiny_model(dataset, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    items = [dataset[i] for i in (0, 9, 20, 40, 60)]
    batch = RegionCollator(tokenizer.pad_token_id)(items)
    lengths = [item["input_ids"].numel() for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, max(lengths))
    assert batch["pixel_values"].shape == (5, 3, 128, 128)
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["masks"][row], items[row]["masks"])
    assert batch["truncated"].tolist() == [False] * 5
    with torch.no_grad():
        out = model(**{key: batch[key] for key in MODEL_INPUT_KEYS})
    assert torch.isfinite(out.loss)


def test_count_fully_masked_reports_truncated_samples(model_and_tokenizer, caplog):
    model, tokenizer = model_and_tokenizer
    specs = manifest_subsets(FIXTURE, "train", names=["stage3_detailed", "stage3_pos_neg"])
    ok = RegionDataset(specs, tokenizer, model.config.vision, max_length=1024)
    assert count_fully_masked(ok) == []
    # Room for the system prompt and the image (~140 tokens with the tiny tokenizer) but for no answer (the
    # first answer starts after ~170): every item is fully masked.
    short = RegionDataset(specs, tokenizer, model.config.vision, max_length=model.config.vision.num_image_tokens + 100)
    with caplog.at_level(logging.WARNING, logger="osprey.data.dataset"):
        bad = count_fully_masked(short)
    assert bad == list(range(len(short)))
    assert "would train no token" in caplog.text
    item = short[0]
    assert item["fully_masked"] and item["truncated"] and (item["labels"] == IGNORE_INDEX).all()
    assert item["masks"].shape[0] == int((item["input_ids"] == tokenizer.convert_tokens_to_ids("<mask>")).sum())


def test_lengths_estimate_tracks_token_counts(dataset):
    estimates = np.asarray(dataset.lengths)
    assert dataset.lengths is dataset.lengths  # computed once
    actual = np.asarray([len(dataset.example(i).input_ids) for i in range(len(dataset))])
    assert estimates.shape == actual.shape
    assert np.corrcoef(estimates, actual)[0, 1] > 0.8
    assert (np.abs(estimates - actual) < 0.5 * actual).all()


def test_a_repeated_record_file_is_read_once_and_its_items_repeat(model_and_tokenizer):
    """A mix that lists a sub-set three times (`repeat: 3`) and reads another file as a second kind holds each
    item as often, from the same bytes: the index does not grow with the repeats."""
    from dataclasses import replace

    model, tokenizer = model_and_tokenizer
    specs = manifest_subsets(FIXTURE, "train", names=["stage3_pos_neg", "stage2_categories"])
    pos_neg, categories = sorted(specs, key=lambda s: s.stage, reverse=True)
    once = RegionDataset([pos_neg, categories], tokenizer, model.config.vision, max_length=1024)
    mixed = [pos_neg] * 3 + [categories, replace(categories, kind="referring")]
    repeated = RegionDataset(mixed, tokenizer, model.config.vision, max_length=1024)
    n_pos_neg = len(once) - len(RegionDataset([categories], tokenizer, model.config.vision))
    assert len(repeated) == 3 * n_pos_neg + 2 * (len(once) - n_pos_neg)
    assert repeated._blob.nbytes == once._blob.nbytes
    for copy in range(3):
        assert [repeated.record(copy * n_pos_neg + i) for i in range(n_pos_neg)] == \
            [once.record(i) for i in range(n_pos_neg)]
    assert repeated.subset(len(repeated) - 1).kind == "referring"
    assert repeated.record(len(repeated) - 1) == once.record(len(once) - 1)


def test_lengths_estimated_in_worker_processes_are_the_same(dataset, monkeypatch):
    import osprey.data.dataset as module

    monkeypatch.setattr(module, "_LENGTH_CHUNK", 7)  # several chunks on the fixture, the last one short
    assert len(dataset) > 3 * 7 and len(dataset) % 7
    assert dataset.estimate_lengths(workers=2) == dataset.estimate_lengths() == dataset.lengths


def test_task_prompt_samples_use_the_exact_inference_prompt():
    import numpy as np

    from osprey.data.records import parse_record
    from osprey.data.samples import build_sample
    from osprey.prompts import task_prompt

    box = [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]]
    record = parse_record({
        "id": 1, "file_name": "x.png", "height": 8, "width": 8,
        "annotation": [{"segmentation": box, "bbox": [1, 1, 4, 4]}, {"segmentation": box, "bbox": [1, 1, 4, 4]}],
        "description": ["<region1>: square", "<region2>: circle"],
    })
    seen = set()
    for seed in range(8):
        sample = build_sample(record, 3, "task_category", "/images", np.random.default_rng(seed))
        assert sample.messages[0] == ("human", task_prompt("category"))
        assert len(sample.regions) == 1 and sample.num_mask_tokens == 1
        seen.add(sample.messages[1][1])
    assert seen == {"square", "circle"}


def test_packed_masks_round_trip_through_a_worker():
    """One flat buffer per batch: views equal the stacks (sizes differ, Q = 0 included) after a worker and pinning."""
    from torch.utils.data import DataLoader

    from osprey.data.dataset import PackedMasks

    gen = torch.Generator().manual_seed(0)
    stacks = [torch.rand(3, 5, 7, generator=gen) > 0.5, torch.zeros(0, 4, 4, dtype=torch.bool),
              torch.rand(1, 9, 2, generator=gen) > 0.5]
    packed = PackedMasks.pack(stacks)
    assert len(packed) == 3 and packed.buffer.numel() == 3 * 35 + 18
    assert all(torch.equal(a, b) for a, b in zip(packed, stacks))
    assert [tuple(m.shape) for m in packed[1:]] == [(0, 4, 4), (1, 9, 2)]
    loader = DataLoader(stacks, batch_size=3, num_workers=1, collate_fn=PackedMasks.pack)
    (received,) = list(loader)
    assert isinstance(received, PackedMasks) and all(torch.equal(a, b) for a, b in zip(received, stacks))
    with pytest.raises(ValueError, match="does not hold"):
        PackedMasks(torch.zeros(5, dtype=torch.bool), [(1, 2, 2)])
    with pytest.raises(ValueError, match=r"\(Q, H, W\)"):
        PackedMasks.pack([torch.zeros(4, 4, dtype=torch.bool)])
