"""Engine replicas behind one server: one `serve.engine.Engine` (model, KV pool, worker thread) per device, and the
dispatcher that sends each request to the least-loaded one.

`osprey serve --devices cuda:0 cuda:1` loads the model once per device. Every route that uses the model goes
through `EngineReplicas`, which offers the engine's interface (submit, run, events, start, shutdown, status), so a
server on one device (`--device`) is the same code with one replica. Dispatch: the replica with the fewest open
rows (region rows queued or decoding; a scoring request counts one) takes the request, ties going to the first
device; an image's requests return to the replica that took its last request (whose image cache holds the
encoding) unless that replica has more than IMAGE_AFFINITY_ROWS open rows above the least loaded. A full queue
passes the request on to the next replica: 429 only when every queue is full. The server admits requests once
every replica has loaded; a replica that fails to load fails the server (503 naming its device), as a lone engine
does. Shutdown drains all replicas at once.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from PIL import Image

from osprey.inference import EncodedImage

from .engine import Backend, Engine, Job, RowDone, RowSpec, RowText, Task, admission_error
from .errors import APIError
from .metrics import Metrics

# Encoding an image (the vision tower, then ~600 image-prefix tokens prefilled) costs more than prefilling a dozen
# region rows (~20-40 tokens each): a replica that already holds the image is worth a few more rows ahead.
IMAGE_AFFINITY_ROWS = 8
_REMEMBERED_IMAGES = 4096  # image -> replica entries kept (LRU); a stale one only costs an encoding

Admitted = TypeVar("Admitted", Job, Task)


def dispatch_order(open_rows: Sequence[int], home: int | None) -> list[int]:
    """Replica indices in the order to try: fewest open rows first (ties: the lower index), except that `home` (the
    replica holding the request's image) comes first while it has at most IMAGE_AFFINITY_ROWS more open rows than
    the least loaded."""
    order = sorted(range(len(open_rows)), key=lambda i: (open_rows[i], i))
    if home is not None and open_rows[home] - open_rows[order[0]] <= IMAGE_AFFINITY_ROWS:
        order.remove(home)
        order.insert(0, home)
    return order


class EngineReplicas:
    """The engines of one server, `engines[i]` on `devices[i]`; see the module docstring for the dispatch rule."""

    def __init__(self, engines: list[Engine], devices: Sequence[str], metrics: Metrics) -> None:
        if not engines or len(engines) != len(devices):
            raise ValueError(f"one engine per device: got {len(engines)} engines for devices {list(devices)}")
        if [engine.replica for engine in engines] != list(range(len(engines))):
            raise ValueError("engine i must be built with replica=i (its jobs name it)")
        self.engines = engines
        self.devices = tuple(devices)
        self.metrics = metrics
        self._homes: collections.OrderedDict[str, int] = collections.OrderedDict()  # image key -> its last replica
        self.closing = False

    # ------------------------------------------------------------------ state

    @property
    def status(self) -> str:
        """loading until every replica is loaded, then ok; error once one failed to load."""
        states = {engine.status for engine in self.engines}
        return "error" if "error" in states else "loading" if "loading" in states else "ok"

    @property
    def load_error(self) -> str | None:
        """The first replica's load failure, naming its device."""
        return next((f"{device} (replica {engine.replica}): {engine.load_error}"
                     for engine, device in zip(self.engines, self.devices) if engine.load_error is not None), None)

    @property
    def open_rows(self) -> int:
        return sum(engine.open_rows for engine in self.engines)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new work and drain every replica together (each as `Engine.shutdown`)."""
        self.closing = True
        await asyncio.gather(*(engine.shutdown(timeout_s) for engine in self.engines))

    # ------------------------------------------------------------------ requests

    def submit(self, image: Image.Image, image_key: str, rows: list[RowSpec], timeout_s: float) -> Job:
        """`Engine.submit` on the replica the dispatch rule picks."""
        return self._dispatch(image_key, lambda engine: engine.submit(image, image_key, rows, timeout_s))

    async def run(self, image: Image.Image, image_key: str, work: Callable[[Backend, EncodedImage], Any],
                  timeout_s: float) -> Any:
        """`work(backend, encoded image)` on the worker thread of the replica the dispatch rule picks; its result,
        or an APIError (what `submit` raises, the work's own, 400 for its ValueError, 504 on timeout)."""
        task = self._dispatch(image_key, lambda engine: engine.submit_task(image, image_key, work, timeout_s))
        return await self.engines[task.replica].result(task)

    def events(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]] | None = None
               ) -> AsyncIterator[RowText | RowDone]:
        """`Engine.events` of the replica that runs `job`."""
        return self.engines[job.replica].events(job, is_disconnected)

    def _dispatch(self, image_key: str, admit: Callable[[Engine], Admitted]) -> Admitted:
        refused = admission_error(self.load_error, self.status == "ok", self.closing)
        if refused is not None:
            raise refused
        full: APIError | None = None
        for index in dispatch_order([engine.open_rows for engine in self.engines], self._homes.get(image_key)):
            try:
                admitted = admit(self.engines[index])
            except APIError as exc:
                if exc.code != "queue_full":
                    raise
                full = exc
                continue
            self._remember(image_key, index)
            self.metrics.inc("dispatched", replica=str(index))
            return admitted
        assert full is not None  # every replica was tried and each queue was full
        raise full

    def _remember(self, image_key: str, index: int) -> None:
        self._homes[image_key] = index
        self._homes.move_to_end(image_key)
        while len(self._homes) > _REMEMBERED_IMAGES:
            self._homes.popitem(last=False)
