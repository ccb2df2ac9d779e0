"""Fuzz the HTTP API from its own OpenAPI document (schemathesis): the real server on a tiny random model.

    python -m bench.api_fuzz --cases 1000 --out bench/results/api_fuzz_cpu.json            # sized to the images
    python -m bench.api_fuzz --cases 1000 --as-published                                    # the document as served

Starts `osprey serve`'s app (uvicorn, in this process) on a fresh `osprey model init --preset tiny` folder, reads
`/openapi.json`, and sends `--cases` schema-generated requests to each operation, each checked by schemathesis
(no 5xx, status codes, content types and bodies as documented; a schema-valid request answered 4xx is reported).
The report counts the answers of each operation by status: a 200 reached the model.

What the fuzzer is taught, beyond the document: how to draw its three string formats (`image-url`: an image as a
base64 data URL, of `FUZZ_SIZE`; `mask-png`: a PNG mask of that size; `coco-rle-counts`: compressed counts of a
random mask of that size). And, unless `--as-published`, the region geometry narrowed to that image size (RLE
sizes, bitmap shapes, box and polygon coordinates inside the image, list counts left out since JSON schema cannot
say "sums to height x width") and chat messages to one user turn with the image first: the published document
must allow any image size and any conversation, so its regions are mostly the wrong size for any one image and its
conversations mostly not ones (a user turn last, an image in a user turn), and a server that refused them would be
right. `--as-published` fuzzes the document as served: the figure to read there is the server errors (none).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FUZZ_SIZE = (24, 32)  # (H, W) of every image the fuzzer sends; mask-png strings are drawn at this size too
KEY = "fuzz-key"


@dataclass
class OperationReport:
    label: str
    cases: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "200" -> count
    failures: list[str] = field(default_factory=list)  # schemathesis check failures (first line each)

    @property
    def reached_model(self) -> int:
        return self.statuses.get("200", 0)


def _png_data_url(array: np.ndarray, mode: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def register_formats() -> None:
    """Teach schemathesis the document's image and mask formats (Hypothesis strategies)."""
    import schemathesis
    from hypothesis import strategies as st

    from osprey.masks import encode_rle

    h, w = FUZZ_SIZE
    rngs = st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed))
    masks = st.tuples(rngs, st.floats(0.05, 0.9)).map(lambda rf: rf[0].random((h, w)) < rf[1])
    images = st.tuples(rngs, st.sampled_from(["RGB", "RGBA", "L"])).map(
        lambda rm: _png_data_url((rm[0].random((h, w, len(rm[1]))) * 255).astype(np.uint8).squeeze(), rm[1]))
    schemathesis.openapi.format("image-url", images)
    schemathesis.openapi.format("mask-png", masks.map(lambda m: _png_data_url(m.astype(np.uint8) * 255, "L")))
    schemathesis.openapi.format("coco-rle-counts", masks.map(lambda m: encode_rle(m)["counts"]))


def narrow_to_image_size(raw_schema: dict) -> None:
    """Region geometry of the published document narrowed to the fuzzer's image size, and chat messages to one user
    turn (see the module text)."""
    h, w = FUZZ_SIZE
    models = raw_schema["components"]["schemas"]
    rle = models["CocoRLE"]["properties"]
    rle["size"] = {"type": "array", "items": False, "prefixItems": [{"const": h}, {"const": w}],
                   "minItems": 2, "maxItems": 2}
    rle["counts"] = {"type": "string", "format": "coco-rle-counts"}
    row = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "minItems": w, "maxItems": w}
    bitmap = {"type": "array", "items": row, "minItems": h, "maxItems": h}
    models["BitmapRegion"]["properties"]["bitmap"] = bitmap
    models["SAMRegion"]["properties"]["segmentation"] = {"anyOf": [{"$ref": "#/components/schemas/CocoRLE"}, bitmap]}
    coordinate = {"type": "number", "minimum": 0, "maximum": min(h, w)}
    polygon = {"type": "array", "items": coordinate, "minItems": 6, "maxItems": 12}
    models["PolygonRegion"]["properties"]["polygon"] = {"anyOf": [
        {"type": "array", "items": polygon, "minItems": 1, "maxItems": 3}, polygon]}
    # A conversation's rules (starts and ends with the user, the image in a user turn) are no JSON schema's: the
    # fuzzer sends one user turn, the image first, then text parts.
    models["ChatCompletionRequest"]["properties"]["messages"] = {"type": "array", "minItems": 1, "maxItems": 1,
                                                                 "items": {"$ref": "#/components/schemas/UserTurn"}}
    models["UserTurn"] = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "user"},
        "content": {"type": "array", "minItems": 2, "maxItems": 3,
                    "prefixItems": [{"$ref": "#/components/schemas/ImagePart"}],
                    "items": {"$ref": "#/components/schemas/TextPart"}}}}
    models["BoxRegion"]["properties"]["box"] = {"type": "array", "minItems": 4, "maxItems": 4, "items": False,
                                                "prefixItems": [{"type": "number", "minimum": 0, "maximum": w - 1},
                                                                {"type": "number", "minimum": 0, "maximum": h - 1},
                                                                {"type": "number", "minimum": 1, "maximum": 2 * w},
                                                                {"type": "number", "minimum": 1, "maximum": 2 * h}]}


def fuzz(url: str, cases: int, seed: int, *, as_published: bool = False) -> list[OperationReport]:
    """`cases` generated requests per operation of the server at `url`; one report per operation."""
    import httpx
    import schemathesis

    register_formats()
    raw = httpx.get(url + "/openapi.json").json()
    if not as_published:
        narrow_to_image_size(raw)
    schema = schemathesis.openapi.from_dict(raw)
    return [_fuzz_operation(result.ok(), url, cases, seed) for result in schema.get_all_operations()]


def _fuzz_operation(operation: object, url: str, cases: int, seed: int) -> OperationReport:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.core.failures import FailureGroup

    report = OperationReport(operation.label)
    statuses: Counter[str] = Counter()

    @hypothesis_seed(seed)  # reproducible runs
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case: object) -> None:
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        report.cases += 1
        statuses[str(response.status_code)] += 1
        try:
            case.validate_response(response)
        except (FailureGroup, AssertionError) as exc:  # schemathesis' failed checks: findings, not a crash
            report.failures.append(_failure_line(exc, response))

    check()
    report.statuses = dict(sorted(statuses.items()))
    return report


def _failure_line(exc: BaseException, response: object) -> str:
    """One line per failed check: its title, and the server's error message if it answered one."""
    checks = [e for e in getattr(exc, "exceptions", [exc])]
    titles = "; ".join(getattr(e, "title", type(e).__name__) for e in checks)
    try:
        detail = response.json().get("error", {}).get("message", "")
    except ValueError:
        detail = ""
    return f"{response.status_code} {titles}: {detail}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="generated requests per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--as-published", action="store_true",
                        help="generate from the document as served (regions of any size), not narrowed to the images")
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    args = parser.parse_args(argv)

    from osprey.checkpoint import init_model_folder
    from serve.background import BackgroundServer
    from serve.config import ServeConfig

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = init_model_folder("tiny", Path(tmp) / "tiny", seed=0)
        config = ServeConfig(model=str(model), api_key=KEY, max_tokens_limit=4, max_regions=8, max_queue=64,
                             request_timeout_s=120)
        with BackgroundServer(config) as server:
            reports = fuzz(server.url, args.cases, args.seed, as_published=args.as_published)
    total = sum(r.cases for r in reports)
    server_errors = sum(n for r in reports for s, n in r.statuses.items() if s.startswith("5"))
    summary = {
        "command": f"python -m bench.api_fuzz --cases {args.cases} --seed {args.seed}"
                   + (" --as-published" if args.as_published else ""),
        "cases": total, "server_errors": server_errors, "reached_model": sum(r.reached_model for r in reports),
        "check_failures": sum(len(r.failures) for r in reports), "seconds": round(time.perf_counter() - start, 1),
        "operations": [asdict(r) | {"failures": r.failures[:20]} for r in reports],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if server_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
