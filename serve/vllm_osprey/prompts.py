"""What the vLLM model and its processor agree on, in pure Python (tested without vLLM): placeholder ids, prompt
expansion, the content key that ties a region to its image, and where each checkpoint tensor goes.

Placeholders. Our ids use LLaVA's `-200` for the image; vLLM needs non-negative ids, so the image placeholder is
the first id after `<mask>`/`<pos>` (outside the embedding table, like them: the model masks all three before the
lookup). A vLLM prompt holds ONE image placeholder and one `<mask><pos>` pair per region; vLLM's processor expands
the image placeholder to `num_image_tokens` slots and keeps each pair (two slots: the region's mask and position
embeddings). Expanded, the ids are our engine's ids with `-200` read as the placeholder id.

Prefix caching. vLLM keys a KV block by its token ids and the hashes of the multimodal items whose slots it holds.
The image is one item (its hash: its pixels), each region another (its hash: its mask and its image). The regions'
slots come after every image slot, so the blocks up to the first `<mask>` carry only the image's hash and the
text: identical for every region of one image, whichever masks the request has. The region item must name its
image too (not only the mask): vLLM's encoder cache is keyed by item hash, and the same mask on another image has
other embeddings.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from osprey.checkpoint import from_official
from osprey.config import OspreyConfig
from osprey.prompts import IMAGE_PLACEHOLDER, REGION_PLACEHOLDER
from osprey.tokenization import encode_generation_prompt, tokenize_prompt

IMAGE_MODALITY = "image"
REGION_MODALITY = "region"
REGION_SLOTS = 2  # <mask> and <pos>
LANGUAGE_MODEL = "language_model."  # our module prefix of the LM, also the vLLM model's attribute


def image_placeholder_id(config: OspreyConfig) -> int:
    """The non-negative id standing for the image in vLLM prompts: just past `<mask>` and `<pos>`."""
    return max(config.mask_token_id, config.pos_token_id) + 1


def placeholder_text(modality: str) -> str:
    """What a chat message carries for one item of `modality` (vLLM's `get_placeholder_str`)."""
    if modality == IMAGE_MODALITY:
        return IMAGE_PLACEHOLDER
    if modality == REGION_MODALITY:
        return REGION_PLACEHOLDER
    raise ValueError(f"Osprey takes 'image' and 'region' items, not {modality!r}")


# -- prompts -------------------------------------------------------------------------------------------------------
def generation_prompt_ids(tokenizer, config: OspreyConfig, turns: Sequence[tuple[str, str | None]]) -> list[int]:
    """Our generation prompt (official template and tokenization) with ONE image placeholder id, for vLLM."""
    ids = encode_generation_prompt(tokenizer, list(turns), num_image_tokens=1,
                                   image_token_id=image_placeholder_id(config))
    check_image_count(ids, config)
    return ids


def text_prompt_ids(tokenizer, config: OspreyConfig, text: str) -> list[int]:
    """A rendered prompt text (template already applied, `<image>` and `<mask><pos>` in it) -> ids with one image
    placeholder id: LLaVA's chunk-wise tokenization, as the official code and our engine tokenize."""
    ids, _ = tokenize_prompt(tokenizer, text, image_placeholder_id(config))
    return ids


def check_image_count(ids: Sequence[int], config: OspreyConfig) -> None:
    """Exactly one image placeholder (the errors our pipeline gives)."""
    found = sum(1 for t in ids if t == image_placeholder_id(config))
    if found == 0:
        raise ValueError("the prompt has no <image> placeholder; put '<image>\\n' at the start of the first turn")
    if found > 1:
        raise ValueError("the prompt has more than one <image> placeholder")


def check_region_count(ids: Sequence[int], config: OspreyConfig, num_masks: int) -> None:
    """One `<mask><pos>` pair per mask, each `<mask>` directly followed by `<pos>` (else the slots would not pair)."""
    found = sum(1 for t in ids if t == config.mask_token_id)
    if found != num_masks:
        raise ValueError(f"the prompt references {found} regions (<mask><pos>) but {num_masks} masks were given")
    pairs = sum(1 for a, b in itertools.pairwise(ids) if a == config.mask_token_id and b == config.pos_token_id)
    if pairs != found or sum(1 for t in ids if t == config.pos_token_id) != found:
        raise ValueError("every <mask> token must be followed by exactly one <pos> token (and <pos> only there)")


def expand_prompt(ids: Sequence[int], config: OspreyConfig) -> list[int]:
    """What vLLM's processor makes of a prompt: the image placeholder becomes `num_image_tokens` slots."""
    placeholder = image_placeholder_id(config)
    out: list[int] = []
    for token in ids:
        out.extend([token] * config.vision.num_image_tokens if token == placeholder else [token])
    return out


def expanded_length(ids: Sequence[int], config: OspreyConfig) -> int:
    images = sum(1 for t in ids if t == image_placeholder_id(config))
    return len(ids) + images * (config.vision.num_image_tokens - 1)


def prefix_length(expanded_ids: Sequence[int], config: OspreyConfig) -> int:
    """Tokens before the first `<mask>`: the part every region of one image shares (and vLLM caches once)."""
    return next((i for i, t in enumerate(expanded_ids) if t == config.mask_token_id), len(expanded_ids))


# -- multimodal items ----------------------------------------------------------------------------------------------
def image_content_key(image: Image.Image) -> bytes:
    """16 bytes naming an image by content (mode, size, pixels): equal images, equal keys."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.digest()


def content_key(image: Image.Image) -> bytes:
    """The image's content key: its stamp (`stamp_content_id`) when it has one, else computed."""
    stamp = image.getexif().get(Image.ExifTags.Base.ImageID)
    return stamp.bytes if isinstance(stamp, uuid.UUID) else image_content_key(image)


def stamp_content_id(image: Image.Image, key: bytes) -> None:
    """Name `image` by its content key in its EXIF ImageID, which vLLM's hasher reads instead of hashing every pixel
    again (once for the image item and once per region item). The key is the content's, so the hashes stay
    content-keyed; an image that loses the stamp (a copy) is hashed by its pixels: slower, the same keying."""
    image.getexif()[Image.ExifTags.Base.ImageID] = uuid.UUID(bytes=key)


def key_to_ints(key: bytes) -> list[int]:
    """A 16-byte key as two int64s (a tensor field vLLM can batch)."""
    return [int.from_bytes(key[:8], "little", signed=True), int.from_bytes(key[8:16], "little", signed=True)]


@dataclass(frozen=True)
class RegionItem:
    """One region as vLLM multimodal data: the mask (H, W) at the image's size and the image it lies on."""

    mask: np.ndarray  # (H, W) uint8 0/1
    image: Image.Image

    def as_data(self) -> dict[str, object]:
        """The item as vLLM holds and hashes it: its mask and its image (see the module docstring)."""
        return {"mask": self.mask, "image": self.image}

    @classmethod
    def from_data(cls, data: dict[str, object]) -> RegionItem:
        if not isinstance(data, dict) or set(data) != {"mask", "image"}:
            raise ValueError("a bound region item is {'mask': (H, W) array, 'image': PIL image}")
        return cls(np.asarray(data["mask"]), data["image"])


def region_items(image: Image.Image, masks: np.ndarray) -> list[RegionItem]:
    """(Q, H, W) masks of `image` -> Q region items; masks must be the image's size."""
    stack = np.asarray(masks)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.shape[1:] != (image.height, image.width):
        raise ValueError(f"masks must be (Q, {image.height}, {image.width}) to match the image, got {stack.shape}")
    binary = (stack != 0).astype(np.uint8)
    return [RegionItem(mask=m, image=image) for m in binary]


# -- weights -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes in the vLLM model: our own module tree or vLLM's Llama (by its own names)."""

    in_language_model: bool
    name: str  # ours (e.g. "mask_extractor.res2.weight") or the LM's ("model.layers.0.self_attn.q_proj.weight")


def weight_target(official_name: str) -> WeightTarget:
    """An official (= our folders') tensor name -> its place, through the one official-name map of osprey.checkpoint.

    The vLLM model has our module tree (`vision_tower`, `mm_projector`, `mask_extractor`, `language_model`), so our
    names are its names; the LM's tensors keep their checkpoint names, which vLLM's Llama loader reads (it stacks
    q/k/v and gate/up itself and skips the legacy rotary `inv_freq` buffers).
    """
    ours = from_official(official_name)
    if ours.startswith(LANGUAGE_MODEL):
        return WeightTarget(True, ours[len(LANGUAGE_MODEL):])
    return WeightTarget(False, ours)
