"""Where a model looks when it answers a short-form question: the attention, at the position that predicts the
answer, over the `<mask><pos>` slots of the regions listed up front, per layer, by question type and by whether
the question names region 1 or a later one.

    python -m bench.slot_attention --model osprey/assets/builtin --data data/synth --split test --records 150

The short-answer form lists every region ("region1<mask><pos>,region2<mask><pos>. What color is region2?"), so an
answer about region K must be read from the K-th slot. Per (type, region1 | region2+, layer), averaged over the
questions and the heads: `total`, the share of the attention that goes to any region slot, and `share`, the part of
that which goes to the asked region's slot (1 / number of regions when it is spread evenly). A type whose last
layers give the asked slot a large `share` reads the named region there; one that does so only for region 1 reads
whichever slot comes first (docs/finetune.md, "Diagnosis": version 6 reads colour so).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bench.region_eval import question_type, split_records, teacher_forced_turns


def slot_attention(pipe, data: Path, split: str, records: int) -> dict[str, dict[str, float]]:
    """`{type}:{region1|region2+}:layer{L}` -> {share, total, n} over the first `records` short-form records."""
    language_model = pipe.model.language_model
    kept = language_model.config._attn_implementation
    language_model.config._attn_implementation = "eager"  # attention weights are returned
    try:
        return _slot_attention(pipe, language_model, data, split, records)
    finally:
        language_model.config._attn_implementation = kept


@torch.no_grad()
def _slot_attention(pipe, language_model, data: Path, split: str, records: int) -> dict[str, dict[str, float]]:
    from osprey.data.samples import build_sample

    mask_id = pipe.model.config.mask_token_id
    rng = np.random.default_rng(0)
    found: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"share": [], "total": []})
    for record in split_records(data, split, "stage3_short_form", records):
        sample = build_sample(record, 3, "short_form", data, rng)
        encoded = pipe.encode_image(data / record.file_name)
        for turn in teacher_forced_turns(pipe, encoded, record, sample):
            if turn.slot is None:  # "How many of the regions are red?" asks about all of them
                continue
            ids = turn.prompt.input_ids.to(pipe.device)
            embeds = pipe.model.merge_embeddings(ids[None], turn.prompt.image.tokens[None], turn.prompt.mask_tokens,
                                                 turn.prompt.pos_tokens)
            attentions = language_model(inputs_embeds=embeds, output_attentions=True).attentions
            slots = torch.nonzero(ids == mask_id).flatten()  # each <mask> is followed by its <pos>
            key = f"{question_type(turn.question)}:{turn.slot}"
            for layer, weights in enumerate(attentions):
                last = weights[0, :, -1].float().mean(0)  # heads averaged, the answer-predicting position
                per_slot = last[slots] + last[slots + 1]
                total = float(per_slot.sum())
                found[f"{key}:layer{layer}"]["share"].append(float(per_slot[turn.named[-1] - 1]) / max(total, 1e-12))
                found[f"{key}:layer{layer}"]["total"].append(total)
    return {key: {"share": float(np.mean(v["share"])), "total": float(np.mean(v["total"])), "n": len(v["share"])}
            for key, v in sorted(found.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder")
    parser.add_argument("--data", required=True, type=Path, help="an `osprey data synth` folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--records", type=int, default=150, help="short-form records to read (default 150)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.records < 1:
        parser.error(f"--records must be >= 1, got {args.records}")
    if not (args.data / args.split / "stage3_short_form.json").is_file():
        parser.error(f"{args.data / args.split / 'stage3_short_form.json'} does not exist")

    from osprey.inference import OspreyPipeline

    pipe = OspreyPipeline.from_pretrained(args.model, device=args.device)
    result = slot_attention(pipe, args.data, args.split, args.records)
    for key, value in result.items():
        print(f"{key:28} share {value['share']:.2f}  total {value['total']:.3f}  n={value['n']}")
    if args.out:
        from bench.eval_all import write_atomic

        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
