"""Region-level accuracy of one or more models on a generated dataset's split, split by how hard the region is
for a box: the paper's kind of ablation (mask vs box, with/without position token, multi-level vs res4 only).

    python -m bench.region_eval --data data/synth --split test --model full=runs/builtin/stage3/final \
        --model box=runs/abl_box/stage3/final --out runs/region_eval

Per model, greedy decoding, every question teacher-forced on the ground-truth history:
- category: the official category prompt per region of `stage2_categories` (exact match after normalisation),
  overall, per category (`category:<name>`) and by the region's visible area (`category:area<500`, ...);
- attributes: the short-form questions of `stage3_short_form` by type (object, colour, size, texture, ...), and
  by the listed region they ask about (`short_form:colour:region1`, `short_form:colour:region2+`): the form lists
  every region up front and names one, so a model may read the named region's shape yet another one's colour;
  and the same questions with the regions renumbered (`short_form_renumbered:...`: the record's regions listed in
  a seeded random order, every `<regionK>` renamed to match). Datasets generated before 7 December 2026 ask about
  regions in ascending number, so in their records the t-th question is mostly about region t; a model that reads
  the slot by the question's turn rather than by the name it is given scores well there and falls on the
  renumbered copy (the generator now asks in a random order, where both copies test the read by name);
- positive/negative: the yes/no questions of `stage3_pos_neg`, overall and by what they ask about
  (`pos_neg:colour`, `pos_neg:position`, `pos_neg:object`, ...), with the share answered "yes"
  (`pos_neg:answered_yes`) beside the share whose truth is yes (`pos_neg:truth_yes`).
- inline (`--inline color ...`, colour by default): each attribute of every region asked of that region alone, as
  `osprey serve` sends a custom question ("What is the color of `<region>`?"), the truth read from the region's
  referring expression (`inline:color`, ...): where the short-answer form has to tell the listed regions apart by
  number, this has one region in the prompt;
- wordings (`--wordings FILE`): the category asked in each of the file's wordings (one per line, `<region>` for the
  region; sent as `osprey serve` sends a custom question), `wording:<i>` per line of the file and `wording:all`;
  an answer counts when it is the category after normalisation, a leading article dropped.
Each accuracy is also given for regions whose box overlaps another region's box (IoU > 0) and for regions that
share their box with another region (IoU >= 0.9): there the box cannot tell the regions apart, the mask can.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from bench.eval_all import write_atomic

if TYPE_CHECKING:
    from osprey.inference import PreparedPrompt

INLINE_ATTRIBUTES = ("color", "texture", "size", "position")  # what the generated referring expressions name
QUESTION_TYPES = (
    ("colour", re.compile(r"\bcolou?r\b|\bis .* (red|green|blue|yellow|orange|purple|pink|brown|black|white|gray|cyan)\b")),
    ("size", re.compile(r"\bsize\b|\b(small|medium|large)\b")),
    ("texture", re.compile(r"\btexture\b|\b(solid|striped|dotted|checkered)\b")),
    ("position", re.compile(r"\b(where|left|right|top|bottom|center|image)\b")),
    ("count", re.compile(r"\bhow many\b")),
    ("object", re.compile(r"\bobject\b|\bis there an? \b|\bcategory\b|\bpart\b")),
)


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9: ]", "", text.lower().replace("_", " ")).strip()


def yes_no(text: str) -> str:
    words = normalise(text).split()
    return "no" if words and words[0] in ("no", "not") else "yes" if words and words[0] == "yes" else "other"


def question_type(question: str) -> str:
    q = question.lower()
    return next((name for name, pattern in QUESTION_TYPES if pattern.search(q)), "other")


def box_iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def overlap_flags(record) -> list[tuple[bool, bool]]:
    """Per region: (its box overlaps another region's box, it shares its box with another region)."""
    boxes = [r.bbox for r in record.annotation]
    out = []
    for i, box in enumerate(boxes):
        ious = [box_iou(box, other) for j, other in enumerate(boxes) if j != i]
        out.append((any(v > 0 for v in ious), any(v >= 0.9 for v in ious)))
    return out


AREA_BUCKETS = (500, 2000)  # region pixels (visible mask): under ~22 x 22, up to ~45 x 45, larger


def area_bucket(pixels: int) -> str:
    """'area<500', 'area500-2000' or 'area>=2000' (with AREA_BUCKETS): where small regions lose their category."""
    low, high = AREA_BUCKETS
    return f"area<{low}" if pixels < low else f"area{low}-{high}" if pixels < high else f"area>={high}"


class Tally:
    def __init__(self) -> None:
        self.hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(self, key: str, correct: bool, overlap: tuple[bool, bool] | None = None) -> None:
        keys = [key]
        if overlap is not None:
            keys += [f"{key}@overlap"] * overlap[0] + [f"{key}@same_box"] * overlap[1]
        for k in keys:
            self.hits[k][0] += int(correct)
            self.hits[k][1] += 1

    def result(self) -> dict[str, dict[str, float]]:
        return {k: {"accuracy": h / n, "n": n} for k, (h, n) in sorted(self.hits.items())}


RENUMBER_SEED = 20261207  # the order of the renumbered copies (`short_form_renumbered`)


def split_records(data: Path, split: str, name: str, limit: int | None):
    """The first `limit` records (all with None) of a generated dataset's `<split>/<name>.json`."""
    from osprey.data.records import iter_records

    path = data / split / f"{name}.json"
    for count, (_, record) in enumerate(iter_records(path)):
        if limit is not None and count >= limit:
            return
        yield record


def category_scores(record, answers: list[str]) -> list[tuple[bool, tuple[bool, bool]]]:
    """Per `"<regionK>: label"` description entry of a `stage2_categories` record: (whether the answer for
    region K, `answers[K - 1]` with `answers` in annotation order, matches the label; region K's overlap flags).
    Entries bind to their region by K, whatever order the description lists them in."""
    from osprey.data.samples import region_descriptions

    if len(answers) != len(record.annotation):
        raise ValueError(f"record {record.id}: {len(answers)} answer(s) for {len(record.annotation)} region(s)")
    flags = overlap_flags(record)
    return [(normalise(answers[k - 1]) == normalise(label), flags[k - 1]) for k, label in region_descriptions(record)]


def read_wordings(path: Path) -> list[str]:
    """The questions of a wordings file (blank lines and `#` comments skipped); each must name `<region>`."""
    from osprey.prompts import CUSTOM_REGION_TAG

    wordings = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    bad = [w for w in wordings if CUSTOM_REGION_TAG not in w]
    if not wordings or bad:
        raise ValueError(f"{path}: every wording must contain {CUSTOM_REGION_TAG} (and there must be one): {bad[:1]}")
    return wordings


def without_article(text: str) -> str:
    return re.sub(r"^(a|an|the) ", "", normalise(text))


def region_label_names(record, referring, label: str) -> list[str]:
    """Per region of a `stage2_categories` record, in annotation order: its category, or one attribute read from
    the same region's generated referring expression (`referring`: the image's `stage2_referring` record)."""
    from data_tools.synth.coco_export import referring_attributes
    from osprey.data.samples import region_descriptions

    if label == "category":
        return [a.category_name for a in record.annotation]
    phrases, categories = dict(region_descriptions(referring)), dict(region_descriptions(record))
    return [referring_attributes(phrases[k], categories[k]).get(label, "none")
            for k in range(1, len(record.annotation) + 1)]


def inline_scores(pipe, data: Path, split: str, records: list, attributes: list[str], params, tally: Tally) -> None:
    """Each attribute of every region of `records` asked of that region alone, as `osprey serve` sends a custom
    question (`inline:<name>`): the prompt holds no other region, so nothing has to be told apart by its number.
    Regions without the attribute (a composite object's texture) are not asked."""
    from osprey.data.records import record_masks

    wanted = {record.id for record in records}
    referring = {r.id: r for r in split_records(data, split, "stage2_referring", None) if r.id in wanted}
    for record in tqdm(records, desc="inline", leave=False):
        masks = record_masks(record)
        encoded = pipe.encode_image(data / record.file_name)
        for name in attributes:
            truths = region_label_names(record, referring[record.id], name)
            asked = [k for k, truth in enumerate(truths) if truth != "none"]
            answers = pipe.describe(encoded, [masks[k] for k in asked], task=inline_question(name), params=params)
            for k, answer in zip(asked, answers, strict=True):
                tally.add(f"inline:{name}", without_article(answer.text) == normalise(truths[k]))


def inline_question(name: str) -> str:
    """The question `inline_scores` asks: one of the converted records' own wordings (the attribute is measured,
    not the wording)."""
    from data_tools.converters.attributes import ATTRIBUTE_QUESTIONS
    from osprey.prompts import CUSTOM_REGION_TAG

    return ATTRIBUTE_QUESTIONS[1].format(name=name, region=CUSTOM_REGION_TAG)


def wording_scores(pipe, data: Path, records: list, wordings: list[str], params, tally: Tally) -> None:
    """The category of every region of `records` asked in each wording (`wording:<i>`, `wording:all`)."""
    from osprey.data.records import record_masks
    from osprey.data.samples import region_descriptions

    for record in tqdm(records, desc="wordings", leave=False):
        masks = record_masks(record)
        encoded = pipe.encode_image(data / record.file_name)
        labels = dict(region_descriptions(record))
        for index, wording in enumerate(wordings):
            answers = pipe.describe(encoded, masks, task=wording, params=params)
            for k, answer in enumerate(answers, start=1):
                correct = without_article(answer.text) == normalise(labels[k])
                tally.add(f"wording:{index}", correct)
                tally.add("wording:all", correct)


@dataclass(frozen=True)
class Turn:
    """One question of a record, teacher-forced on the ground-truth conversation before it."""

    prompt: PreparedPrompt
    truth: str  # the ground-truth answer
    question: str  # the record's own wording, regions named <regionK>
    named: list[int]  # the region numbers K the question names, in order

    @property
    def slot(self) -> str | None:
        """Which listed region it asks about: "region1" or "region2+" (None when it names none: "How many ...")."""
        return None if not self.named else "region1" if self.named[-1] == 1 else "region2+"


def teacher_forced_turns(pipe, encoded, record, sample) -> list[Turn]:
    """Every question of `sample` (built from `record`) with the conversation before it and the masks it has named
    so far, prepared on the encoded image."""
    masks = sample.masks()
    questions = [t.value for t in record.conversations if t.speaker == "human"]
    turns = []
    for turn in range(0, len(sample.messages), 2):
        history = sample.messages[: turn + 1]
        used = sum(text.count("<mask>") for _, text in history)
        question = questions[turn // 2]
        turns.append(Turn(pipe.prepare(encoded, history, masks[:used]), sample.messages[turn + 1][1], question,
                          [int(k) for k in re.findall(r"<region(\d+)>", question)]))
    return turns


def evaluate(pipe, data: Path, split: str, limit: int | None, max_new_tokens: int,
             wordings: list[str] | None = None, only_wordings: bool = False, wordings_limit: int | None = None,
             inline: list[str] | None = None) -> dict:
    from osprey.data.records import record_masks
    from osprey.data.samples import build_sample, region_descriptions
    from osprey.inference import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    tally = Tally()
    rng = np.random.default_rng(0)
    if wordings:
        records = list(split_records(data, split, "stage2_categories", wordings_limit or limit))
        wording_scores(pipe, data, records, wordings, params, tally)
        if only_wordings:
            return tally.result()
    category_records = list(split_records(data, split, "stage2_categories", limit))
    if inline:
        inline_scores(pipe, data, split, category_records, inline, params, tally)
    for record in tqdm(category_records, desc="category", leave=False):
        masks = record_masks(record)
        answers = pipe.describe(data / record.file_name, masks, task="category", params=params)
        areas = masks.sum(axis=(1, 2))
        entries = region_descriptions(record)  # category_scores' order
        for (correct, flags), (k, label) in zip(category_scores(record, [answer.text for answer in answers]), entries):
            tally.add("category", correct, flags)
            tally.add(f"category:{normalise(label)}", correct)  # which categories are missed
            tally.add(f"category:{area_bucket(int(areas[k - 1]))}", correct)  # and how small they are
    order_rng = np.random.default_rng(RENUMBER_SEED)
    for name, kind in (("stage3_short_form", "short_form"), ("stage3_pos_neg", "pos_neg")):
        for record in tqdm(list(split_records(data, split, name, limit)), desc=kind, leave=False):
            encoded = pipe.encode_image(data / record.file_name)
            variants = [(kind, record)]
            if kind == "short_form":
                variants.append(("short_form_renumbered", renumbered(record, order_rng)))
            for prefix, variant in variants:
                sample = build_sample(variant, 3, kind, data, rng)
                turns = teacher_forced_turns(pipe, encoded, variant, sample)
                answers = [answer.raw_text for answer in pipe.generate([t.prompt for t in turns], params)]
                _tally_turns(tally, prefix, turns, answers, overlap_flags(variant))
    return tally.result()


def _tally_turns(tally: Tally, prefix: str, turns: list[Turn], answers: list[str],
                 flags: list[tuple[bool, bool]]) -> None:
    for turn, answer in zip(turns, answers, strict=True):
        qtype, truth, slot = question_type(turn.question), turn.truth, turn.slot
        overlap = flags[turn.named[-1] - 1] if turn.named else None
        if prefix == "pos_neg":
            said, expected = yes_no(answer), yes_no(truth)
            tally.add("pos_neg", said == expected, overlap)
            tally.add(f"pos_neg:{qtype}", said == expected)  # colour, position, object, ...
            # the share of questions answered "yes" (and of those whose truth is yes): a model that guesses
            # shows up here even when its accuracy looks like a half-learned skill
            tally.add("pos_neg:answered_yes", said == "yes")
            tally.add("pos_neg:truth_yes", expected == "yes")
            continue
        correct = normalise(answer) == normalise(truth)
        tally.add(f"{prefix}:{qtype}", correct, overlap)
        if slot is not None:  # which listed region it asks about: region 1 or a later one
            tally.add(f"{prefix}:{qtype}:{slot}", correct)
        if qtype in ("colour", "size", "texture") and prefix == "short_form":
            tally.add("attribute", correct, overlap)


def renumbered(record, rng: np.random.Generator):
    """`record` with its regions listed in a random order: `<regionK>` (questions) and `regionK` (answers) renamed
    so that every question still asks about the same region, now under another number."""
    from osprey.data.records import parse_record

    order = [int(i) for i in rng.permutation(len(record.annotation))]  # new position -> old index
    new_number = {old + 1: new + 1 for new, old in enumerate(order)}
    obj = record.to_json()
    obj["annotation"] = [obj["annotation"][old] for old in order]
    for turn in obj.get("conversations") or []:
        turn["value"] = re.sub(r"(<?region)(\d+)\b", lambda m: f"{m.group(1)}{new_number[int(m.group(2))]}",
                               turn["value"])
    return parse_record(obj)


def markdown(results: dict[str, dict], warnings: dict[str, str] | None = None) -> str:
    models = list(results)
    keys = sorted({k for r in results.values() for k in r}, key=lambda k: (k.split("@")[0], k))
    lines = ["| metric | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for key in keys:
        cells = []
        for m in models:
            v = results[m].get(key)
            cells.append(f"{100 * v['accuracy']:.1f} (n={v['n']})" if v else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for name, text in (warnings or {}).items():
        lines += ["", f"**Warning ({name}): not a held-out evaluation.** {text}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="an `osprey data synth` folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--out", required=True, type=Path, help="output folder (region_eval.json / .md)")
    parser.add_argument("--limit", type=int, default=None, help="records per sub-set")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--wordings", type=Path, default=None,
                        help="also ask the category in each wording of this file (e.g. bench/category_wordings.txt)")
    parser.add_argument("--inline", nargs="*", default=["color"], choices=INLINE_ATTRIBUTES, metavar="NAME",
                        help=f"also ask these attributes of each region alone, as `osprey serve` sends a custom "
                             f"question (`inline:NAME`; any of {', '.join(INLINE_ATTRIBUTES)}; default: color; "
                             f"none: `--inline` alone)")
    parser.add_argument("--only-wordings", action="store_true", help="with --wordings: skip the other sub-sets")
    parser.add_argument("--wordings-limit", type=int, default=None, help="records asked in every wording "
                                                                          "(default: --limit)")
    args = parser.parse_args(argv)
    try:
        wordings = read_wordings(args.wordings) if args.wordings else None
    except (OSError, ValueError) as exc:
        parser.error(str(exc))

    from osprey.data.provenance import training_overlap
    from osprey.inference import OspreyPipeline

    results: dict[str, dict] = {}
    warnings: dict[str, str] = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--model wants NAME=DIR, got {spec!r}")
        pipe = OspreyPipeline.from_pretrained(path, device=args.device)
        contamination = training_overlap(pipe.config.training_data, args.data, args.split)
        if contamination:
            print(f"warning: {name}: {contamination}", file=sys.stderr, flush=True)
            warnings[name] = contamination
        results[name] = evaluate(pipe, args.data, args.split, args.limit, args.max_new_tokens, wordings,
                                 args.only_wordings, args.wordings_limit, args.inline)
        print(name, json.dumps({k: round(v["accuracy"], 4) for k, v in results[name].items()}), flush=True)
    write_atomic(args.out / "region_eval.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.out / "region_eval.md", markdown(results, warnings))
    print(markdown(results, warnings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
