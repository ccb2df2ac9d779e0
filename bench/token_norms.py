"""Sizes of what the LLM reads: word embeddings, image tokens, mask and position tokens (and how alike the
region tokens of one image are). A model whose region tokens dwarf the word embeddings, or are nearly parallel,
cannot tell regions apart: check this after each training stage.

    python -m bench.token_norms --model runs/builtin/stage2/final --data data/synth --split val --images 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def token_statistics(pipe, data: Path, split: str, images: int) -> dict[str, float]:
    """Mean norms of each kind of token, and the mean pairwise cosine of the region tokens within an image."""
    from bench.region_eval import split_records
    from osprey.data.records import record_masks

    norms: dict[str, list[float]] = {"mask": [], "pos": [], "image": [], "mask_cos": [], "pos_cos": []}
    for record in split_records(data, split, "stage2_categories", images):
        encoded = pipe.encode_image(data / record.file_name)
        mask_tokens, pos_tokens = pipe.region_tokens(encoded, record_masks(record))
        norms["image"].append(float(encoded.tokens.float().norm(dim=-1).mean()))
        for name, tokens in (("mask", mask_tokens.float()), ("pos", pos_tokens.float())):
            norms[name] += tokens.norm(dim=-1).tolist()
            if len(tokens) > 1:
                unit = torch.nn.functional.normalize(tokens, dim=-1)
                cos = unit @ unit.T
                norms[f"{name}_cos"].append(float(cos[~torch.eye(len(tokens), dtype=torch.bool)].mean()))
    words = pipe.model.get_input_embeddings().weight.detach().float().norm(dim=-1)
    result = {"word_embedding_norm": float(words.mean())}
    result.update({f"{k}_norm" if not k.endswith("cos") else f"{k}ine": float(np.mean(v)) for k, v in norms.items() if v})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path, help="an `osprey data synth` folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from osprey.inference import OspreyPipeline

    pipe = OspreyPipeline.from_pretrained(args.model, device=args.device)
    print(json.dumps(token_statistics(pipe, args.data, args.split, args.images), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
