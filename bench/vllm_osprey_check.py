"""The vLLM backend checked on a GPU: `osprey serve --backend vllm` answers describe and chat requests with regions,
and its greedy tokens equal our engine's (random weights of the preset's shapes, one run, <= 6 minutes at 7B).

    python -m bench.vllm_osprey_check OUT_DIR                        # osprey-7b shapes, bf16, 4 images x 16 regions
    python -m bench.vllm_osprey_check OUT_DIR --dtype float32 --gpu-memory-utilization 0.55   # parity without bf16
    python -m bench.vllm_osprey_check OUT_DIR --preset tiny --build-only --device cpu   # the folder step alone (CPU)

Steps, each timed and written to OUT_DIR/vllm_osprey_check.json as it completes (a run cut short keeps what it
did): (1) random weights -> a model folder (reused by a rerun on a warm machine); (2) our engine's greedy tokens
for every region (EOS ignored); (3) `osprey serve`'s app with the vLLM backend, in-process: /health, a describe
request, a chat request with two regions (plain and streamed) and a bad request that must get a 400; (4) the same
regions through the same vLLM engine (greedy, EOS ignored, top-2 logprobs): the prompt ids must equal our engine's,
then the share of equal tokens and, per diverging row, the first divergent step with vLLM's top-2 logit gap there
(a divergence at a gap of a few bf16 ulps is rounding between two correct implementations, as bench/engine_parity
reports for our engine against transformers); (5) vLLM's tokens and ours fed back through transformers' forward
of the same weights: the share of steps where each is the forward's top-1 and how far below it the others are.

Random weights give nearly flat logits (top-2 gaps of a few bf16 steps), so in bf16 two correct implementations
part ways within a few tokens; `--dtype float32` runs both engines and the weights in fp32 (vLLM then takes its
Triton attention, its dot products held to IEEE fp32 here, not TF32), which leaves the wiring and fp32 summation
order as the only causes of a difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="folder for vllm_osprey_check.json")
    p.add_argument("--preset", default="osprey-7b", help="random weights of this preset's shapes")
    p.add_argument("--model", default=None, help="an existing model folder instead of random weights")
    p.add_argument("--work", default="/tmp/osprey-vllm-check", help="where the random model folder is written")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the weights, our engine and vLLM in this dtype (float32: parity free of bf16 rounding)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--masks", type=int, default=16, help="regions per image")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                   help="vLLM's share of the GPU (our engine's model stays loaded beside it)")
    p.add_argument("--graphs", action="store_true", help="let vLLM compile and capture CUDA graphs (slower start)")
    p.add_argument("--build-only", action="store_true", help="stop after writing the model folder")
    return p.parse_args(argv)


class Report:
    """The JSON report, rewritten atomically after every step."""

    def __init__(self, out_dir: str) -> None:
        self.path = Path(out_dir) / "vllm_osprey_check.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"steps": {}}
        self.started = time.perf_counter()

    def step(self, name: str, **fields) -> None:
        fields["at_s"] = round(time.perf_counter() - self.started, 1)
        self.data["steps"][name] = fields
        print(f"[{fields['at_s']:7.1f}s] {name}: {json.dumps(fields, default=str)[:600]}", flush=True)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def build_folder(args: argparse.Namespace, report: Report):
    """(pipeline, folder): our pipeline on the device and the model folder vLLM reads, with the same weights."""
    from bench.serve_vllm import model_folder, stamped
    from bench.serve_workload import build_pipeline
    from osprey.inference import OspreyPipeline

    suffix = "" if args.dtype == "bfloat16" else f"-{args.dtype}"
    folder = Path(args.model) if args.model else Path(args.work) / f"model-{args.preset}{suffix}"
    if args.model or stamped(folder, args.preset, args.dtype):
        pipe = OspreyPipeline.from_pretrained(folder, device=args.device, dtype=args.dtype)
        report.step("model", folder=str(folder), reused=True)
        return pipe, folder
    pipe = build_pipeline(args.preset, None, args.device, args.dtype)
    model_folder(pipe, folder, args.preset)
    size_gb = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    report.step("model", folder=str(folder), reused=False, size_gb=round(size_gb, 2))
    return pipe, folder


def reference_tokens(pipe, workload, new_tokens: int) -> tuple[list, list[list[int]]]:
    """Our engine's greedy tokens for every region of the workload (EOS ignored): (prompts, tokens per row)."""
    import torch

    from osprey.generation import SamplingParams
    from osprey.prompts import task_prompt

    eos, pipe.eos_token_id = pipe.eos_token_id, -1
    prompts = []
    for (request,) in workload.clients:
        encoded = pipe.encode_image(request.image)
        prompts += pipe.prepare_each(encoded, [("human", task_prompt("short"))], request.masks)
    tokens: list[list[int]] = [[] for _ in prompts]
    for events in pipe.generate_stream(prompts, SamplingParams(max_new_tokens=new_tokens)):
        for e in events:
            if e.token_id is not None:
                tokens[e.row].append(e.token_id)
    pipe.eos_token_id = eos
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return prompts, tokens


def api_checks(client, request, report: Report, cancel_tokens: int = 0) -> None:
    """Describe, chat (plain and streamed) and a bad request through `osprey serve`'s routes on the vLLM backend."""
    image_b64 = request.png_b64()
    boxes = request.boxes[:3]
    model = client.get("/v1/models").json()["data"][0]["id"]
    describe = client.post("/v1/regions/describe", json={
        "image": image_b64, "regions": [{"box": b} for b in boxes], "task": "short", "max_tokens": 16})
    report.step("describe", status=describe.status_code, body=_body(describe))
    chat_body = {
        "model": model, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
            {"type": "text", "text": "What is <region1> next to <region2>?"}]}],
        "regions": [{"box": boxes[0]}, {"box": boxes[1]}]}
    chat = client.post("/v1/chat/completions", json=chat_body)
    report.step("chat", status=chat.status_code, body=_body(chat))
    with client.stream("POST", "/v1/chat/completions", json={**chat_body, "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    report.step("chat_stream", status=stream.status_code, chunks=len(lines), first=lines[:2], last=lines[-2:])
    bad = client.post("/v1/chat/completions", json={**chat_body, "regions": [{"box": boxes[0]}]})
    report.step("bad_request", status=bad.status_code, expected=400, body=_body(bad))
    if cancel_tokens:  # Starlette's TestClient can hold an early-closed stream open at shutdown: opt-in
        _cancel_check(client, chat_body, report, cancel_tokens)


def _cancel_check(client, chat_body: dict, report: Report, max_tokens: int) -> None:
    """A streamed chat closed after its first chunk: its row must leave the backend long before `max_tokens` tokens
    (at 7B, 1,024 tokens take over 10 s; a cancelled row goes within about a second: the disconnect poll)."""
    backend = client.app.state.engine.engines[0].backend
    started = time.perf_counter()
    body = {**chat_body, "stream": True, "max_tokens": max_tokens}
    with client.stream("POST", "/v1/chat/completions", json=body) as stream:
        status = stream.status_code
        next(stream.iter_lines())
        live_at_close = backend.live_rows
    closed = time.perf_counter()
    while backend.live_rows and time.perf_counter() - closed < 30:
        time.sleep(0.05)
    report.step("cancel", status=status, max_tokens=max_tokens, live_rows_at_close=live_at_close,
                live_rows_after=backend.live_rows,
                freed_after_s=round(time.perf_counter() - closed, 2), first_chunk_s=round(closed - started, 2))


def _body(response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def vllm_tokens(backend, pipe, workload, new_tokens: int, report: Report) -> tuple[list[list[int]], list[list[float]]]:
    """The same regions on the backend's vLLM engine: greedy, EOS ignored, with each step's top-2 logprob gap."""
    from vllm import SamplingParams as VllmSamplingParams

    from osprey.prompts import task_prompt
    from serve.vllm_osprey.prompts import expand_prompt, image_placeholder_id

    prompts = []
    for (request,) in workload.clients:
        prompts += backend.prepare_each(backend.encode_image(request.image), [("human", task_prompt("short"))],
                                        request.masks)
    config = pipe.config
    ours = pipe._prompt_ids([("human", task_prompt("short"))]).tolist()
    theirs = [config.image_token_id if t == image_placeholder_id(config) else t
              for t in expand_prompt(prompts[0].token_ids, config)]
    report.step("prompt_ids", equal=ours == theirs, ours=len(ours), vllm=len(theirs))
    params = VllmSamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                                logprobs=2, detokenize=False)

    async def one(index: int, prompt) -> tuple[list[int], list[float]]:
        final = None
        async for output in backend.engine.generate(backend.tokens_prompt(prompt), params,
                                                    request_id=f"check-{index}"):
            final = output
        completion = final.outputs[0]
        gaps = []
        for step in completion.logprobs or []:
            top = sorted((lp.logprob for lp in step.values()), reverse=True)
            gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
        return list(completion.token_ids), gaps

    async def everything():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    started = time.perf_counter()
    results = asyncio.run_coroutine_threadsafe(everything(), backend.loop).result(timeout=600)
    report.step("vllm_generate", rows=len(results), seconds=round(time.perf_counter() - started, 2))
    return [r[0] for r in results], [r[1] for r in results]


def compare(ours: list[list[int]], theirs: list[list[int]], gaps: list[list[float]]) -> dict:
    equal = total = 0
    divergences = []
    for row, (a, b, g) in enumerate(zip(ours, theirs, gaps)):
        equal += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        if first is not None:
            finite = sorted(x for x in g if x != float("inf"))
            divergences.append({"row": row, "step": first, "vllm_top2_gap": g[first] if first < len(g) else None,
                                "median_gap": finite[len(finite) // 2] if finite else None})
    return {"rows": len(ours), "equal_token_share": equal / max(1, total), "rows_identical": len(ours) - len(divergences),
            "divergences": divergences, "passed": equal / max(1, total) >= 0.99}


def teacher_forced(pipe, prompts: list, rows: list[list[int]]) -> dict:
    """Each row's tokens fed back through transformers' own forward of our model (one pass per row, the pipeline's
    dtype): at each step, is the row's token the forward's top-1, and if not, by how much is its logit below the top-1?

    Unlike comparing two free-running greedy decodes, a difference here does not compound: with random weights (nearly
    flat logits) a row whose every choice is within a few bf16 steps of the reference's best is rounding, where a
    wiring error gives large gaps at many steps."""
    import torch

    lm = pipe.model.language_model
    steps = top1 = 0
    gaps: list[float] = []
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, rows):
            if not tokens:
                continue
            ids = torch.cat([prompt.input_ids, torch.tensor(tokens[:-1], dtype=torch.long)])
            embeds = pipe._merge(ids[None], prompt.image, prompt.mask_tokens, prompt.pos_tokens)
            hidden = lm.model(inputs_embeds=embeds).last_hidden_state[0, prompt.num_tokens - 1:]
            logits = lm.lm_head(hidden).float()
            chosen = torch.tensor(tokens, device=logits.device)
            below = logits.max(dim=-1).values - logits.gather(1, chosen[:, None])[:, 0]
            steps += len(tokens)
            top1 += int((below == 0).sum())
            gaps += [float(g) for g in below[below > 0].tolist()]
    gaps.sort()
    return {"steps": steps, "top1_share": top1 / max(1, steps), "below_top1_steps": len(gaps),
            "median_gap_below_top1": gaps[len(gaps) // 2] if gaps else 0.0, "max_gap_below_top1": gaps[-1] if gaps else 0.0}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = Report(args.out)
    import torch

    report.data["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report.data["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    if args.dtype == "float32":
        # Triton's tl.dot on fp32 inputs defaults to TF32 (10-bit mantissa) on Hopper; vLLM takes its Triton attention
        # in fp32, so without this its scores carry ~1e-3 errors (ties flipped at top-2 gaps up to 0.004 on an H100)
        # and the comparison would again measure rounding. Its engine process inherits the environment.
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
        report.data["settings"]["TRITON_F32_DEFAULT"] = os.environ["TRITON_F32_DEFAULT"]
    pipe, folder = build_folder(args, report)
    if args.build_only:
        return report.data
    from bench.serve_vllm import ensure_plugin_entry_point

    report.step("plugin", entry_point=ensure_plugin_entry_point(Path(args.work)))
    import vllm

    report.data["vllm"] = vllm.__version__
    from bench.serve_workload import make_workload

    workload = make_workload(args.images, args.masks, 1, seed=7)
    started = time.perf_counter()
    prompts, ours = reference_tokens(pipe, workload, args.new_tokens)
    report.step("engine_reference", rows=len(ours), seconds=round(time.perf_counter() - started, 2))

    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.config import ServeConfig
    from serve.vllm_osprey.backend import VllmBackend, VllmSize

    backend = VllmBackend(str(folder), VllmSize(gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype,
                                                enforce_eager=not args.graphs, max_regions=64))
    app = create_app(ServeConfig(model=str(folder), max_regions=64, request_timeout_s=300), [backend])
    started = time.perf_counter()
    with TestClient(app) as client:
        while client.get("/health").status_code != 200:
            if app.state.engine.load_error or time.perf_counter() - started > 420:
                report.step("vllm_start", ok=False, health=_body(client.get("/health")))
                return report.data
            time.sleep(1)
        report.step("vllm_start", ok=True, seconds=round(time.perf_counter() - started, 1))
        api_checks(client, workload.clients[0][0], report)
        theirs, gaps = vllm_tokens(backend, pipe, workload, args.new_tokens, report)
        report.data["parity"] = compare(ours, theirs, gaps)
        report.step("parity", equal_token_share=report.data["parity"]["equal_token_share"],
                    rows_identical=report.data["parity"]["rows_identical"], passed=report.data["parity"]["passed"])
        # the same rows through transformers' forward, vLLM's tokens and ours: rounding or wiring
        report.data["teacher_forced"] = {"vllm": teacher_forced(pipe, prompts, theirs),
                                         "engine": teacher_forced(pipe, prompts, ours)}
        report.step("teacher_forced", **report.data["teacher_forced"])
    try:
        backend.shutdown()
    except Exception as exc:  # noqa: BLE001 (the report is written; a failing shutdown must not hide it)
        report.step("shutdown", error=f"{type(exc).__name__}: {exc}")
    return report.data


if __name__ == "__main__":
    data = main()
    print(json.dumps({k: v for k, v in data.items() if k != "steps"}, indent=2, default=str))
    if not data["settings"]["build_only"] and not data.get("parity", {}).get("passed"):
        raise SystemExit(1)  # vLLM did not start, or fewer than 99% of the tokens agree (the JSON says which)
