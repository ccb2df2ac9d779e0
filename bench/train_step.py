"""Stage-3 training-step benchmark through DeepSpeed: tokens/s, MFU and peak memory on synthetic batches.

Imports `osprey` and `train`, random weights, no data files. Each sample is the official shape:
one 512 px image (1024 image tokens), ~100 text tokens holding `--regions` `<mask><pos>` pairs, an answer
that is trained. Runs single-GPU as `python bench/train_step.py ...` (it makes itself a 1-process group) or
`deepspeed --num_gpus 1 bench/train_step.py ...`; `--device cpu --preset tiny` checks the code path on CPU.

MFU = model FLOPs per second / peak, with model FLOPs counted from the LM's shapes by `train.metrics.LMFlops`
(PaLM appendix B): 6 per decoder weight per token when the LM's weights train, 4 with LoRA (activation
gradients only), 6 per LoRA adapter weight, the LM head only where it runs, causal attention; not the embedding
lookup, the vision tower, the extractor or checkpointing recompute. `mfu_6n` keeps the earlier formula
(k * N_lm * tokens, k = 6 or 4, N_lm all LM parameters) for comparison with older results. Peak: 989 TFLOP/s
(H100/H200 dense bf16). MFU is per GPU (the step's FLOPs over the peak of all its GPUs). Under a launcher
(`torchrun --nproc_per_node N bench/train_step.py ...` or `deepspeed --num_gpus N ...`) each rank takes the batch;
`--baseline ONE.json` (the same setting on 1 GPU) adds `scaling_efficiency` = tokens/s per GPU here / there
(bench/train_scaling.sh runs 1, 2, 4, 8 GPUs so).

    python bench/train_step.py --preset osprey-7b --lora --zero 3 --grad-ckpt --out bench_7b_lora.json
    python bench/train_step.py --preset osprey-1b --zero 2 --grad-ckpt --out bench_1b_full.json
    python bench/train_step.py --preset tiny --device cpu --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from osprey.tokenization import IGNORE_INDEX, trained_targets
from train.metrics import LMFlops, peak_flops

# A ~1.1B Llama (TinyLlama shape) behind the real ConvNeXt-L tower: full fine-tuning fits one GPU.
LLAMA_1B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def build_config(preset: str):
    from osprey.config import OspreyConfig

    if preset == "osprey-1b":
        return OspreyConfig(text=dict(LLAMA_1B), name="osprey-1b")
    return OspreyConfig.from_preset(preset)


def init_process_group(device: str) -> None:
    """A 1-rank world when not launched by `deepspeed`/`torchrun`, as `osprey train` makes it
    (train.deepspeed_utils: MASTER_PORT 0, so the store keeps the port the OS gives it: picking a free port here,
    closing it and binding it later raced with other processes, and the port it left in the environment made a
    later training subprocess of the same test run fail with EADDRINUSE)."""
    from train.deepspeed_utils import init_distributed

    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()


def synthetic_batch(config, batch_size: int, regions: int, text_tokens: int, device: torch.device, seed: int):
    """ids: BOS + prompt + image slots + regions' <mask><pos> in text + answer (trained); same length per row."""
    gen = torch.Generator().manual_seed(seed)
    vocab, n_img, side = config.vocab_size, config.vision.num_image_tokens, config.vision.image_size
    answer = max(8, text_tokens // 3)
    rows, labels = [], []
    for _ in range(batch_size):
        text: list[int] = []
        for _ in range(regions):  # "region1<mask><pos>," ...: a few words, then the pair
            text += torch.randint(3, vocab, (3,), generator=gen).tolist() + [config.mask_token_id, config.pos_token_id]
        text += torch.randint(3, vocab, (max(0, text_tokens - answer - len(text)),), generator=gen).tolist()
        ans = torch.randint(3, vocab, (answer,), generator=gen)
        ids = torch.cat([torch.tensor([1]), torch.randint(3, vocab, (6,), generator=gen),
                         torch.full((n_img,), config.image_token_id), torch.tensor(text), ans, torch.tensor([2])])
        lab = torch.full_like(ids, IGNORE_INDEX)
        lab[-answer - 1:] = ids[-answer - 1:]
        rows.append(ids)
        labels.append(lab)
    ids = torch.stack(rows)
    masks = []
    for _ in range(batch_size):
        m = torch.zeros(regions, side, side, dtype=torch.bool)
        for q in range(regions):
            y, x = torch.randint(0, side // 2, (2,), generator=gen).tolist()
            h, w = torch.randint(side // 16, side // 2, (2,), generator=gen).tolist()
            m[q, y:y + h, x:x + w] = True
        masks.append(m.to(device))
    return {"input_ids": ids.to(device), "labels": torch.stack(labels).to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch_size, 3, side, side, generator=gen).to(device), "masks": masks}


def set_stage3_trainable(model, lora: bool, lora_r: int, lora_dropout: float = 0.05) -> None:
    """Stage 3: LM (or its LoRA adapters) + projector + extractor train; the vision tower is frozen."""
    model.requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model.language_model = get_peft_model(model.language_model, LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout, target_modules=targets, task_type="CAUSAL_LM"))
    else:
        model.language_model.requires_grad_(True)
    model.mm_projector.requires_grad_(True)
    model.mask_extractor.requires_grad_(True)
    model.vision_tower.eval()


def run(args: argparse.Namespace) -> dict:
    import deepspeed

    init_process_group(args.device)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    config = build_config(args.preset)
    model, lm_flops, n_lm, n_trainable, optimizer = _build(args, config, device)
    world = torch.distributed.get_world_size()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_deepspeed_config(args, config, world))
    engine.train()
    model.vision_tower.eval()
    batch = synthetic_batch(config, args.batch_size, args.regions, args.text_tokens, device, seed=torch.distributed.get_rank())
    tokens_per_step = int(batch["attention_mask"].sum()) * world
    losses, step_time = _time_steps(args, engine, batch, device)
    lengths = batch["attention_mask"].sum(dim=1).tolist() * world
    trained = _head_positions(batch["labels"]) * world
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        **setting(args), "device": name, "world_size": world,
        "tokens_per_sample": tokens_per_step // (args.batch_size * world),
        "lm_params": n_lm, "trainable_params": n_trainable, "steps_timed": args.steps,
        "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
        "tokens_per_s_per_gpu": tokens_per_step / step_time / world,
        "samples_per_s": args.batch_size * world / step_time,
        **flop_fields(lm_flops, lengths, trained if args.trained_logits_only else sum(lengths), step_time,
                      n_lm, args.lora, peak_flops(device), world),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    }


def setting(args: argparse.Namespace) -> dict:
    """The result fields the command line decides (the rest of a run's setting: its device and sample length)."""
    return {"preset": args.preset, "zero": args.zero, "lora": args.lora,
            "lora_r": args.lora_r if args.lora else None, "lora_dropout": args.lora_dropout if args.lora else None,
            "gradient_checkpointing": args.grad_ckpt, "compile": args.compile,
            "trained_logits_only": args.trained_logits_only, "bf16": args.bf16, "batch_size_per_gpu": args.batch_size,
            "regions_per_sample": args.regions}


def _build(args: argparse.Namespace, config, device: torch.device):
    """(model in the training dtype with stage 3's trainable parts, its LM FLOP counter, LM and trainable parameter
    counts, the optimizer)."""
    from osprey.checkpoint import build_model

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if args.bf16 else torch.float32)  # 7B: no fp32 copy on the GPU
    try:
        model = build_model(config, device=device)
    finally:
        torch.set_default_dtype(default)
    n_lm = sum(p.numel() for p in model.language_model.parameters())
    if args.grad_ckpt:
        lm, kwargs = model.language_model, {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    set_stage3_trainable(model, args.lora, args.lora_r, args.lora_dropout)
    lm_flops = LMFlops.of(model.language_model, weights_train=not args.lora)  # before ZeRO-3 partitions the weights
    if args.compile:
        if args.zero == 3:
            raise SystemExit("--compile is not supported with --zero 3")
        from train.recipe import compile_regions

        compile_regions(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=device.type == "cuda" or None)
    return model, lm_flops, n_lm, sum(p.numel() for p in params), optimizer


def _deepspeed_config(args: argparse.Namespace, config, world: int) -> dict:
    zero3 = {"stage3_param_persistence_threshold": 10 * config.hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * config.hidden_size ** 2),
             "reduce_bucket_size": config.hidden_size ** 2} if args.zero == 3 else {}
    return {
        "train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
        "train_batch_size": args.batch_size * world, "gradient_clipping": 1.0, "bf16": {"enabled": args.bf16},
        "zero_optimization": {"stage": args.zero, "overlap_comm": True, "contiguous_gradients": True, **zero3},
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10 ** 9,
    }


def _time_steps(args: argparse.Namespace, engine, batch: dict, device: torch.device) -> tuple[list[float], float]:
    """(every step's loss, the mean time of the steps after the warm-up); with --profile, two more steps profiled."""
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        out = engine(**batch, use_cache=False, trained_logits_only=args.trained_logits_only)
        engine.backward(out.loss)
        engine.step()
        _sync(device)
        losses.append(float(out.loss.detach()))
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(2):
                out = engine(**batch, use_cache=False, trained_logits_only=args.trained_logits_only)
                engine.backward(out.loss)
                engine.step()
            _sync(device)
        print(prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                        row_limit=20), file=sys.stderr)
    return losses, sum(times) / len(times)


def flop_fields(lm_flops: LMFlops, lengths: list[int], head_positions: int, step_time: float, n_lm: int, lora: bool,
                peak: float | None, world: int) -> dict:
    """The FLOP count and MFU of a step (`train.metrics.LMFlops`), and the earlier `k * N_lm` formula beside it."""
    parts = lm_flops.breakdown(lengths, head_positions)
    step_flops, tokens = sum(parts.values()), sum(lengths)
    per_token_6n = (4 if lora else 6) * n_lm
    return {
        "flop_formula": "train.metrics.LMFlops", "flops_per_step": step_flops, "flops_per_step_parts": parts,
        "flops_per_token": step_flops / tokens, "peak_flops_per_gpu": peak,
        "mfu": step_flops / step_time / (peak * world) if peak else None,
        "flops_per_token_6n": per_token_6n,
        "mfu_6n": per_token_6n * tokens / step_time / (peak * world) if peak else None,
    }


def recount(result: dict) -> dict:
    """A result written before `LMFlops` (its formula was `k * N_lm * tokens`) with the FLOP fields recounted from
    its recorded setting and step time. The model is built on the meta device: nothing is allocated."""
    from osprey.checkpoint import build_model

    if result.get("flop_formula") == "train.metrics.LMFlops":
        return result
    config = build_config(result["preset"])
    model = build_model(config, device=torch.device("meta"))
    lora_r = result.get("lora_r") or 128  # the benchmark's default; results before lora_r was recorded used it
    set_stage3_trainable(model, result["lora"], lora_r)
    lm_flops = LMFlops.of(model.language_model, weights_train=not result["lora"])
    world, batch_size = result["world_size"], result["batch_size_per_gpu"]
    text_tokens = result["tokens_per_sample"] - config.vision.num_image_tokens - 8  # BOS, 6 prompt ids, EOS
    sample = synthetic_batch(config, 1, result["regions_per_sample"], text_tokens, torch.device("cpu"), seed=0)
    lengths = [result["tokens_per_sample"]] * (batch_size * world)
    trained = _head_positions(sample["labels"]) * batch_size * world
    head_positions = trained if result.get("trained_logits_only") else sum(lengths)
    fields = flop_fields(lm_flops, lengths, head_positions, result["step_time_s"], result["lm_params"],
                         result["lora"], result["peak_flops_per_gpu"], world)
    fields["flop_formula"] += " (recounted from the recorded step time)"
    return {**result, "lora_r": result.get("lora_r", lora_r if result["lora"] else None), **fields}


# what must agree between a run and its baseline for their per-GPU throughputs to compare
SAME_SETTING = ("preset", "device", "zero", "lora", "lora_r", "lora_dropout", "gradient_checkpointing", "compile",
                "trained_logits_only", "bf16", "batch_size_per_gpu", "tokens_per_sample", "regions_per_sample")


def read_baseline(path: str, args: argparse.Namespace) -> dict:
    """A bench/train_step.py result of this command line's setting to compare against; SystemExit naming the problem
    otherwise (checked before the run, so a wrong baseline costs no GPU time)."""
    try:
        baseline = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--baseline {path}: {exc}") from exc
    if not isinstance(baseline, dict) or not {"tokens_per_s", "world_size", *SAME_SETTING} <= set(baseline):
        raise SystemExit(f"--baseline {path}: not a bench/train_step.py result")
    _same_setting(setting(args), baseline, path)
    return baseline


def _same_setting(result: dict, baseline: dict, path: str) -> None:
    differ = [key for key in SAME_SETTING if key in result and result[key] != baseline[key]]
    if differ:
        named = ", ".join(f"{key}: {baseline[key]!r} there, {result[key]!r} here" for key in differ)
        raise SystemExit(f"--baseline {path}: another setting ({named})")


def scaling_fields(result: dict, baseline: dict, path: str) -> dict:
    """Per-GPU tokens/s here over the baseline's (1.0: every added GPU adds a baseline GPU's throughput)."""
    _same_setting(result, baseline, path)
    here, there = result["tokens_per_s"] / result["world_size"], baseline["tokens_per_s"] / baseline["world_size"]
    return {"baseline": {"file": str(path), "world_size": baseline["world_size"],
                         "tokens_per_s": baseline["tokens_per_s"]},
            "scaling_efficiency": here / there}


def _head_positions(labels: torch.Tensor) -> int:
    """Positions whose next token is trained: where the LM head runs with trained-only logits."""
    return int(trained_targets(labels).sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="osprey-1b", help="osprey-7b, osprey-1b (in code), tiny, or a preset JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on the LM instead of full fine-tuning")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="0: peft skips the dropout kernels")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage")
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the LM")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (CPU checks)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per GPU per step (official: 1)")
    parser.add_argument("--regions", type=int, default=4, help="regions (<mask><pos> pairs) per sample")
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens per sample besides the image")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (LM layers, tower stages)")
    parser.add_argument("--full-logits", dest="trained_logits_only", action="store_false",
                        help="LM head and loss over every position (transformers' loss), not only trained ones")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of 2 more steps")
    parser.add_argument("--baseline", metavar="JSON",
                        help="a result of the same setting on fewer GPUs (normally 1): adds scaling_efficiency, "
                             "this run's tokens/s per GPU over the baseline's")
    parser.add_argument("--out", help="also write the result JSON here")
    parser.add_argument("--recount", nargs="+", metavar="JSON",
                        help="rewrite earlier result files with the current FLOP count (no run; CPU, meta device)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.recount:
        for path in args.recount:
            result = json.loads(Path(path).read_text())
            if not {"preset", "step_time_s", "lm_params"} <= set(result):
                print(f"{path}: skipped, not a bench/train_step.py result")
                continue
            result = recount(result)
            _write_json(Path(path), result)
            print(f"{path}: MFU {100 * (result['mfu'] or 0):.1f} % (k * N_lm: {100 * (result['mfu_6n'] or 0):.1f} %)")
        return {}
    baseline = read_baseline(args.baseline, args) if args.baseline else None
    result = run(args)
    if baseline is not None:
        result.update(scaling_fields(result, baseline, args.baseline))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
        if args.out:
            _write_json(Path(args.out), result)
    return result


def _write_json(out: Path, result: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    main()
