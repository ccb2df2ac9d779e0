"""The one inference path (CLI, server, evaluation): encode an image once, describe many regions, batched.

    pipe = OspreyPipeline.from_pretrained("path/to/model")
    answers = pipe.describe(Image.open("x.jpg"), masks, task="short")   # masks: (Q, H, W) bool
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osprey.devices import resolve_device, resolve_dtype
from osprey.engine.core import GroupRequest, RegionDecoder, RowRequest
from osprey.engine.kv import PoolSize, plan_pool, token_bytes
from osprey.engine.session import DecodeSession, StreamEvent
from osprey.generation import SamplingParams
from osprey.modeling import OspreyForCausalLM
from osprey.preprocess import load_image, masks_to_tensor, preprocess_images
from osprey.prompts import clean_answer, task_prompt
from osprey.tokenization import encode_generation_prompt

logger = logging.getLogger(__name__)

# Images per vision pass in `encode_images`: the images of a burst of requests (the server's worker admits what
# queued while it stepped) share one pass; the bound keeps the activations of a pass small (ConvNeXt-L at 512 px).
IMAGES_PER_VISION_PASS = 16

__all__ = ["EncodedImage", "Generation", "OspreyPipeline", "PreparedPrompt", "SamplingParams", "StreamEvent"]


@dataclass
class EncodedImage:
    """Vision features of one image, reusable for any number of prompts and regions."""

    levels: list[torch.Tensor]  # res2..res5, each (C, h, w)
    tokens: torch.Tensor  # (N, D) projected image tokens
    height: int  # original size: masks must be (H, W)
    width: int


@dataclass
class PreparedPrompt:
    input_ids: torch.Tensor  # (T,) with expanded placeholders
    image: EncodedImage
    mask_tokens: torch.Tensor  # (Q, D)
    pos_tokens: torch.Tensor  # (Q, D)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Generation:
    text: str  # cleaned as the official eval scripts do (osprey.prompts.clean_answer)
    raw_text: str  # decoded answer, stop strings removed
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"


class OspreyPipeline:
    def __init__(self, model: OspreyForCausalLM, tokenizer, max_batch_size: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch_size = max_batch_size
        self.eos_token_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        clip_weights: str | Path | None = None,
        max_batch_size: int = 32,
    ) -> OspreyPipeline:
        from osprey.checkpoint import load_pretrained

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model, tokenizer, report = load_pretrained(path, clip_weights=clip_weights, dtype=dtype, device=device)
        for note in report.notes:
            logger.info("load: %s", note)
        return cls(model, tokenizer, max_batch_size=max_batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode_image(self, image: Image.Image | str | Path) -> EncodedImage:
        return self.encode_images([image])[0]

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image | str | Path], batch_size: int = IMAGES_PER_VISION_PASS
                      ) -> list[EncodedImage]:
        """Images through the vision tower `batch_size` at a time: the server encodes the images that arrive
        together in one pass, where one at a time leaves a GPU waiting on kernel launches."""
        encoded = []
        for start in range(0, len(images), batch_size):
            loaded = [load_image(image) for image in images[start:start + batch_size]]
            pixels = preprocess_images(loaded, self.config.vision, self.device)
            features = self.model.get_image_features(pixels)
            # each image's own copy of its levels, so that keeping one (the server's cache) keeps no others
            encoded += [EncodedImage(levels=[level[b].clone() for level in features.levels],
                                     tokens=features.tokens[b].clone(), height=image.height, width=image.width)
                        for b, image in enumerate(loaded)]
        return encoded

    @torch.inference_mode()
    def region_tokens(self, image: EncodedImage, masks: np.ndarray | torch.Tensor | Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, H, W) masks at the image's size -> mask tokens (Q, D), position tokens (Q, D)."""
        stack = masks_to_tensor(masks, image.height, image.width).to(self.device)
        regions = self.model.get_region_features([level[None] for level in image.levels], [stack])
        return regions.mask_tokens, regions.pos_tokens

    def prepare(
        self, image: EncodedImage, messages: Sequence[tuple[str, str]], masks: np.ndarray | torch.Tensor | Sequence
    ) -> PreparedPrompt:
        """A generation prompt: messages alternate human/gpt and end with a human turn; the human texts hold one
        `<mask><pos>` per mask, in mask order, and `<image>` at the start of the first turn."""
        ids = self._prompt_ids(messages)
        mask_tokens, pos_tokens = self.region_tokens(image, masks)
        self._check_region_count(ids, mask_tokens.shape[0])
        return PreparedPrompt(ids, image, mask_tokens, pos_tokens)

    def prepare_each(
        self, image: EncodedImage, messages: Sequence[tuple[str, str]], masks: np.ndarray | torch.Tensor | Sequence
    ) -> list[PreparedPrompt]:
        """One prompt per mask, all with the same single-region `messages` (describe): the text is tokenized once and
        every mask goes through the extractor in one pass."""
        ids = self._prompt_ids(messages)
        self._check_region_count(ids, 1)
        mask_tokens, pos_tokens = self.region_tokens(image, masks)
        return [PreparedPrompt(ids, image, mask_tokens[i:i + 1], pos_tokens[i:i + 1]) for i in range(mask_tokens.shape[0])]

    def _prompt_ids(self, messages: Sequence[tuple[str, str]]) -> torch.Tensor:
        ids = encode_generation_prompt(
            self.tokenizer, messages, num_image_tokens=self.config.vision.num_image_tokens,
            image_token_id=self.config.image_token_id,
        )
        if self.config.image_token_id not in ids:
            raise ValueError("the prompt has no <image> placeholder; put '<image>\\n' at the start of the first turn")
        if ids.count(self.config.image_token_id) != self.config.vision.num_image_tokens:
            raise ValueError("the prompt has more than one <image> placeholder")
        return torch.tensor(ids, dtype=torch.long)

    def _check_region_count(self, ids: torch.Tensor, num_masks: int) -> None:
        found = int((ids == self.config.mask_token_id).sum())
        if found != num_masks:
            raise ValueError(f"the prompt references {found} regions (<mask><pos>) but {num_masks} masks were given")

    # -- generation --------------------------------------------------------------------------------------------
    def group_requests(self, prompts: Sequence[PreparedPrompt], params: Sequence[SamplingParams],
                       share_prefix: bool = True, row_ids: Sequence[Hashable] | None = None) -> list[GroupRequest]:
        """Prompts -> engine groups. A prompt's prefix is everything before its first region (system prompt, image
        tokens, text); prompts with the same image and the same prefix ids share one group, so that prefix is
        computed and stored once for all of them. Row ids default to the prompt's index."""
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        members: dict[tuple, list[int]] = {}
        for index, prompt in enumerate(prompts):
            prefix_ids = prompt.input_ids[:self._prefix_length(prompt.input_ids)]
            key = (id(prompt.image), tuple(prefix_ids.tolist())) if share_prefix else (index,)
            members.setdefault(key, []).append(index)
        groups = []
        for indices in members.values():
            first = prompts[indices[0]]
            split = self._prefix_length(first.input_ids)
            suffixes = self._embed_suffixes([prompts[i] for i in indices], split)
            rows = [RowRequest(row_ids[i], suffix, params[i]) for i, suffix in zip(indices, suffixes)]
            groups.append(GroupRequest(self._merge(first.input_ids[None, :split], first.image)[0], rows))
        return groups

    def split_shared_prefix(self, prompts: Sequence[PreparedPrompt]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prompts of one image -> the embeddings (P, D) of the ids they all start with, up to the first region
        of any (at least one token left to each), and each prompt's own rest (t_i, D) with its region tokens: the
        group and rows of one scoring pass (osprey.scoring), where prompts differ before their region too."""
        if len({id(prompt.image) for prompt in prompts}) != 1:
            raise ValueError("the prompts are about more than one image")
        split = min(self._prefix_length(prompt.input_ids) for prompt in prompts)
        first = prompts[0].input_ids
        for prompt in prompts[1:]:
            differ = (prompt.input_ids[:split] != first[:split]).nonzero()
            split = int(differ[0, 0]) if len(differ) else split
        return self._merge(first[None, :split], prompts[0].image)[0], self._embed_suffixes(prompts, split)

    def _embed_suffixes(self, prompts: Sequence[PreparedPrompt], split: int) -> list[torch.Tensor]:
        """Each prompt's ids from `split` on, embedded with its region tokens; prompts whose suffix ids are the same
        (the regions of one describe call) in one batched lookup."""
        batches: dict[tuple, list[int]] = {}
        for index, prompt in enumerate(prompts):
            batches.setdefault(tuple(prompt.input_ids[split:].tolist()), []).append(index)
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for ids, indices in batches.items():
            rows = [prompts[i] for i in indices]
            batch_ids = torch.tensor(ids)[None].expand(len(rows), -1)
            mask_tokens = torch.cat([p.mask_tokens for p in rows]) if rows[0].mask_tokens.shape[0] else None
            pos_tokens = torch.cat([p.pos_tokens for p in rows]) if rows[0].pos_tokens.shape[0] else None
            embeds = self._merge(batch_ids, rows[0].image, mask_tokens, pos_tokens)
            for index, row in zip(indices, embeds):
                out[index] = row
        return out

    def _prefix_length(self, ids: torch.Tensor) -> int:
        """Tokens before the first <mask> (the part shared by all regions of an image); at least one token is left
        to the row, whose last position gives the first logits."""
        masks = (ids == self.config.mask_token_id).nonzero()
        return int(masks[0, 0]) if len(masks) else int(ids.shape[0]) - 1

    def _merge(self, ids: torch.Tensor, image: EncodedImage, mask_tokens: torch.Tensor | None = None,
               pos_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T), all rows alike in where the image goes -> (B, T, D). The image's tokens fill its slots only
        where the ids hold them: a prefix does, a region's own tokens do not."""
        has_image = bool((ids[0] == self.config.image_token_id).any())
        image_tokens = image.tokens[None].expand(ids.shape[0], -1, -1) if has_image else None
        return self.model.merge_embeddings(ids.to(self.device), image_tokens, mask_tokens, pos_tokens)

    def decoder(self, pool_size: PoolSize, fast_kernels: bool = True) -> RegionDecoder:
        """A continuous-batching decoder over this model with a preallocated KV pool of `pool_size`
        (`fast_kernels`: the engine's Triton decoding kernels and compiled layers on CUDA, docs/engine.md)."""
        return RegionDecoder(self.model.language_model, self.eos_token_id, pool_size, fast_kernels=fast_kernels)

    def engine_pool(self, max_rows: int, max_row_tokens: int, kv_cache_gb: float | None = None,
                    rows_per_image: int = 16) -> PoolSize:
        """The KV pool of a long-running engine: at most `max_rows` region rows of `max_row_tokens` each (their own
        prompt after the image prefix + answer), within `kv_cache_gb` (default: 90% of the GPU memory left, less
        4 GiB for a prefill's activations; 1 GiB on CPU)."""
        lm = self.model.language_model
        per_token = token_bytes(lm.config.num_hidden_layers, lm.config.num_key_value_heads,
                                lm.model.layers[0].self_attn.head_dim, self.model.dtype)
        if kv_cache_gb is not None:
            budget = int(kv_cache_gb * 2**30)
        elif self.device.type == "cuda":
            torch.cuda.empty_cache()  # blocks cached from an earlier pool count as used otherwise
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(0.9 * free) - 4 * 2**30
        else:
            budget = 2**30
        prefix_tokens = self.config.vision.num_image_tokens + 256  # system prompt and text before the first region
        plan = plan_pool(budget, per_token, prefix_tokens, max_row_tokens, rows_per_image)
        rows = min(plan.row_slots, max_rows)
        return PoolSize(min(plan.prefix_slots, rows), prefix_tokens, rows, max_row_tokens)

    def session(self, pool_size: PoolSize, fast_kernels: bool = True) -> DecodeSession:
        """A decoder that turns tokens into streamed text (stop strings included)."""
        return DecodeSession(self.decoder(pool_size, fast_kernels), self.tokenizer)

    @torch.inference_mode()
    def generate_stream(
        self,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams] | SamplingParams = SamplingParams(),
        cancelled: Callable[[int], bool] | None = None,
        share_prefix: bool = True,
    ) -> Iterator[list[StreamEvent]]:
        """Decode all prompts together; yield per step the events of rows that produced text or finished.

        `cancelled(row)` is polled each step: a cancelled row finishes with reason "cancelled".
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if not prompts:
            return
        groups = self.group_requests(prompts, params, share_prefix)
        session = self.session(_pool_for(groups))
        session.add(groups)
        live = set(range(len(prompts)))
        while session.has_work:
            events = [session.cancel(row) for row in sorted(live) if cancelled is not None and cancelled(row)]
            events += session.step()
            live -= {event.row for event in events if event.finished}
            if events:
                yield events

    def generate(
        self,
        prompts: Sequence[PreparedPrompt],
        params: Sequence[SamplingParams] | SamplingParams = SamplingParams(),
        share_prefix: bool = True,
    ) -> list[Generation]:
        """Batched generation in chunks of max_batch_size; results in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        results: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = prompts[start:start + self.max_batch_size]
            texts = [""] * len(chunk)
            counts = [0] * len(chunk)
            reasons = ["length"] * len(chunk)
            for events in self.generate_stream(chunk, params[start:start + len(chunk)], share_prefix=share_prefix):
                for e in events:
                    texts[e.row] += e.text_delta
                    counts[e.row] += e.token_id is not None
                    if e.finished:
                        reasons[e.row] = e.finish_reason or "length"
            results += [
                Generation(clean_answer(t), t, p.num_tokens, n, r) for t, p, n, r in zip(texts, chunk, counts, reasons)
            ]
        return results

    def describe(
        self,
        image: Image.Image | str | Path | EncodedImage,
        masks: np.ndarray | torch.Tensor | Sequence,
        task: str = "short",
        params: SamplingParams = SamplingParams(),
    ) -> list[Generation]:
        """One answer per mask (each its own single-region prompt), the image encoded once for all of them."""
        encoded = image if isinstance(image, EncodedImage) else self.encode_image(image)
        return self.generate(self.prepare_each(encoded, [("human", task_prompt(task))], masks), params)


def _pool_for(groups: Sequence[GroupRequest]) -> PoolSize:
    """A pool that holds exactly these groups at once."""
    rows = [row for group in groups for row in group.rows]
    return PoolSize(
        prefix_slots=len(groups), prefix_tokens=max(group.prefix.shape[0] for group in groups),
        row_slots=len(rows), suffix_tokens=max(row.suffix.shape[0] + row.params.max_new_tokens for row in rows),
    )
