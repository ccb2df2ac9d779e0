"""The decoding step at a padded shape, replayed from a CUDA graph on GPUs: one launch instead of ~1,600 kernels.

A 7B decoding step launches about 50 kernels per layer; at small batches launching them takes longer than running
them, so one region alone would wait on the host. The step's shape is padded up to a bucket (rows, image groups and
query-block width to powers of two, prefix and suffix keys to multiples of 64), so a few recorded graphs serve every
load; each is recorded the first time its shape comes up (with the packed CUDA kernel, which reads the slots in
place, only the row and group counts make a shape). The same padding runs eagerly on CPU (and is tested
there). Padding rows sit in free row slots, read a spare query-block column of group 0 and write their keys at the
last suffix position, which no row ever fills (a row's last token is sampled, never fed), so they touch no live row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from osprey.engine.attention import packed_kernel_runs
from osprey.engine.forward import LlamaForward, RowBlock
from osprey.engine.kv import KVPool

log = logging.getLogger(__name__)

__all__ = ["DecodeShape", "DecodeStep"]


@dataclass(frozen=True)
class DecodeShape:
    rows: int
    groups: int
    width: int
    prefix_keys: int
    suffix_keys: int


def _power_of_two(value: int, cap: int | None = None) -> int:
    bucket = 1 << max(0, value - 1).bit_length()
    return bucket if cap is None else min(bucket, cap)


def _multiple(value: int, step: int, cap: int) -> int:
    return min(-(-value // step) * step, cap)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # the static input buffer the graph reads
    logits: torch.Tensor  # the static output it writes


class DecodeStep:
    def __init__(self, forward: LlamaForward, pool: KVPool, use_graphs: bool) -> None:
        self.forward, self.pool = forward, pool
        self.use_graphs = use_graphs
        self._graphs: dict[DecodeShape, _Graph] = {}
        self._memory = torch.cuda.graph_pool_handle() if use_graphs else None

    def shape(self, rows: int, groups: int, width: int, prefix_keys: int, suffix_keys: int) -> DecodeShape:
        size = self.pool.size
        if packed_kernel_runs(self.pool.prefix_k[0]):  # the packed kernel reads slots in place: only counts matter
            return DecodeShape(rows=_power_of_two(rows, size.row_slots), groups=_power_of_two(groups, size.prefix_slots),
                               width=1, prefix_keys=size.prefix_tokens, suffix_keys=size.suffix_tokens)
        return DecodeShape(rows=_power_of_two(rows, size.row_slots), groups=_power_of_two(groups, size.prefix_slots),
                           width=_power_of_two(width + 1), prefix_keys=_multiple(prefix_keys, 64, size.prefix_tokens),
                           suffix_keys=_multiple(suffix_keys, 64, size.suffix_tokens))

    def __call__(self, tokens: list[int], start: list[int], group: list[int], local: list[int],
                 prefix_lengths: list[int], shape: DecodeShape, device_tokens: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """One token per live row (rows 0 .. n-1 of the pool) -> logits (n, V) fp32. `device_tokens` (n,), when
        given, are the rows' tokens instead of `tokens`: read on the device, so the step can be queued before the
        step that samples them has finished."""
        inputs = self._inputs(tokens, start, group, local, prefix_lengths, shape)
        rows = len(tokens)
        if self.use_graphs:
            graph = self._graphs.get(shape) or self._record(shape)
            if graph is not None:
                graph.inputs.copy_(inputs, non_blocking=True)
                if device_tokens is not None:
                    graph.inputs[:rows].copy_(device_tokens)
                graph.graph.replay()
                return graph.logits[:rows]
        inputs = inputs.to(self.pool.prefix_k[0].device, non_blocking=True)
        if device_tokens is not None:
            inputs[:rows] = device_tokens
        return self._run(shape, inputs)[:rows]

    def _inputs(self, tokens: list[int], start: list[int], group: list[int], local: list[int],
                prefix_lengths: list[int], shape: DecodeShape) -> torch.Tensor:
        """The padded inputs as one host tensor: tokens, start, group, local (rows each), then prefix lengths."""
        pad = shape.rows - len(tokens)
        pad_groups = shape.groups - len(prefix_lengths)
        values = (tokens + [0] * pad + start + [self.pool.max_suffix - 1] * pad + group + [0] * pad
                  + local + [shape.width - 1] * pad + prefix_lengths + [1] * pad_groups)
        return torch.tensor(values, dtype=torch.long, pin_memory=self.pool.prefix_k[0].is_cuda)

    def _run(self, shape: DecodeShape, inputs: torch.Tensor) -> torch.Tensor:
        rows = shape.rows
        tokens, start, group, local = inputs[:4 * rows].view(4, rows)
        block = RowBlock(first=0, count=rows, tokens=1, start=start, lengths=torch.ones_like(start), group=group,
                         local=local, group_first=0, groups=shape.groups, width=shape.width,
                         prefix_keys=shape.prefix_keys, suffix_keys=shape.suffix_keys)
        return self.forward.forward_rows(self.forward.embed(tokens)[:, None], block, self.pool, inputs[4 * rows:])

    def _record(self, shape: DecodeShape) -> _Graph | None:
        """Record the step at `shape` (after one eager run that settles lazy allocations); None if recording fails."""
        device = self.pool.prefix_k[0].device
        placeholder = [0] * shape.rows
        inputs = self._inputs(placeholder, [self.pool.max_suffix - 1] * shape.rows, placeholder,
                              [shape.width - 1] * shape.rows, [1] * shape.groups, shape).to(device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._run(shape, inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._memory):
                logits = self._run(shape, inputs)
        except RuntimeError as exc:  # an op that cannot be recorded: decode eagerly from now on, and say so
            log.warning("CUDA graph recording failed at %s (%s): decoding eagerly", shape, exc)
            self.use_graphs = False
            return None
        self._graphs[shape] = _Graph(graph, inputs, logits)
        log.info("recorded the decoding step at %s", shape)
        return self._graphs[shape]
