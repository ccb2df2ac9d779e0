"""Osprey as a vLLM model: our vision tower, projector and mask extractor around vLLM's own Llama.

vLLM runs the LM (its kernels, paged attention, prefix cache, scheduler); this class only turns multimodal items
into embeddings (`embed_multimodal`) that vLLM scatters into the placeholder slots: an image item -> its
(num_image_tokens, D) projected tokens, a region item -> (2, D), its mask token then its position token. The parts
are the modules of `osprey.modeling`, with the same attribute names, so checkpoint names map through
`osprey.checkpoint`'s one table. The features are computed as `osprey.modeling.OspreyForCausalLM` computes them
(same modules, same dtypes), so the embeddings equal our engine's up to batching.

The tower's feature maps of recent images are kept (`_levels`, an LRU keyed by image content): a region item
arrives without its image's item whenever vLLM's prefix cache already holds the image slots (every region after
the first of an image), and needs the maps, not the image tokens. Each region item carries its image's pixels, so
a miss recomputes the maps instead of failing.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from osprey.checkpoint import read_config
from osprey.mask_extractor import MaskExtractor
from osprey.modeling import Projector, project_image_level
from osprey.vision import VisionTower

from .processor import OspreyDummyInputsBuilder, OspreyMultiModalProcessor, OspreyProcessingInfo
from .prompts import (
    IMAGE_MODALITY,
    LANGUAGE_MODEL,
    REGION_MODALITY,
    image_placeholder_id,
    placeholder_text,
    weight_target,
)

LEVEL_CACHE_IMAGES = 64  # feature maps kept (Osprey-7B at 512 px: ~12 MB per image in bf16, outside vLLM's memory plan)


def _items(value: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A batched field: vLLM stacks equal shapes into one tensor, else gives a list."""
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)


@MULTIMODAL_REGISTRY.register_processor(OspreyMultiModalProcessor, info=OspreyProcessingInfo,
                                        dummy_inputs=OspreyDummyInputsBuilder)
class OspreyVllmForCausalLM(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return placeholder_text(modality)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = read_config(vllm_config.model_config.model)
        self.osprey_config = config
        self.configure_mm_token_handling(
            vocab_size=config.vocab_size,
            mm_token_ids=[image_placeholder_id(config), config.mask_token_id, config.pos_token_id])
        with self._mark_tower_model(vllm_config, {IMAGE_MODALITY, REGION_MODALITY}):
            self.vision_tower = VisionTower(config.vision)
            self.mm_projector = Projector(config.vision.image_token_channels, config.hidden_size)
            self.mask_extractor = MaskExtractor(config.extractor, config.vision.level_channels, config.hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = LlamaForCausalLM(vllm_config=vllm_config,
                                                   prefix=maybe_prefix(prefix, LANGUAGE_MODEL.rstrip(".")))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self._levels: collections.OrderedDict[tuple[int, int], list[torch.Tensor]] = collections.OrderedDict()

    # -- multimodal items -> embeddings --------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One modality per call (vLLM groups items so): image items -> (N, D) each; region items -> (2, D) each."""
        if kwargs.get("pixel_values") is not None:
            return self._image_embeddings(_items(kwargs["pixel_values"]), _items(kwargs["image_key"]))
        if kwargs.get("region_masks") is not None:
            return self._region_embeddings(_items(kwargs["region_masks"]), _items(kwargs["region_pixel_values"]),
                                           _items(kwargs["region_image_key"]))
        return []

    def _image_embeddings(self, pixels: list[torch.Tensor], keys: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every item through the tower, repeated keys too: at run time vLLM sends an image once (its encoder cache is
        keyed by item hash), but its memory profiling repeats one dummy item and must see the whole batch's peak."""
        with torch.inference_mode():
            levels = self.vision_tower(torch.stack(pixels).to(self._tower_device))
        for row, key in enumerate(keys):
            self._remember(tuple(key.tolist()), [level[row] for level in levels])
        grid = self.osprey_config.vision.image_token_level
        tokens = project_image_level(self.mm_projector, levels[grid])
        return list(tokens.to(self._lm_dtype).unbind(0))

    def _region_embeddings(self, masks: list[torch.Tensor], pixels: list[torch.Tensor], keys: list[torch.Tensor]
                           ) -> list[torch.Tensor]:
        """The regions of each image through the extractor together (as our pipeline's prepare_each does)."""
        levels = self._feature_maps(pixels, keys)
        by_image: dict[tuple[int, int], list[int]] = {}
        for index, key in enumerate(keys):
            by_image.setdefault(tuple(key.tolist()), []).append(index)
        out: list[torch.Tensor | None] = [None] * len(masks)
        for members in by_image.values():
            maps = [level[None] for level in levels[members[0]]]
            stack = torch.stack([masks[i] for i in members])
            mask_tokens, pos_tokens = self.mask_extractor(maps, [stack])
            if pos_tokens is None:  # ablation without position tokens: the <pos> slots carry nothing
                pos_tokens = torch.zeros_like(mask_tokens)
            pairs = torch.stack([mask_tokens, pos_tokens], dim=1).to(self._lm_dtype)  # (Q, 2, D)
            for i, pair in zip(members, pairs):
                out[i] = pair
        return out

    def _feature_maps(self, pixels: list[torch.Tensor], keys: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per item, the tower's four maps (C_l, h_l, w_l) of its image: cached ones reused, the others computed in
        one batch (each distinct image once)."""
        names = [tuple(key.tolist()) for key in keys]
        found = {n: self._levels[n] for n in names if n in self._levels}
        missing = [n for n in dict.fromkeys(names) if n not in found]
        if missing:
            batch = torch.stack([pixels[names.index(n)] for n in missing]).to(self._tower_device)
            with torch.inference_mode():
                levels = self.vision_tower(batch)
            for row, name in enumerate(missing):
                found[name] = [level[row] for level in levels]
        for name in dict.fromkeys(names):
            self._remember(name, found[name])
        return [found[n] for n in names]

    def _remember(self, name: tuple[int, int], levels: list[torch.Tensor]) -> None:
        """Keep an image's maps, the least recently used ones leaving past LEVEL_CACHE_IMAGES. Rows of a batch are
        copied out: a kept view would hold its whole batch's maps in memory."""
        if name not in self._levels:
            self._levels[name] = [level.clone() for level in levels]
        self._levels.move_to_end(name)
        while len(self._levels) > LEVEL_CACHE_IMAGES:
            self._levels.popitem(last=False)

    @property
    def _tower_device(self) -> torch.device:
        return self.mm_projector[0].weight.device

    @property
    def _lm_dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    # -- the LM ----------------------------------------------------------------------------------------------------
    def get_language_model(self) -> nn.Module:
        return self.language_model

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # -- weights ---------------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Official names -> our parts (osprey.checkpoint's map) or vLLM's Llama loader (its own names)."""
        own = {name: p for name, p in self.named_parameters() if not name.startswith(LANGUAGE_MODEL)}
        loaded: set[str] = set()

        def language_model_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                target = weight_target(name)
                if target.in_language_model:
                    yield target.name, tensor
                elif target.name in own:
                    default_weight_loader(own[target.name], tensor)
                    loaded.add(target.name)
                else:
                    raise ValueError(f"checkpoint tensor {name!r} (ours: {target.name!r}) has no place in the model")

        loaded |= {LANGUAGE_MODEL + name for name in self.language_model.load_weights(language_model_weights())}
        return loaded
