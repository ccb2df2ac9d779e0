"""Host <-> device copies that do not wait for the device's queue.

The decoder keeps work queued on the device while the host prepares the next step. A plain `torch.tensor(values,
device="cuda")` or `.tolist()` of a device tensor copies through pageable memory and waits for everything queued
on the stream first, which would drain that queue at every step. These copies go through pinned memory instead:
host -> device returns at once, device -> host waits only for the work queued before it (an event). On CPU both are
plain copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HostCopy", "to_device"]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, queued behind the device's work without waiting for it."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass(frozen=True)
class HostCopy:
    """A device tensor's values on their way to the host; `values()` waits for the work queued before the copy."""
    host: torch.Tensor
    ready: torch.cuda.Event | None  # None: the copy is done (CPU)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> HostCopy:
        if tensor.device.type != "cuda":
            return cls(tensor, None)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(host, ready)

    def values(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
