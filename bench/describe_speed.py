"""Region-description throughput: our pipeline (image encoded once, regions batched, shared prefix prefilled once)
against the official flow (one region per call: preprocess, encode the image, HF `generate` at batch 1).

Both decode exactly --new-tokens tokens per region (EOS disabled), greedy, same weights, same device, same run.

    python bench/describe_speed.py --preset osprey-7b --device cuda --regions 16 --new-tokens 64
    python bench/describe_speed.py --model DIR --device cpu --regions 8 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def add_model_arguments(parser: argparse.ArgumentParser, preset: str = "osprey-7b") -> None:
    """The options `build_pipeline` reads: random weights of a preset's shapes, or a model folder; device; dtype."""
    parser.add_argument("--preset", default=preset, help="random weights of this preset's shapes")
    parser.add_argument("--model", default=None, help="a model folder instead of a random preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")


def build_pipeline(args):
    from osprey.checkpoint import build_model
    from osprey.config import OspreyConfig
    from osprey.devices import resolve_device, resolve_dtype
    from osprey.inference import OspreyPipeline
    from osprey.tokenization import train_tokenizer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        return OspreyPipeline.from_pretrained(args.model, device=device, dtype=dtype)
    config = OspreyConfig.from_preset(args.preset)
    # A tokenizer of the preset's vocabulary size trained offline; random weights make the text meaningless, the
    # shapes and the amount of work are the real ones.
    from osprey.checkpoint import synthetic_tokenizer_corpus

    tokenizer = train_tokenizer(synthetic_tokenizer_corpus(config.vocab_size), config.vocab_size)
    torch.manual_seed(0)
    model = build_model(config, device=device).to(dtype)
    return OspreyPipeline(model, tokenizer, max_batch_size=args.regions)


def official_flow(pipe, image, masks, new_tokens: int) -> float:
    """One region per call, as the official demo and eval scripts do."""
    from osprey.prompts import task_prompt

    device = pipe.device
    lm = pipe.model.language_model
    start = time.perf_counter()
    for q in range(masks.shape[0]):
        enc = pipe.encode_image(image)  # the official code re-encodes the image for every region
        prompt = pipe.prepare(enc, [("human", task_prompt("short"))], masks[q:q + 1])
        with torch.inference_mode():
            embeds = pipe.model.merge_embeddings(prompt.input_ids[None].to(device), enc.tokens[None], prompt.mask_tokens, prompt.pos_tokens)
            lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=device),
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - start


def our_flow(pipe, image, masks, new_tokens: int) -> float:
    from osprey.inference import SamplingParams

    start = time.perf_counter()
    out = pipe.describe(image, masks, task="short", params=SamplingParams(max_new_tokens=new_tokens))
    _sync(pipe.device)
    assert all(o.completion_tokens == new_tokens for o in out), [o.completion_tokens for o in out]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, preset="tiny")
    parser.add_argument("--regions", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)

    pipe = build_pipeline(args)
    pipe.eos_token_id = -1  # never stop early: both flows decode exactly --new-tokens tokens
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8))
    masks = np.zeros((args.regions, 480, 640), bool)
    for q in range(args.regions):
        y, x = rng.integers(0, 400), rng.integers(0, 560)
        masks[q, y:y + rng.integers(10, 80), x:x + rng.integers(10, 80)] = True

    official_flow(pipe, image, masks[:1], 2)  # warm-up both paths
    our_flow(pipe, image, masks[:2], 2)
    official = [official_flow(pipe, image, masks, args.new_tokens) for _ in range(args.repeats)]
    ours = [our_flow(pipe, image, masks, args.new_tokens) for _ in range(args.repeats)]
    device_name = torch.cuda.get_device_name() if pipe.device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": device_name,
        "model": args.model or args.preset,
        "dtype": str(pipe.model.dtype),
        "regions": args.regions,
        "new_tokens_per_region": args.new_tokens,
        "official_flow_s": float(np.median(official)),
        "ours_s": float(np.median(ours)),
        "speedup": float(np.median(official) / np.median(ours)),
        "ours_regions_per_s": args.regions / float(np.median(ours)),
        "official_regions_per_s": args.regions / float(np.median(official)),
        "ours_tokens_per_s": args.regions * args.new_tokens / float(np.median(ours)),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
