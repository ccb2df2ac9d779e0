"""Tiny randomly initialised SAM and SAM 3 folders (transformers' own classes, saved with save_pretrained), so the
real loading code reads them back and every SAM path runs in CI without weights. Each builds in about a second."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPTokenizer,
    Sam3Config,
    Sam3DETRDecoderConfig,
    Sam3DETREncoderConfig,
    Sam3GeometryEncoderConfig,
    Sam3MaskDecoderConfig,
    Sam3Model,
    Sam3Processor,
    Sam3VisionConfig,
    Sam3ViTConfig,
    SamConfig,
    SamImageProcessor,
    SamModel,
    SamProcessor,
    SamVisionConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

SAM_QUERIES = 5  # SAM 3's object queries in the tiny config: at most this many instances per concept


def tiny_sam(folder: Path, seed: int = 0) -> Path:
    """A SAM (v1 layout) taking 64x64 inputs: ViT of 2 layers, 32 wide."""
    torch.manual_seed(seed)
    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, output_channels=16,
                             image_size=64, patch_size=8, global_attn_indexes=[1], window_size=4, num_pos_feats=8)
    config = SamConfig(vision_config=vision.to_dict(),
                       prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 8,
                                              "mask_input_channels": 4},
                       mask_decoder_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                            "mlp_dim": 32, "iou_head_hidden_dim": 16})
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                               mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}))
    SamModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_sam3(folder: Path, seed: int = 0) -> Path:
    """A SAM 3 taking 224x224 inputs (the sizes of transformers' own SAM 3 tests) with a byte-level CLIP tokenizer."""
    torch.manual_seed(seed)
    backbone = Sam3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=224, patch_size=14, window_size=8, global_attn_indexes=[0, 1])
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    config = Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=32, scale_factors=[2.0, 1.0]),
        text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
                     "hidden_act": "gelu", "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        geometry_encoder_config=Sam3GeometryEncoderConfig(num_layers=1, **small),
        detr_encoder_config=Sam3DETREncoderConfig(num_layers=1, **small),
        detr_decoder_config=Sam3DETRDecoderConfig(num_layers=1, num_queries=SAM_QUERIES, **small),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=2))
    chars = list(bytes_to_unicode().values())  # every byte and its end-of-word form: any text tokenizes
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    processor = Sam3Processor(Sam3ImageProcessor(size={"height": 224, "width": 224}),
                              CLIPTokenizer(vocab=vocab, merges=[]))
    Sam3Model(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
