"""vLLM's multimodal processing for Osprey: image and region items -> model inputs and placeholder slots.

Two modalities. `image`: a PIL image, preprocessed exactly as our pipeline does (`osprey.preprocess`), one
`<image>` placeholder expanded to `num_image_tokens` slots. `region`: one mask of that image; its `<mask><pos>`
pair stays two slots, filled with the extractor's two embeddings. Regions come as `multi_modal_data["region"]`
(masks (H, W) or a (Q, H, W) stack; the request's image is attached here) or, through vLLM's OpenAI server whose
chat messages carry no custom modality, as `mm_processor_kwargs={"regions": [...]}` in any form `osprey.masks`
decodes (COCO RLE, polygons, boxes, PNG). The regions are taken out of the kwargs before hashing, so the image's
hash never depends on them (see `prompts` for the prefix-caching argument).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.config.multimodal import BaseDummyOptions
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ModalityDataItems,
    MultiModalDataItems,
    MultiModalDataParser,
    ProcessorBatchItems,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from osprey.checkpoint import read_config
from osprey.config import OspreyConfig
from osprey.masks import MaskError, decode_regions
from osprey.preprocess import preprocess_image
from osprey.tokenization import load_tokenizer

from .prompts import (
    IMAGE_MODALITY,
    REGION_MODALITY,
    REGION_SLOTS,
    RegionItem,
    check_region_count,
    content_key,
    image_placeholder_id,
    key_to_ints,
    placeholder_text,
    region_items,
    text_prompt_ids,
)

REGIONS_KWARG = "regions"  # mm_processor_kwargs key for regions sent through vLLM's OpenAI server
MAX_REGIONS = 64
RECENT_IMAGES = 16  # preprocessed images kept by the processor


class RegionProcessorItems(ProcessorBatchItems[object]):
    """Region items: bound ones are `RegionItem.as_data()` dicts (hashed as their mask and their image); bare masks
    wait for the processor's `apply` to bind them to the request's image."""

    def __init__(self, data: Sequence[object]) -> None:
        super().__init__(list(data), REGION_MODALITY)


def _is_bound(item: object) -> bool:
    return isinstance(item, dict)


class OspreyDataParser(MultiModalDataParser):
    """vLLM's parser plus the `region` modality: a RegionItem (or its data), a mask (H, W), a (Q, H, W) stack, or a
    list of them."""

    def _parse_region_data(self, data: object) -> ModalityDataItems[Any, Any] | None:
        if data is None:
            return None
        if isinstance(data, (RegionItem, dict)) or (isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 2):
            items = [data]
        elif isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 3 or isinstance(data, (list, tuple)):
            items = list(data)
        else:
            raise ValueError(f"region data must be masks (H, W), a (Q, H, W) stack or a list, got {type(data).__name__}")
        return RegionProcessorItems([self._region(item) for item in items])

    @staticmethod
    def _region(item: object) -> object:
        if isinstance(item, RegionItem):
            return item.as_data()
        if isinstance(item, dict):
            return RegionItem.from_data(item).as_data()  # checked
        return np.asarray(item)

    def _get_subparsers(self):
        return {**super()._get_subparsers(), REGION_MODALITY: self._parse_region_data}


class OspreyProcessingInfo(BaseProcessingInfo):
    @cached_property
    def osprey_config(self) -> OspreyConfig:
        return read_config(self.ctx.model_config.model)

    @cached_property
    def osprey_tokenizer(self):
        """The official tokenization (osprey.tokenization), whatever tokenizer vLLM loaded (or none)."""
        return load_tokenizer(self.ctx.model_config.tokenizer or self.ctx.model_config.model)

    def get_tokenizer(self):
        # vLLM's prompt-update helpers ask for a tokenizer even for token-id targets; with skip_tokenizer_init
        # (our backend detokenizes itself) vLLM has none, so ours stands in.
        return self.ctx.tokenizer if self.ctx.tokenizer is not None else self.osprey_tokenizer

    def get_data_parser(self) -> MultiModalDataParser:
        return OspreyDataParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {IMAGE_MODALITY: 1, REGION_MODALITY: None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {IMAGE_MODALITY: self.osprey_config.vision.num_image_tokens, REGION_MODALITY: REGION_SLOTS}


class OspreyDummyInputsBuilder(BaseDummyInputsBuilder[OspreyProcessingInfo]):
    """Profiling inputs: square images of the tower's size, each region a full mask."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return (placeholder_text(IMAGE_MODALITY) * mm_counts.get(IMAGE_MODALITY, 0)
                + placeholder_text(REGION_MODALITY) * mm_counts.get(REGION_MODALITY, 0))

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: Mapping[str, BaseDummyOptions]) -> dict[str, object]:
        size = self.info.osprey_config.vision.image_size
        images = self._get_dummy_images(width=size, height=size, num_images=max(1, mm_counts.get(IMAGE_MODALITY, 0)))
        data: dict[str, object] = {}
        if mm_counts.get(IMAGE_MODALITY, 0):
            data[IMAGE_MODALITY] = images[:mm_counts[IMAGE_MODALITY]]
        if mm_counts.get(REGION_MODALITY, 0):
            data[REGION_MODALITY] = region_items(images[0], np.ones((mm_counts[REGION_MODALITY], size, size), bool))
        return data


class OspreyMultiModalProcessor(BaseMultiModalProcessor[OspreyProcessingInfo]):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._recent: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()

    # -- the request's regions, bound to its image, before anything is hashed ------------------------------------
    def apply(self, inputs, timing_ctx):
        return super().apply(self._bind_regions(inputs), timing_ctx)

    def _bind_regions(self, inputs):
        """Masks given as `region` data or as the `regions` kwarg become RegionItems of the request's image."""
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        from_kwargs = kwargs.pop(REGIONS_KWARG, None)
        items = inputs.mm_data_items
        raw = list(items[REGION_MODALITY].get_all()) if REGION_MODALITY in items else []
        if from_kwargs is None and all(_is_bound(r) for r in raw):
            return inputs
        images = items[IMAGE_MODALITY].get_all() if IMAGE_MODALITY in items else []
        if len(images) != 1 or not isinstance(images[0], Image.Image):
            raise ValueError("regions need exactly one image (as a picture, not embeddings) in the same request")
        image = images[0]
        bound: list[dict[str, object]] = []
        for item in raw:  # in request order
            bound += [item] if _is_bound(item) else [r.as_data() for r in region_items(image, item)]
        if from_kwargs is not None:
            try:
                decoded = decode_regions(from_kwargs, image.height, image.width, max_regions=MAX_REGIONS)
            except MaskError as exc:
                raise ValueError(f"mm_processor_kwargs.regions: {exc}") from None
            bound += [r.as_data() for r in region_items(image, decoded.masks)]
        self.info.validate_num_items(REGION_MODALITY, len(bound))
        new_items = MultiModalDataItems({**items, REGION_MODALITY: RegionProcessorItems(bound)})  # image items as parsed
        uuids = {k: v for k, v in (inputs.mm_uuid_items or {}).items() if k != REGION_MODALITY} or None
        return dataclasses.replace(inputs, mm_data_items=new_items, mm_uuid_items=uuids, hf_processor_mm_kwargs=kwargs)

    # -- text and items -> tensors ---------------------------------------------------------------------------------
    def _call_hf_processor(self, prompt: str, mm_data: Mapping[str, object], mm_kwargs: Mapping[str, object],
                           tok_kwargs: Mapping[str, object]) -> BatchFeature:
        """Our tokenization of the text (one image placeholder id) and our preprocessing of the items."""
        config = self.info.osprey_config
        out: dict[str, object] = {"input_ids": [text_prompt_ids(self.info.osprey_tokenizer, config, prompt)]}
        images = mm_data.get(f"{IMAGE_MODALITY}s") or []
        if images:
            pixels, keys = zip(*(self._pixels(im) for im in images))
            out["pixel_values"], out["image_key"] = torch.stack(pixels), torch.tensor(keys)
        regions = [RegionItem.from_data(r) for r in mm_data.get(f"{REGION_MODALITY}s") or []]
        if regions:
            pixels, keys = zip(*(self._pixels(r.image) for r in regions))
            out["region_masks"] = [torch.from_numpy(np.ascontiguousarray(r.mask)) for r in regions]
            out["region_pixel_values"], out["region_image_key"] = torch.stack(pixels), torch.tensor(keys)
        return BatchFeature(out)

    def _pixels(self, image: Image.Image) -> tuple[torch.Tensor, list[int]]:
        """(3, S, S) pixels in the model's dtype (our preprocessing; the tower casts to it first anyway) and the
        image's key; the last few images' pixels are kept, since every region item of an image needs them."""
        key = content_key(image)
        cached = self._recent.get(key)
        if cached is None:
            cached = preprocess_image(image, self.info.osprey_config.vision).to(self.info.ctx.model_config.dtype)
            self._recent[key] = cached
            while len(self._recent) > RECENT_IMAGES:
                self._recent.popitem(last=False)
        self._recent.move_to_end(key)
        return cached, key_to_ints(key)

    def _apply_hf_processor_tokens_only(self, prompt_tokens: list[int]) -> list[int]:
        """Without a vLLM tokenizer (our backend runs vLLM with skip_tokenizer_init) the ids are ours already. With
        one (vLLM's own server: its chat template and tokenizer made them), their text is tokenized again the
        official way, so the LLM sees the ids our engine would."""
        tokenizer = self.info.ctx.tokenizer
        if tokenizer is None:
            return prompt_tokens
        bos = getattr(tokenizer, "bos_token_id", None)
        body = prompt_tokens[1:] if prompt_tokens and prompt_tokens[0] == bos else prompt_tokens
        text = tokenizer.decode(body, skip_special_tokens=False)
        return text_prompt_ids(self.info.osprey_tokenizer, self.info.osprey_config, text)

    def _hf_processor_applies_updates(self, prompt_text, mm_items, hf_processor_mm_kwargs,
                                      tokenization_kwargs) -> bool:
        return False  # _call_hf_processor leaves one placeholder per item; vLLM expands them (_get_prompt_updates)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched(IMAGE_MODALITY),
            "image_key": MultiModalFieldConfig.batched(IMAGE_MODALITY),
            "region_masks": MultiModalFieldConfig.batched(REGION_MODALITY),
            "region_pixel_values": MultiModalFieldConfig.batched(REGION_MODALITY),
            "region_image_key": MultiModalFieldConfig.batched(REGION_MODALITY),
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.osprey_config
        image_id = image_placeholder_id(config)
        pair = [config.mask_token_id, config.pos_token_id]
        return [
            PromptReplacement(modality=IMAGE_MODALITY, target=[image_id],
                              replacement=[image_id] * config.vision.num_image_tokens),
            PromptReplacement(modality=REGION_MODALITY, target=pair, replacement=pair),
        ]

    def _maybe_apply_prompt_updates(self, mm_items, prompt_ids, mm_kwargs, mm_prompt_updates, is_update_applied):
        """The region count is checked before the pairs are matched: a `<mask>` left without a mask would reach the
        embedding lookup with an id outside the table."""
        check_region_count(prompt_ids, self.info.osprey_config, mm_items.get_count(REGION_MODALITY, strict=False))
        return super()._maybe_apply_prompt_updates(mm_items, prompt_ids, mm_kwargs, mm_prompt_updates,
                                                   is_update_applied)
