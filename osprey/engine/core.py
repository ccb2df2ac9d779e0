"""Continuous batching of region rows over shared image prefixes: what `osprey serve` and `OspreyPipeline` decode with.

A `GroupRequest` is one image's shared prefix (system prompt, image tokens, text before the first region) and its
rows (each region's own tokens and sampling settings). `step()` either admits waiting groups (prefix prefilled
once into a prefix slot, then all new rows' suffixes in one pass, first tokens sampled) or runs one decoding step
for every live row. Rows join and leave between steps; finished and released rows free their slots at once. A
group waits while its rows do not fit the preallocated pool, so load never runs the device out of memory.

Decoding keeps the device fed: while rows keep decoding, a call to `step()` first queues the next step, fed on
the device by the tokens of the step in flight, and only then waits for that step's tokens and returns them as
events. The device goes from one step to the next without waiting for the host, and the caller's work on the
events (text, stop strings, sending) runs while it computes. Rows whose token budget ends with the step in flight
leave before the next step is queued; a row that ends with EOS, or is released in between (a stop string, a
cancellation), runs one step more, its token discarded. Admitting a group, or freeing released rows, lets the step
in flight finish first (nothing is queued ahead of it then).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel

from osprey.engine.forward import LlamaForward, RowBlock
from osprey.engine.graphs import DecodeStep
from osprey.engine.kv import KVPool, PoolSize
from osprey.engine.sampling import sample
from osprey.engine.transfer import HostCopy, to_device
from osprey.generation import SamplingParams

__all__ = ["GroupRequest", "RegionDecoder", "RowRequest", "TokenEvent"]


_SEED_RANGE = 1 << 62  # any integer seed (the API takes the whole int64 range) maps into a device int64


@dataclass(frozen=True)
class RowRequest:
    row_id: Hashable  # the caller's name for the row, unique among rows in flight
    suffix: torch.Tensor  # (t, D) embeddings of the row's own prompt tokens (t >= 1), after the group's prefix
    params: SamplingParams


@dataclass(frozen=True)
class GroupRequest:
    prefix: torch.Tensor  # (P, D) embeddings every row of the group starts with
    rows: list[RowRequest]


@dataclass(frozen=True)
class TokenEvent:
    row_id: Hashable
    token: int | None  # the new token; None when the row ended with EOS (EOS is not part of the answer)
    finished: bool
    finish_reason: str | None  # "stop" (EOS) | "length" (max_new_tokens reached) | None


@dataclass
class _Group:
    prefix_length: int
    live_rows: int


@dataclass
class _Row:
    request: RowRequest
    group: int  # prefix slot
    local: int  # index within its group (its column in the prefix query block)
    length: int  # suffix tokens whose keys/values are stored (or queued to be)
    seed: int
    last_token: int = -1  # sampled, not yet fed
    generated: int = 0  # tokens recorded (the step in flight's not yet)
    done: bool = False  # leaves its slot at the next compaction
    ended: bool = False  # its last event is out (or it was released): later tokens of it are discarded


@dataclass
class _Waiting:
    group: GroupRequest
    ready: collections.deque = field(default_factory=collections.deque)


@dataclass(frozen=True)
class _InFlight:
    rows: list[_Row]  # the rows the step was launched for, in their pool order then
    tokens: torch.Tensor  # (len(rows),) the tokens it samples, on the device
    copy: HostCopy  # the same tokens on their way to the host


@dataclass(frozen=True)
class _SamplingSettings:
    """The rows' sampling settings as device tensors, one entry per row."""
    temperature: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor  # tokens generated so far (the noise's counter)
    any_sampled: bool

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_p, self.seed, self.step, self.any_sampled)


class RegionDecoder:
    def __init__(self, language_model: PreTrainedModel, eos_token_id: int, pool_size: PoolSize,
                 max_prefill_tokens: int = 16384, cuda_graphs: bool = True, fast_kernels: bool = False) -> None:
        self.forward = LlamaForward(language_model, fast_kernels)
        self.eos_token_id = eos_token_id
        weight = language_model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.pool = KVPool(pool_size, self.forward.num_layers, self.forward.num_kv_heads, self.forward.head_dim,
                           self.dtype, self.device)
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_step = DecodeStep(self.forward, self.pool, use_graphs=cuda_graphs and self.device.type == "cuda")
        self.waiting: collections.deque[GroupRequest] = collections.deque()
        self.groups: list[_Group] = []
        self.rows: list[_Row] = []
        self._released: set[Hashable] = set()
        self._in_flight: _InFlight | None = None

    # -- requests ----------------------------------------------------------------------------------------------
    def check(self, group: GroupRequest) -> None:
        """Raise ValueError naming the first row that cannot fit the pool."""
        if group.prefix.shape[0] < 1:
            raise ValueError("a group needs at least one prefix token")
        overflow = max(0, group.prefix.shape[0] - self.pool.max_prefix)
        for row in group.rows:
            prompt = overflow + row.suffix.shape[0]
            need = prompt + row.params.max_new_tokens
            if row.suffix.shape[0] < 1 or need > self.pool.max_suffix:
                raise ValueError(f"row {row.row_id!r} needs {need} tokens of its own ({prompt} prompt + "
                                 f"{row.params.max_new_tokens} new); the engine holds {self.pool.max_suffix} per row")

    def add(self, group: GroupRequest) -> None:
        """Queue a group; raises ValueError naming the row that cannot fit the pool."""
        self.check(group)
        group = self._fit_prefix(group)
        slots = self.pool.size.row_slots
        for start in range(0, len(group.rows), slots):  # more rows than the pool holds: several admissions
            self.waiting.append(GroupRequest(group.prefix, group.rows[start:start + slots]))

    def release(self, row_id: Hashable) -> None:
        """Stop a row (cancelled, or a stop string found by the caller); its slot is freed before the next step."""
        self._released.add(row_id)

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or self._in_flight)

    @property
    def live_rows(self) -> int:
        return len(self.rows)

    # -- stepping ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """The events of the decoding step in flight (if any), the next step queued before waiting for them when rows
        go on decoding; otherwise, once they are in, admit what fits (prefill: its first tokens' events too) or
        launch the next decoding step for every live row."""
        ahead = self._launch_ahead()
        events = self._collect()
        if ahead is not None:
            self._in_flight = ahead
            return events
        self._drop_released()
        admitted = self._admit()
        if admitted:
            return events + self._prefill(admitted)
        if self.rows:
            self._in_flight = self._launch()
        return events

    def _fit_prefix(self, group: GroupRequest) -> GroupRequest:
        """A prefix longer than the prefix slots: its tail becomes the start of every row's suffix."""
        keep = self.pool.max_prefix
        if group.prefix.shape[0] <= keep:
            return group
        tail = group.prefix[keep:]
        rows = [RowRequest(r.row_id, torch.cat([tail, r.suffix]), r.params) for r in group.rows]
        return GroupRequest(group.prefix[:keep], rows)

    def _drop_released(self) -> None:
        if not self._released:
            return
        for row in self.rows:
            if row.request.row_id in self._released:
                row.done = row.ended = True
        for group in list(self.waiting):
            kept = [r for r in group.rows if r.row_id not in self._released]
            if len(kept) != len(group.rows):
                self.waiting.remove(group)
                if kept:
                    self.waiting.appendleft(GroupRequest(group.prefix, kept))
        self._released.clear()
        self._compact()

    def _admit(self) -> list[GroupRequest]:
        admitted: list[GroupRequest] = []
        rows = len(self.rows)
        tokens = 0
        while self.waiting:
            group = self.waiting[0]
            size = group.prefix.shape[0] + sum(r.suffix.shape[0] for r in group.rows)
            if not self._fits(group, rows, len(self.groups) + len(admitted)) or (
                    admitted and tokens + size > self.max_prefill_tokens):
                break
            admitted.append(self.waiting.popleft())
            rows += len(group.rows)
            tokens += size
        return admitted

    def _fits(self, group: GroupRequest, rows: int, groups: int) -> bool:
        """`group` fits beside `rows` live rows of `groups` groups."""
        size = self.pool.size
        return groups < size.prefix_slots and rows + len(group.rows) <= size.row_slots

    def _prefill(self, admitted: list[GroupRequest]) -> list[TokenEvent]:
        first_group, first_row = len(self.groups), len(self.rows)
        self.forward.prefill_prefixes([group.prefix.to(self.device, self.dtype) for group in admitted], self.pool,
                                      list(range(first_group, first_group + len(admitted))))
        for group in admitted:
            slot = len(self.groups)
            self.groups.append(_Group(group.prefix.shape[0], len(group.rows)))
            for local, request in enumerate(group.rows):
                seed = random.getrandbits(62) if request.params.seed is None else request.params.seed % _SEED_RANGE
                self.rows.append(_Row(request, slot, local, 0, seed))
        new_rows = self.rows[first_row:]
        embeds, lengths = self._pad([row.request.suffix for row in new_rows])
        block = self._prefill_block(new_rows, first_row, first_group, embeds.shape[1], lengths)
        prefix_lengths = torch.tensor([g.prefix_length for g in self.groups[first_group:]], device=self.device)
        logits = self.forward.forward_rows(embeds, block, self.pool, prefix_lengths)
        for row, length in zip(new_rows, lengths):
            row.length = length
        return self._advance(new_rows, logits)

    def _launch_ahead(self) -> _InFlight | None:
        """Queue the next step behind the one in flight, fed by its tokens on the device; None (nothing queued)
        when there is none in flight, rows were released (their slots are freed first) or a waiting group fits
        now (it is admitted once the step in flight is in). Rows whose budget ends with the step in flight leave
        first."""
        launched = self._in_flight
        if launched is None or self._released:
            return None
        for row in self.rows:
            if row.generated + 1 >= row.request.params.max_new_tokens:
                row.done = True  # its last token is the step in flight's; the slot is moved behind that step
        self._compact()
        if not self.rows or (self.waiting and self._fits(self.waiting[0], len(self.rows), len(self.groups))):
            return None
        position = {id(row): index for index, row in enumerate(launched.rows)}
        index = [position[id(row)] for row in self.rows]
        tokens = launched.tokens
        if index != list(range(len(launched.rows))):
            tokens = tokens[to_device(index, torch.long, self.device)]
        return self._launch(tokens)

    def _launch(self, device_tokens: torch.Tensor | None = None) -> _InFlight:
        """Queue one decoding step for every live row, fed by their last tokens (or by `device_tokens`, the step in
        flight's, one per row); nothing here waits for the device."""
        rows, groups = self.rows, self.groups
        start = [row.length for row in rows]
        shape = self.decode_step.shape(len(rows), len(groups), max(row.local for row in rows) + 1,
                                       max(g.prefix_length for g in groups), max(start) + 1)
        # the noise counter is the token's index: one more when the step in flight's token is not recorded yet
        settings = self._sampling_settings(rows, pending=int(device_tokens is not None))
        logits = self.decode_step([row.last_token for row in rows], start, [row.group for row in rows],
                                  [row.local for row in rows], [g.prefix_length for g in groups], shape,
                                  device_tokens=device_tokens)
        for row in rows:
            row.length += 1
        tokens = settings.sample(logits)
        return _InFlight(list(rows), tokens, HostCopy.of(tokens))

    def _collect(self) -> list[TokenEvent]:
        """Wait for the step in flight and turn its tokens into events; rows ended or released meanwhile get none."""
        if self._in_flight is None:
            return []
        launched, self._in_flight = self._in_flight, None
        tokens = launched.copy.values()
        live = [(row, token) for row, token in zip(launched.rows, tokens)
                if not row.ended and row.request.row_id not in self._released]
        return self._record([row for row, _ in live], [token for _, token in live])

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[TokenEvent]:
        """Sample each row's next token now (the prefill's first tokens) and record it."""
        return self._record(rows, self._sampling_settings(rows).sample(logits).tolist())

    def _record(self, rows: list[_Row], chosen: list[int]) -> list[TokenEvent]:
        """Record each row's new token, and finish rows at EOS or their token budget."""
        events = []
        for row, token in zip(rows, chosen):
            if token == self.eos_token_id:
                row.done = row.ended = True
                events.append(TokenEvent(row.request.row_id, None, True, "stop"))
                continue
            row.last_token, row.generated = token, row.generated + 1
            row.done = row.ended = row.generated >= row.request.params.max_new_tokens
            events.append(TokenEvent(row.request.row_id, token, row.done, "length" if row.done else None))
        self._compact()
        return events

    def _sampling_settings(self, rows: list[_Row], pending: int = 0) -> _SamplingSettings:
        params = [row.request.params for row in rows]
        floats = to_device([[p.temperature for p in params], [p.top_p for p in params]], torch.float32, self.device)
        ints = to_device([[row.seed for row in rows], [row.generated + pending for row in rows]], torch.long,
                         self.device)
        return _SamplingSettings(floats[0], floats[1], ints[0], ints[1], any(p.temperature > 0 for p in params))

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _prefill_block(self, rows: list[_Row], first_row: int, first_group: int, tokens: int, lengths: list[int]
                       ) -> RowBlock:
        """The new rows (pool slots from `first_row`, groups from `first_group`), their suffixes written from 0."""
        device = self.device
        return RowBlock(
            first=first_row, count=len(rows), tokens=tokens,
            start=torch.zeros(len(rows), dtype=torch.long, device=device), lengths=torch.tensor(lengths, device=device),
            group=torch.tensor([row.group - first_group for row in rows], device=device),
            local=torch.tensor([row.local for row in rows], device=device),
            group_first=first_group, groups=len(self.groups) - first_group,
            width=max(row.local for row in rows) + 1,
            prefix_keys=max(group.prefix_length for group in self.groups[first_group:]),
            suffix_keys=tokens,
        )

    def _pad(self, suffixes: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Row suffixes (t_i, D) -> (n, max t, D) zero-padded on the right, and the t_i."""
        lengths = [s.shape[0] for s in suffixes]
        batch = pad_sequence([s.to(self.device, self.dtype) for s in suffixes], batch_first=True)
        return batch, lengths

    def _compact(self) -> None:
        """Free the slots of finished rows and of groups without live rows, keeping live slots at the front."""
        if not any(row.done for row in self.rows):
            return
        for row in self.rows:
            if row.done:
                self.groups[row.group].live_rows -= 1
        self.rows = self._compact_rows()
        emptied = [index for index, group in enumerate(self.groups) if group.live_rows == 0]
        for index in sorted(emptied, reverse=True):
            last = len(self.groups) - 1
            if index != last:
                self.pool.move_prefix(last, index)
                self.groups[index] = self.groups[last]
                for row in self.rows:
                    if row.group == last:
                        row.group = index
            self.groups.pop()

    def _compact_rows(self) -> list[_Row]:
        live = [index for index, row in enumerate(self.rows) if not row.done]
        count = len(live)
        sources = [index for index in live if index >= count]
        targets = [index for index in range(count) if self.rows[index].done]
        self.pool.move_rows(sources, targets)
        rows = list(self.rows)
        for source, target in zip(sources, targets):
            rows[target] = self.rows[source]
        return rows[:count]
