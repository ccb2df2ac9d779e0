"""Where a region's facts are inside the LLM when it answers a short-form question: per layer, linear probes on the
hidden state at each listed region's `<mask>` and `<pos>` slot and at the position that predicts the answer.

    python -m bench.slot_probe --model osprey/assets/builtin --data data/synth --split train --records 150

The short-answer form lists every region ("region1<mask><pos>,region2<mask><pos>. What color is region2?"). To
answer about region K a model has to (1) know at a slot which number it has, (2) know at the answer position which
number was asked, and (3) bring the K-th slot's content there. The probes say which of these holds, per layer
(layer 0 is the input embeddings):
- `number@mask`, `number@pos`: the slot's region number, read at its `<mask>` and at its `<pos>` (step 1);
- `LABEL@mask`, `LABEL@pos`: the region's label (`--label`, colour by default: a fact of the mask token, where the
  position and size are facts of the box token) at the same places: where a name read would find it;
- `asked_number@answer`: the asked region's number at the answer position, over every question that names a
  region (2); `asked_LABEL@answer`: the asked region's label there, over the questions that ask for that label
  (colour questions for `color`, "What is the object ..." for `category`): what the answer needs (3).
The records are renumbered first (`bench.region_eval.renumbered`: regions listed in a random order), so a slot's
number is not the turn of the question about it. Each probe is multinomial logistic regression
(`bench.token_norms.linear_probe_accuracy`) fitted on the first `--train-share` of the records and scored on the
rest; `majority` is the test rows' most common label's share.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.region_eval import (
    RENUMBER_SEED,
    question_type,
    region_label_names,
    renumbered,
    split_records,
    teacher_forced_turns,
)
from bench.token_norms import PROBE_LABELS, linear_probe_accuracy

# the short-form question type (`bench.region_eval.question_type`) that asks for each label
QUESTION_TYPE_OF_LABEL = {"category": "object", "color": "colour", "texture": "texture", "size": "size",
                          "position": "position"}


@dataclass(frozen=True)
class ProbeRow:
    """One position of one prompt: its hidden state after every layer and the label a probe should read there."""

    record: int  # index of the record it came from (the probe's train/test split is by record)
    states: list[torch.Tensor]  # (hidden_size,) per layer, layer 0 = the input embeddings
    label: str


def region_labels_in_order(record, categories: dict, referring: dict, label: str) -> list[str]:
    """`label` of each region of a (renumbered) short-form record, in its annotation order: read from the same
    image's category and referring records, whose regions are matched by their segmentation (two regions may share
    a box)."""
    category_record = categories[record.id]
    names = region_label_names(category_record, referring.get(record.id), label)  # none needed for the category
    by_shape = {segmentation_key(a): name for a, name in zip(category_record.annotation, names)}
    return [by_shape[segmentation_key(a)] for a in record.annotation]


def segmentation_key(region) -> str:
    return json.dumps(region.model_dump(exclude_none=True)["segmentation"], sort_keys=True)


@torch.no_grad()
def probe_rows(pipe, data: Path, split: str, records: int, label: str) -> dict[str, list[ProbeRow]]:
    """The rows of every probe over the split's first `records` short-form records (see the module's docstring)."""
    from osprey.data.samples import build_sample

    language_model, mask_id = pipe.model.language_model, pipe.model.config.mask_token_id
    categories = {r.id: r for r in split_records(data, split, "stage2_categories", None)}
    referring = {} if label == "category" else {r.id: r for r in split_records(data, split, "stage2_referring", None)}
    rng, order_rng = np.random.default_rng(0), np.random.default_rng(RENUMBER_SEED)
    rows: dict[str, list[ProbeRow]] = {name: [] for name in probe_names(label)}
    for index, original in enumerate(split_records(data, split, "stage3_short_form", records)):
        record = renumbered(original, order_rng)
        labels = region_labels_in_order(record, categories, referring, label)
        sample = build_sample(record, 3, "short_form", data, rng)
        turns = teacher_forced_turns(pipe, pipe.encode_image(data / record.file_name), record, sample)
        for number, turn in enumerate(turns):
            prompt = turn.prompt
            embeds = pipe.model.merge_embeddings(prompt.input_ids[None].to(pipe.device), prompt.image.tokens[None],
                                                 prompt.mask_tokens, prompt.pos_tokens)
            hidden = language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
            if number == 0:  # the first turn lists every slot; later turns repeat the same prefix
                slots = torch.nonzero(prompt.input_ids == mask_id).flatten().tolist()  # each <mask> then its <pos>
                for k, slot in enumerate(slots, start=1):
                    rows["number@mask"].append(ProbeRow(index, layer_states(hidden, slot), str(k)))
                    rows["number@pos"].append(ProbeRow(index, layer_states(hidden, slot + 1), str(k)))
                    rows[f"{label}@mask"].append(ProbeRow(index, layer_states(hidden, slot), labels[k - 1]))
                    rows[f"{label}@pos"].append(ProbeRow(index, layer_states(hidden, slot + 1), labels[k - 1]))
            if turn.named:  # "How many of the regions are red?" names none
                asked = turn.named[-1]
                rows["asked_number@answer"].append(ProbeRow(index, layer_states(hidden, -1), str(asked)))
                if question_type(turn.question) == QUESTION_TYPE_OF_LABEL[label]:
                    rows[f"asked_{label}@answer"].append(ProbeRow(index, layer_states(hidden, -1), labels[asked - 1]))
    return rows


def layer_states(hidden: tuple[torch.Tensor, ...], position: int) -> list[torch.Tensor]:
    """The hidden state at `position` of a one-prompt batch after every layer."""
    return [layer[0, position].float().cpu() for layer in hidden]


def probe_names(label: str) -> list[str]:
    return ["number@mask", "number@pos", f"{label}@mask", f"{label}@pos", "asked_number@answer",
            f"asked_{label}@answer"]


def probe_accuracies(rows: list[ProbeRow], train_share: float) -> dict:
    """Per layer, the test accuracy of a probe fitted on the rows of the first `train_share` of the records."""
    if not rows:
        raise ValueError("no rows")
    cut = int(np.ceil(train_share * (max(r.record for r in rows) + 1)))
    train, test = [r for r in rows if r.record < cut], [r for r in rows if r.record >= cut]
    if not train or not test:
        raise ValueError(f"{len(rows)} rows from too few records to split at {train_share}")
    labels = [r.label for r in test]
    accuracies = [linear_probe_accuracy(torch.stack([r.states[layer] for r in train]), [r.label for r in train],
                                        torch.stack([r.states[layer] for r in test]), labels, weight_decay=1e-2)
                  for layer in range(len(rows[0].states))]
    return {"accuracy_by_layer": accuracies, "majority": max(labels.count(v) for v in set(labels)) / len(labels),
            "n_train": len(train), "n_test": len(test)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder")
    parser.add_argument("--data", required=True, type=Path, help="an `osprey data synth` folder")
    parser.add_argument("--split", default="train", help="default train: only the probes are fitted, the model "
                                                          "is not; use a split the model never saw")
    parser.add_argument("--records", type=int, default=150, help="short-form records to read (default 150)")
    parser.add_argument("--label", default="color", choices=PROBE_LABELS)
    parser.add_argument("--train-share", type=float, default=0.7, help="records the probes are fitted on")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.records < 2 or not 0 < args.train_share < 1:
        parser.error("--records must be >= 2 and --train-share within (0, 1)")
    for name in ("stage3_short_form", "stage2_categories", "stage2_referring"):
        if not (args.data / args.split / f"{name}.json").is_file():
            parser.error(f"{args.data / args.split / name}.json does not exist")

    from osprey.inference import OspreyPipeline

    pipe = OspreyPipeline.from_pretrained(args.model, device=args.device)
    rows = probe_rows(pipe, args.data, args.split, args.records, args.label)
    result: dict[str, dict | None] = {}
    for name, found in rows.items():
        try:
            result[name] = value = probe_accuracies(found, args.train_share)
        except ValueError as exc:  # e.g. no colour question among the held-out records
            result[name] = None
            print(f"{name:24} not fitted: {exc}")
            continue
        layers = " ".join(f"{a:.2f}" for a in value["accuracy_by_layer"])
        print(f"{name:24} layers 0..{len(value['accuracy_by_layer']) - 1}: {layers}   majority "
              f"{value['majority']:.2f}  n={value['n_train']}/{value['n_test']}")
    if args.out:
        from bench.eval_all import write_atomic

        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
