"""Server settings (one frozen dataclass: every limit the server enforces, with why) and default-model lookup."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from osprey import default_model_path

from .engine import EngineSize

DEFAULT_MODEL_ENV = "OSPREY_MODEL"
_RUN_OUTPUT_NAMES = ("final", "latest", "best", "last")  # folder names a training run writes its model to


@dataclass(frozen=True)
class ServeConfig:
    model: str  # model folder (osprey model init / convert output)
    served_model_name: str = ""  # name in /v1/models and responses; "" = the folder's name
    # one engine replica (model, KV pool, worker thread) per entry, requests to the least loaded (serve.replicas);
    # a device may repeat (several replicas on one device); embeddings and SAM run on the first
    devices: tuple[str, ...] = ("cpu",)
    dtype: str | None = None  # None = the folder's dtype (pipeline default)
    cpu_threads: int | None = None  # torch threads on CPU; None = all cores but one (one is the event loop's)
    api_key: str | None = None  # when set, /v1/* need `Authorization: Bearer KEY`
    allow_image_urls: bool = False  # fetching http(s) URLs makes the server a proxy: off unless asked
    # embeddings and search (serve.embeddings): an open_clip file whose text tower serves a model folder without
    # its own (the official CLIP file), and the region index's database (a postgresql:// URL or a folder)
    clip_weights: str | None = None
    index: str | None = None
    # engine
    max_batch_size: int = 8  # region rows decoded together, across requests (continuous batching)
    kv_cache_gb: float | None = None  # engine KV memory; None: 90% of the GPU memory left after loading (1 GiB on CPU)
    max_row_tokens: int | None = None  # per region row: its prompt after the image + answer; None: max_tokens_limit + 256
    batch_wait_ms: float = 5.0  # how long the worker waits to fill a batch once work is there
    fast_kernels: bool = True  # CUDA: the engine's Triton decoding kernels and compiled layers (docs/engine.md)
    max_queue: int = 64  # requests waiting for the worker; more -> 429 with Retry-After
    image_cache_size: int = 16  # encoded images kept (LRU by content hash): same image, one encoding
    request_timeout_s: float = 300.0  # per request, from admission to the last token -> 504
    # input limits (each a 4xx naming the field)
    max_body_bytes: int = 32 * 1024 * 1024  # checked on Content-Length and while reading -> 413
    max_image_pixels: int = 4096 * 4096  # decompression bombs: checked from the header before decoding
    max_image_side: int = 8192
    max_regions: int = 64  # regions per request (each region costs one mask-extractor pass)
    max_tokens_limit: int = 1024  # largest max_tokens accepted (the official generation cap)
    default_chat_max_tokens: int = 256  # when a chat request names none (capped by max_tokens_limit)
    max_prompt_chars: int = 16_000  # all text of a chat request together
    max_n: int = 8  # choices per chat request
    url_fetch_timeout_s: float = 10.0
    body_timeout_s: float = 30.0  # longest wait for the next piece of a request body -> 408

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "image_cache_size", "max_body_bytes", "max_image_pixels",
                     "max_image_side", "max_regions", "max_tokens_limit", "default_chat_max_tokens",
                     "max_prompt_chars", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.max_row_tokens is not None and self.max_row_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_row_tokens ({self.max_row_tokens}) must exceed max_tokens_limit "
                             f"({self.max_tokens_limit}): a row holds its prompt and its answer")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        self._check_devices()
        if self.request_timeout_s <= 0 or self.body_timeout_s <= 0 or self.batch_wait_ms < 0:
            raise ValueError("request_timeout_s and body_timeout_s must be > 0, batch_wait_ms >= 0")

    def _check_devices(self) -> None:
        if not isinstance(self.devices, tuple) or not self.devices:
            raise ValueError(f"devices must be a non-empty tuple of device names, got {self.devices!r}")
        for device in self.devices:
            try:
                torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from None

    @property
    def device(self) -> str:
        """The first device: where the side models run (the embeddings' text tower, SAM)."""
        return self.devices[0]

    @property
    def engine_size(self) -> EngineSize:
        return EngineSize(max_rows=self.max_batch_size, kv_cache_gb=self.kv_cache_gb,
                          max_row_tokens=self.max_row_tokens or self.max_tokens_limit + 256,
                          fast_kernels=self.fast_kernels)

    @property
    def model_name(self) -> str:
        """`served_model_name`, else the folder's name; a training run's `final` / `checkpoint-N` folder is named
        with its run (`pass3/final`), since "final" alone says nothing about the model."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model).resolve()
        if path.name in _RUN_OUTPUT_NAMES or path.name.startswith(("checkpoint-", "step-", "step_")):
            return f"{path.parent.name}/{path.name}"
        return path.name


class NoDefaultModel(RuntimeError):
    """No --model given and no default model folder found; the message says what to pass."""


def resolve_model_path(model: str | None) -> str:
    """The model folder to serve: `--model`, else $OSPREY_MODEL, else the project's built-in model
    (`osprey.default_model_path()`, when installed).

    Raises NoDefaultModel (the CLI exits 2) when none exists, telling the user what to pass.
    """
    if model:
        if not Path(model).is_dir():
            raise NoDefaultModel(f"model folder {model!r} does not exist")
        return model
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        if not Path(env).is_dir():
            raise NoDefaultModel(f"${DEFAULT_MODEL_ENV}={env!r} is not a folder")
        return env
    default = default_model_path()
    if default is not None and Path(default).is_dir():
        return str(default)
    raise NoDefaultModel(
        "no default model is installed: pass --model DIR (a folder written by `osprey model convert` from an "
        f"official checkpoint, or a test model from `osprey model init --preset tiny --out DIR`), or set ${DEFAULT_MODEL_ENV}"
    )



def model_path_for(command: str, model: str | None) -> str | None:
    """`resolve_model_path` for a CLI command: the folder, or None after telling the user (on stderr) what to pass."""
    try:
        return resolve_model_path(model)
    except NoDefaultModel as exc:
        print(f"osprey {command}: {exc}", file=sys.stderr)
        return None
