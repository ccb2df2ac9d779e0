"""Greedy tokens of the engine (all regions decoded together) against transformers' `generate` (each image's
regions in one batch of identical-length prompts, no padding), at the real shapes on a GPU.

    python -m bench.engine_parity --preset osprey-7b --images 4 --masks 16 --new-tokens 64

Reports the share of equal tokens (position by position) and, for each row that diverges, where, with the
reference's top-2 logit gap at that step: with random bf16 weights the logits of near-tied tokens differ in the
last bits between two correct implementations, so a divergence at a small gap is rounding, not a bug.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.describe_speed import add_model_arguments
from bench.serve_workload import build_pipeline, make_workload
from osprey.generation import SamplingParams
from osprey.prompts import task_prompt


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--fast-kernels", action="store_true",
                        help="decode with the Triton decoding kernels and compiled layers (docs/engine.md)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    pipe = build_pipeline(args.preset, args.model, args.device, args.dtype)
    pipe.eos_token_id = -1
    workload = make_workload(args.images, args.masks, 1, seed=7)
    prompts = []
    for (request,) in workload.clients:
        encoded = pipe.encode_image(request.image)
        prompts += pipe.prepare_each(encoded, [("human", task_prompt("short"))], request.masks)
    ours = _engine_tokens(pipe, prompts, args.new_tokens, args.fast_kernels)
    rows = []
    for start in range(0, len(prompts), args.masks):
        rows += _reference(pipe, prompts[start:start + args.masks], args.new_tokens)
    report = _compare(ours, rows, args)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _engine_tokens(pipe, prompts, new_tokens: int, fast_kernels: bool) -> list[list[int]]:
    """All regions decoded together by one engine session."""
    session = pipe.session(pipe.engine_pool(len(prompts), new_tokens + 256), fast_kernels=fast_kernels)
    if fast_kernels:
        forward = session.decoder.forward
        print(f"Triton decoding kernels: {forward.decode_kernel}; compiled layers: {forward.fused is not None}")
    session.add(pipe.group_requests(prompts, [SamplingParams(max_new_tokens=new_tokens)] * len(prompts)))
    ours: list[list[int]] = [[] for _ in prompts]
    while session.has_work:
        for event in session.step():
            if event.token_id is not None:
                ours[event.row].append(event.token_id)
    return ours


@torch.inference_mode()
def _reference(pipe, prompts, new_tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    embeds = torch.cat([pipe.model.merge_embeddings(p.input_ids[None].to(pipe.device), p.image.tokens[None],
                                                    p.mask_tokens, p.pos_tokens) for p in prompts])
    out = pipe.model.language_model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=pipe.device),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, dim=1).float()  # (B, steps, V)
    top2 = scores.topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).cpu()
    return [(out.sequences[i].tolist(), gaps[i]) for i in range(len(prompts))]


def _compare(ours, reference, args) -> dict:
    equal = total = 0
    divergences = []
    for row, (tokens, (ref, gaps)) in enumerate(zip(ours, reference)):
        equal += sum(a == b for a, b in zip(tokens, ref))
        total += len(ref)
        first = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
        if first is not None:
            divergences.append({"row": row, "step": first, "reference_top2_gap": float(gaps[first]),
                                "median_gap": float(gaps.median())})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "preset": args.model or args.preset, "fast_kernels": args.fast_kernels, "rows": len(ours), "new_tokens": args.new_tokens,
            "equal_token_share": equal / total, "rows_identical": len(ours) - len(divergences),
            "divergences": divergences}


if __name__ == "__main__":
    main()
