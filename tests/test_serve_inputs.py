"""serve.inputs and serve.chat on tiny inputs: region codecs, size checks, image limits, <regionK> binding."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest
from helpers import png_bytes
from PIL import Image

from osprey import masks as mask_codecs
from osprey.prompts import REGION_PLACEHOLDER
from serve import inputs
from serve.chat import bind_regions, parse_messages
from serve.errors import APIError
from serve.schemas import ChatMessage

LIMITS = inputs.Limits(max_image_pixels=512 * 512, max_image_side=1024)
H, W = 12, 16


def huge_png_header(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims `width x height` (a decompression-bomb probe)."""
    raw = bytearray(png_bytes(Image.new("L", (2, 2))))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(raw)


def a_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[2:7, 3:11] = True
    return mask


def test_every_region_codec_decodes_to_the_same_pixels():
    mask = a_mask()
    regions = [
        {"rle": mask_codecs.encode_rle(mask)},
        {"rle": mask_codecs.encode_uncompressed_rle(mask)},
        {"box": [3, 2, 8, 5]},
        {"polygon": [[3, 2, 11, 2, 11, 7, 3, 7]]},
        {"png": mask_codecs.encode_png_base64(mask)},
        {"png": "data:image/png;base64," + mask_codecs.encode_png_base64(mask)},
        mask_codecs.encode_sam(mask),
    ]
    out = inputs.decode_regions(regions, H, W, LIMITS, max_regions=10)
    assert out.shape == (len(regions), H, W) and out.dtype == bool
    for q in range(len(regions)):
        assert (out[q] == mask).all(), q


@pytest.mark.parametrize(("region", "param", "code"), [
    ({"rle": mask_codecs.encode_rle(np.zeros((5, 5), bool))}, "regions[0].rle", "mask_size_mismatch"),
    ({"png": mask_codecs.encode_png_base64(np.zeros((5, 5), bool))}, "regions[0].png", "mask_size_mismatch"),
    ({"rle": {"size": [H, W], "counts": [1, 2]}}, "regions[0].rle", "invalid_mask"),
    ({"rle": {"size": [100000, 100000], "counts": "0"}}, "regions[0].rle", "mask_size_mismatch"),
    ({"polygon": [[1, 2, 3]]}, "regions[0].polygon", "invalid_mask"),
    ({"box": [0, 0, 100, 3]}, "regions[0].box", "invalid_mask"),
    ({"box": "abc"}, "regions[0].box", "invalid_type"),
    ({"png": "not base64 !!"}, "regions[0].png", "invalid_base64"),
    ({"png": base64.b64encode(b"GIF89a....").decode()}, "regions[0].png", "invalid_mask"),
    ({"png": base64.b64encode(huge_png_header(60000, 60000)).decode()}, "regions[0].png", "image_too_large"),
    ({"box": [1, 1, 2, 2], "rle": {}}, "regions[0]", "invalid_region"),
    ({"circle": 3}, "regions[0]", "invalid_region"),
    ("box", "regions[0]", "invalid_type"),
])
def test_bad_regions_name_the_field(region, param, code):
    with pytest.raises(APIError) as info:
        inputs.decode_regions([region], H, W, LIMITS, max_regions=4)
    assert info.value.status == 400
    assert info.value.param == param and info.value.code == code, info.value.message


def test_region_count_and_list_checks():
    for regions, code in (([], "invalid_value"), ([{"box": [0, 0, 1, 1]}] * 5, "too_many_regions"), ({}, "invalid_type")):
        with pytest.raises(APIError) as info:
            inputs.decode_regions(regions, H, W, LIMITS, max_regions=4)
        assert info.value.code == code and info.value.param == "regions"


def test_resize_masks_is_opt_in_and_nearest():
    small = np.zeros((6, 8), dtype=bool)
    small[1:3, 2:4] = True
    out = inputs.decode_regions([{"rle": mask_codecs.encode_rle(small)}], H, W, LIMITS, max_regions=1, resize=True)
    assert out.shape == (1, H, W) and out[0, 2:6, 4:8].all() and out.sum() == 16


def test_image_limits_checked_from_the_header():
    with pytest.raises(APIError) as info:
        inputs.open_image(huge_png_header(60000, 60000), "image", LIMITS)
    assert info.value.code == "image_too_large" and info.value.param == "image"
    good = png_bytes(Image.new("RGB", (W, H), (10, 20, 30)))
    with pytest.raises(APIError) as info:
        inputs.open_image(good[: len(good) // 2], "image", LIMITS)
    assert info.value.code == "invalid_image"
    decoded = inputs.open_image(good, "image", LIMITS)
    assert decoded.size_hw == (H, W) and len(decoded.key) == 64


def test_base64_and_data_urls():
    assert inputs.decode_base64("data:image/png;base64,aGVsbG8=", "image") == b"hello"
    assert inputs.decode_base64("aGVs\nbG8=", "image") == b"hello"
    for bad in ("aGVsbG8", "%%%", "", "data:image/png,hello"):
        with pytest.raises(APIError):
            inputs.decode_base64(bad, "image")


def test_alpha_channel_is_the_region():
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[2:7, 3:11, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    assert (inputs.alpha_mask(image) == a_mask()).all()
    assert inputs.alpha_mask(Image.new("RGBA", (W, H), (1, 2, 3, 255))) is None  # opaque: a plain image
    assert inputs.alpha_mask(Image.new("RGB", (W, H))) is None
    gray = Image.fromarray(a_mask().astype(np.uint8) * 255, "L")
    assert (inputs.image_as_mask(gray) == a_mask()).all()


def _messages(*items):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    out = []
    for i, (role, text) in enumerate(items):
        content = [image, {"type": "text", "text": text}] if i == 0 else text
        out.append(ChatMessage(role=role, content=content))
    return out


def test_regions_bind_in_text_order_across_turns():
    conv = parse_messages(_messages(("user", "Compare <region2> and <region1>."), ("assistant", "Sure."),
                                    ("user", "And <region2> again?")))
    bind_regions(conv, 2)
    assert conv.region_order == [1, 0, 1]  # region 2 mentioned twice appears twice
    assert conv.turns[0] == ("human", ("<image>\nThis provides an overview of the picture.\n"  # as in pos/neg data
                                      f"Compare {REGION_PLACEHOLDER} and {REGION_PLACEHOLDER}."))
    assert conv.turns[1] == ("gpt", "Sure.")
    assert conv.turns[2] == ("human", f"And {REGION_PLACEHOLDER} again?")


def test_regions_not_mentioned_yet_are_left_out():
    conv = parse_messages(_messages(("user", "What is <region2>?")))
    bind_regions(conv, 3)
    assert conv.region_order == [1]


def test_unmentioned_regions_are_introduced_like_osprey_stage3():
    conv = parse_messages(_messages(("user", "Describe the masked region.")))
    bind_regions(conv, 1)
    assert conv.region_order == [0]
    assert conv.turns[0][1] == ("<image>\nThis provides an overview of the picture.\nTher are 1 part region in the "
                                "picture: region1<mask><pos>. Describe the masked region.")  # spec 6, verbatim


@pytest.mark.parametrize(("items", "regions", "code"), [
    ((("user", "What is <region3>?"),), 2, "unknown_region"),
    ((("user", "What is <mask> here?"),), 1, "reserved_token"),
    ((("user", "hi"), ("assistant", "hello")), 0, "invalid_value"),
])
def test_bad_conversations(items, regions, code):
    with pytest.raises(APIError) as info:
        conv = parse_messages(_messages(*items))
        bind_regions(conv, regions)
    assert info.value.status == 400 and info.value.code == code


def test_conversation_needs_an_image():
    with pytest.raises(APIError) as info:
        parse_messages([ChatMessage(role="user", content="hello")])
    assert info.value.code == "missing_image"
