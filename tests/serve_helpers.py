"""Server test doubles built on the real backend (imported as `serve_helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import threading

from serve.engine import PipelineBackend


class GatedBackend(PipelineBackend):
    """The real pipeline backend whose load waits for the test to open the gate (to observe 'loading')."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.gate = threading.Event()

    def load(self) -> None:
        self.gate.wait(30)
        super().load()
