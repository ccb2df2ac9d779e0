"""Osprey: vision tower -> projector -> image tokens; masks -> region tokens; both spliced into a causal LM.

Reads like transformers' LLaVA: parts are attributes, `get_image_features` and `get_region_features` are public
(the server encodes an image once and describes many regions), and `merge_embeddings` fills placeholder slots
after checking that slots and features agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from osprey.config import OspreyConfig
from osprey.mask_extractor import MaskExtractor
from osprey.tokenization import trained_targets
from osprey.vision import VisionTower


class Projector(nn.Sequential):
    """`mlp2x_gelu`: Linear(C -> D), GELU, Linear(D -> D); keys `0.*` and `2.*` as in the official checkpoints."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def project_image_level(projector: Projector, grid: torch.Tensor) -> torch.Tensor:
    """The image-token level (B, C, h, w) -> (B, h*w, D) image tokens: row-major over the grid, projected in the
    projector's dtype (shared with the vLLM model, serve/vllm_osprey)."""
    flat = grid.flatten(2).transpose(1, 2)
    return projector(flat.to(projector[0].weight.dtype))


@dataclass
class ImageFeatures:
    levels: list[torch.Tensor]  # res2..res5, each (B, C_l, h_l, w_l)
    tokens: torch.Tensor  # (B, N, D) projected image tokens in the LM's dtype


@dataclass
class RegionFeatures:
    mask_tokens: torch.Tensor  # (sum Q_i, D), regions of image 0 first, in mask order
    pos_tokens: torch.Tensor  # (sum Q_i, D)


def build_language_model(config: OspreyConfig) -> PreTrainedModel:
    """Any transformers causal LM from the config's `text` dict (Llama for Osprey)."""
    kwargs = dict(config.text)
    model_type = kwargs.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **kwargs)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")


class OspreyForCausalLM(nn.Module):
    def __init__(self, config: OspreyConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.mm_projector = Projector(config.vision.image_token_channels, config.hidden_size)
        self.mask_extractor = MaskExtractor(config.extractor, config.vision.level_channels, config.hidden_size)
        self.language_model = build_language_model(config)
        if self.language_model.get_input_embeddings().num_embeddings != config.vocab_size:
            raise ValueError("language model vocabulary differs from config.text['vocab_size']")

    # -- parts -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.mm_projector[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    # -- features ----------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """pixel_values (B, 3, S, S) preprocessed -> all levels and the (B, N, D) image tokens."""
        levels = self.vision_tower(pixel_values)
        tokens = project_image_level(self.mm_projector, levels[self.config.vision.image_token_level])
        return ImageFeatures(levels=levels, tokens=tokens.to(self.dtype))

    def get_region_features(self, levels: list[torch.Tensor], masks: list[torch.Tensor]) -> RegionFeatures:
        """levels: (B, C, h, w) maps; masks: per image a (Q_i, H_i, W_i) tensor (Q_i may be 0)."""
        tokens, pos = self.mask_extractor(levels, masks)
        if pos is None:  # ablation without position tokens: the <pos> slots carry nothing
            pos = torch.zeros_like(tokens)
        return RegionFeatures(mask_tokens=tokens.to(self.dtype), pos_tokens=pos.to(self.dtype))

    # -- splice ------------------------------------------------------------------------------------------------
    def merge_embeddings(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor | None,
        mask_tokens: torch.Tensor | None,
        pos_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, T) ids with placeholder slots -> (B, T, D) embeddings.

        Slots: `image_token_id` (N per image, filled by `image_tokens` (B', N, D) in row order), `mask_token_id`
        (filled by `mask_tokens` in row-major slot order) and `pos_token_id` (must directly follow each mask slot).
        Ids outside the embedding table never reach the lookup.
        """
        cfg = self.config
        embedding = self.get_input_embeddings()
        in_table = (input_ids >= 0) & (input_ids < embedding.num_embeddings)
        embeds = embedding(torch.where(in_table, input_ids, 0))

        image_slots = input_ids == cfg.image_token_id
        n_image_slots = int(image_slots.sum())
        n_image_tokens = 0 if image_tokens is None else image_tokens.shape[0] * image_tokens.shape[1]
        if n_image_slots != n_image_tokens:
            raise ValueError(f"image placeholder slots ({n_image_slots}) and image tokens ({n_image_tokens}) differ")
        if n_image_slots:
            embeds = embeds.masked_scatter(image_slots[..., None], image_tokens.to(embeds.dtype))

        mask_slots = input_ids == cfg.mask_token_id
        pos_slots = input_ids == cfg.pos_token_id
        n_regions = 0 if mask_tokens is None else mask_tokens.shape[0]
        if int(mask_slots.sum()) != n_regions:
            raise ValueError(f"<mask> tokens in the text ({int(mask_slots.sum())}) and masks ({n_regions}) differ")
        follows_mask = torch.zeros_like(mask_slots)
        follows_mask[:, 1:] = mask_slots[:, :-1]
        if not torch.equal(pos_slots, follows_mask):
            raise ValueError("every <mask> token must be followed by exactly one <pos> token (and <pos> only there)")
        if n_regions:
            embeds = embeds.masked_scatter(mask_slots[..., None], mask_tokens.to(embeds.dtype))
            embeds = embeds.masked_scatter(pos_slots[..., None], pos_tokens.to(embeds.dtype))
        return embeds

    # -- forward -----------------------------------------------------------------------------------------------
    def embed_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, masks: list[torch.Tensor] | None
    ) -> torch.Tensor:
        image_tokens = mask_tokens = pos_tokens = None
        if pixel_values is not None:
            image = self.get_image_features(pixel_values)
            image_tokens = image.tokens
            if masks is not None:
                regions = self.get_region_features(image.levels, masks)
                mask_tokens, pos_tokens = regions.mask_tokens, regions.pos_tokens
        elif masks is not None and any(m.shape[0] for m in masks):
            raise ValueError("masks were given without pixel_values")
        return self.merge_embeddings(input_ids, image_tokens, mask_tokens, pos_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        trained_logits_only: bool = False,
        **lm_kwargs,
    ):
        """input_ids (B, T) with expanded placeholders; masks: per-image (Q_i, H_i, W_i); labels (B, T) or None.

        Returns the language model's output (`.loss` when labels are given, `.logits`). With labels and
        `trained_logits_only`, the LM head runs only at the positions whose next token is trained and `.logits` is
        None: the same loss without the (B, T, vocab) logits and their fp32 copy (at 7B, one 1132-token sample
        trains ~35 tokens; its full logits are 145 MB in fp32). A batch without any trained token gets an exact zero
        loss that reaches every trainable weight (not the NaN of an all-ignored cross-entropy), either way.
        """
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, masks)
        if labels is not None and (trained_logits_only or not bool(trained_targets(labels).any())):
            return self._loss_at_trained_positions(inputs_embeds, attention_mask, labels, **lm_kwargs)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    def _loss_at_trained_positions(self, inputs_embeds, attention_mask, labels, **lm_kwargs) -> CausalLMOutputWithPast:
        """Mean next-token cross-entropy over trained tokens (as transformers' causal-LM loss), logits in fp32."""
        decoder = self.language_model.get_decoder()  # through a peft wrapper too (it forwards attributes)
        head = self.language_model.get_output_embeddings()
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **lm_kwargs)
        hidden = out.last_hidden_state[:, :-1]
        targets, trained = labels[:, 1:], trained_targets(labels)
        if bool(trained.any()):
            loss = F.cross_entropy(head(hidden[trained]).float(), targets[trained])
        else:  # nothing trained: a zero that still reaches every trainable weight (collectives stay in step)
            loss = head(out.last_hidden_state[:, :1]).float().sum() * 0.0
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)
