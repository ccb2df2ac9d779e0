"""Segmentation metrics: panoptic quality (panopticapi definitions), semantic mIoU (detectron2's
SemSegEvaluator definitions) and instance mask AP (pycocotools COCOeval, `segm`).

Panoptic maps here are integer id maps `(H, W)` with 0 = VOID, plus a dict id -> segment info. Semantic maps
are `(H, W)` ints with class indices 0..K-1 and `ignore_index` for void pixels.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

VOID = 0
_OFFSET = 1 << 32  # combined (gt, pred) id key; ids fit in 32 bits


@dataclass
class _PQCat:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


@dataclass
class PanopticQuality:
    """Accumulates panopticapi's per-category TP/FP/FN/IoU-sum over images; `summary()` gives PQ/SQ/RQ.

    categories: category id -> isthing. GT segments: id -> {"category_id", "iscrowd"}; predicted segments:
    id -> {"category_id"}. Rules (panopticapi `pq_compute_single_core`): a GT/pred pair matches when the
    categories agree, the GT is not crowd and IoU > 0.5, where the union leaves out the prediction's overlap
    with VOID; unmatched non-crowd GT segments are FN; an unmatched prediction is FP unless more than half of
    it lies on VOID or on crowd regions of its own category.
    """

    categories: Mapping[int, bool]
    _stats: dict[int, _PQCat] = field(default_factory=lambda: defaultdict(_PQCat))

    def add(
        self,
        gt_map: np.ndarray,
        gt_segments: Mapping[int, Mapping],
        pred_map: np.ndarray,
        pred_segments: Mapping[int, Mapping],
    ) -> None:
        """gt_map, pred_map: (H, W) int segment ids (0 = VOID)."""
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"GT map {gt_map.shape} and prediction map {pred_map.shape} differ in size")
        for sid, seg in pred_segments.items():
            if seg["category_id"] not in self.categories:
                raise ValueError(f"predicted segment {sid} has unknown category {seg['category_id']}")
        gt_ids, gt_areas = np.unique(gt_map, return_counts=True)
        pred_ids, pred_areas = np.unique(pred_map, return_counts=True)
        gt_area = {int(i): int(a) for i, a in zip(gt_ids, gt_areas) if i != VOID}
        pred_area = {int(i): int(a) for i, a in zip(pred_ids, pred_areas) if i != VOID}
        missing = set(gt_area) - set(gt_segments)
        if missing:
            raise ValueError(f"GT map holds segment ids {sorted(missing)} that have no segment info")
        unknown = set(pred_area) - set(pred_segments)
        if unknown:
            raise ValueError(f"prediction map holds segment ids {sorted(unknown)} that have no segment info")

        combined = gt_map.astype(np.int64) * _OFFSET + pred_map.astype(np.int64)
        keys, counts = np.unique(combined, return_counts=True)
        inter = {(int(k // _OFFSET), int(k % _OFFSET)): int(c) for k, c in zip(keys, counts)}

        gt_matched, pred_matched = set(), set()
        for (g, p), n in inter.items():
            if g == VOID or p == VOID or g not in gt_area or p not in pred_area:
                continue
            gseg, pseg = gt_segments[g], pred_segments[p]
            if gseg.get("iscrowd", 0) == 1 or gseg["category_id"] != pseg["category_id"]:
                continue
            union = pred_area[p] + gt_area[g] - n - inter.get((VOID, p), 0)
            iou = n / union
            if iou > 0.5:
                st = self._stats[gseg["category_id"]]
                st.tp += 1
                st.iou += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_by_cat: dict[int, int] = {}
        for g in gt_area:
            seg = gt_segments[g]
            if seg.get("iscrowd", 0) == 1:
                crowd_by_cat[seg["category_id"]] = g  # panopticapi keeps one crowd segment per category
                continue
            if g not in gt_matched:
                self._stats[seg["category_id"]].fn += 1
        for p, area in pred_area.items():
            if p in pred_matched:
                continue
            cat = pred_segments[p]["category_id"]
            ignored = inter.get((VOID, p), 0)
            if cat in crowd_by_cat:
                ignored += inter.get((crowd_by_cat[cat], p), 0)
            if ignored / area > 0.5:
                continue
            self._stats[cat].fp += 1

    def summary(self) -> dict[str, dict]:
        """{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {cat: {...}}}; values in [0, 1].

        A category with no TP, FP or FN is left out of the averages (panopticapi's `n`)."""
        per_class = {}
        for cat, st in self._stats.items():
            denom = st.tp + 0.5 * st.fp + 0.5 * st.fn
            if denom == 0:
                continue
            per_class[cat] = {
                "pq": st.iou / denom,
                "sq": st.iou / st.tp if st.tp else 0.0,
                "rq": st.tp / denom,
                "tp": st.tp,
                "fp": st.fp,
                "fn": st.fn,
            }
        out: dict[str, dict] = {}
        for name, keep in (("All", None), ("Things", True), ("Stuff", False)):
            cats = [
                c for c in self.categories if c in per_class and (keep is None or self.categories[c] == keep)
            ]
            n = len(cats)
            out[name] = {
                k: (sum(per_class[c][k] for c in cats) / n if n else 0.0) for k in ("pq", "sq", "rq")
            } | {"n": n}
        out["per_class"] = per_class
        return out


class SemanticConfusion:
    """detectron2 SemSegEvaluator: confusion over K classes; void GT pixels are ignored entirely."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)  # [pred, gt]

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: (H, W) class indices; gt == ignore_index is void."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and GT {gt.shape} differ in size")
        k = self.num_classes
        gt = gt.astype(np.int64).copy()
        void = gt == self.ignore_index
        if ((gt[~void] < 0) | (gt[~void] >= k)).any():  # checked before void maps to k: k itself is no class
            raise ValueError(f"GT class indices must be in [0, {k}) or {self.ignore_index}")
        gt[void] = k
        pred = pred.astype(np.int64)
        if pred.min() < 0 or pred.max() >= k:
            raise ValueError(f"predicted class indices must be in [0, {k})")
        self.matrix += np.bincount(
            (k + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=(k + 1) ** 2
        ).reshape(k + 1, k + 1)

    def summary(self) -> dict:
        """{"miou", "fwiou", "macc", "pacc", "iou": list (nan = class absent from GT)}; values in [0, 1]."""
        m = self.matrix[:-1, :-1].astype(np.float64)
        tp = np.diag(m)
        pos_gt = m.sum(axis=0)
        pos_pred = m.sum(axis=1)
        acc_valid = pos_gt > 0
        union = pos_gt + pos_pred - tp
        iou_valid = acc_valid & (union > 0)
        iou = np.full(self.num_classes, np.nan)
        acc = np.full(self.num_classes, np.nan)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        total = pos_gt.sum()
        weights = pos_gt / total if total else pos_gt
        return {
            "miou": float(np.mean(iou[iou_valid])) if iou_valid.any() else 0.0,
            "fwiou": float(np.sum(iou[iou_valid] * weights[iou_valid])),
            "macc": float(np.mean(acc[acc_valid])) if acc_valid.any() else 0.0,
            "pacc": float(tp.sum() / total) if total else 0.0,
            "iou": iou.tolist(),
        }


def mask_ap(
    gt_images: Iterable[dict],
    gt_annotations: list[dict],
    categories: list[dict],
    detections: list[dict],
) -> dict[str, float]:
    """COCOeval `segm` over in-memory data; returns AP, AP50, AP75, APs, APm, APl in [0, 1] (-1: undefined).

    gt_annotations: COCO dicts with RLE `segmentation`, `area`, `bbox`, `iscrowd`, `image_id`, `category_id`;
    detections: {"image_id", "category_id", "segmentation" (RLE), "score"}.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    gt = COCO()
    anns = [dict(a, id=i + 1) for i, a in enumerate(gt_annotations)]
    gt.dataset = {"images": list(gt_images), "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not detections or not anns:
            return {n: (0.0 if anns else -1.0) for n in names}
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {n: float(v) for n, v in zip(names, ev.stats[:6])}
