"""osprey.masks: hand-computed decodes, exact round trips, and one MaskError per malformed input."""

from __future__ import annotations

import base64
import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from osprey import masks as M
from osprey.masks import MaskError, MaskWarning


def _random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [np.zeros((5, 7), bool), np.ones((5, 7), bool), rng.random((1, 1)) < 2, rng.random((31, 17)) < 0.5]
    corner = np.zeros((9, 11), bool)
    corner[0, 0] = True  # RLE starting with a zero-length background run
    blob = np.zeros((64, 48), bool)
    blob[10:40, 5:30] = True
    blob[20:25, 10:15] = False
    return out + [corner, blob]


SQUARE = np.zeros((5, 5), bool)
SQUARE[1:3, 1:3] = True  # rows 1-2, columns 1-2


# ---------------------------------------------------------------------------------------------- decoding


def test_polygon_hand_computed():
    assert (M.decode_mask([[1, 1, 3, 1, 3, 3, 1, 3]], 5, 5) == SQUARE).all()
    assert (M.decode_polygons([1, 1, 3, 1, 3, 3, 1, 3], 5, 5) == SQUARE).all()  # one flat polygon


def test_polygons_are_merged():
    two = M.decode_mask([[0, 0, 1, 0, 1, 1, 0, 1], [3, 3, 5, 3, 5, 5, 3, 5]], 5, 5)
    expected = np.zeros((5, 5), bool)
    expected[0, 0] = True
    expected[3:5, 3:5] = True
    assert (two == expected).all()


def test_polygon_matches_pycocotools():
    poly = [[236.98, 142.51, 261.68, 212.01, 235.43, 248.71, 211.66, 211.02]]
    ours = M.decode_mask(poly, 426, 640)
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 426, 640))).astype(bool)
    assert ours.dtype == bool and ours.shape == (426, 640) and (ours == ref).all()


def test_box_integer_and_rounding():
    assert (M.decode_mask([1, 1, 2, 2], 5, 5) == SQUARE).all()
    frac = M.decode_box([1.4, 1.6, 2.2, 2.3], 6, 6)  # x 1.4..3.6 -> cols 1..3; y 1.6..3.9 -> rows 2..3
    expected = np.zeros((6, 6), bool)
    expected[2:4, 1:4] = True
    assert (frac == expected).all()
    half = M.decode_box([1.5, 1.5, 2, 2], 6, 6)  # .5 edges round up: cols/rows 2..3
    expected = np.zeros((6, 6), bool)
    expected[2:4, 2:4] = True
    assert (half == expected).all()
    assert M.decode_box([0, 0, 5, 5], 5, 5).all()


def test_box_clip():
    clipped = M.decode_box([3, 3, 10, 10], 5, 5, clip=True)
    expected = np.zeros((5, 5), bool)
    expected[3:, 3:] = True
    assert (clipped == expected).all()
    assert M.box_to_polygon([1, 2, 3, 4]) == [1, 2, 4, 2, 4, 6, 1, 6]


def test_rle_hand_computed():
    mask = np.array([[0, 1, 1], [0, 1, 0]], bool)  # column-major runs: 0,0 | 1,1,1 | 0 -> [2, 3, 1]
    assert M.encode_uncompressed_rle(mask) == {"size": [2, 3], "counts": [2, 3, 1]}
    assert (M.decode_mask({"size": [2, 3], "counts": [2, 3, 1]}, 2, 3) == mask).all()
    rle = M.encode_rle(mask)
    assert isinstance(rle["counts"], str) and json.loads(json.dumps(rle)) == rle
    assert M.rle_counts(rle) == (2, 3, [2, 3, 1])


@pytest.mark.parametrize("mask", _random_masks(), ids=lambda m: f"{m.shape}")
def test_round_trips_exact(mask):
    h, w = mask.shape
    rle = M.encode_rle(mask)
    assert (M.decode_mask(rle, h, w) == mask).all()
    assert (M.decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}) == mask).all()  # bytes counts
    un = M.encode_uncompressed_rle(mask)
    assert (M.decode_mask(un, h, w) == mask).all()
    assert M.rle_counts(rle)[2] == un["counts"]
    assert rle["counts"] == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    assert (M.decode_mask(M.encode_png(mask), h, w) == mask).all()
    assert (M.decode_mask(M.encode_png_base64(mask), h, w) == mask).all()
    assert (M.decode_mask("data:image/png;base64," + M.encode_png_base64(mask), h, w) == mask).all()
    sam = json.loads(json.dumps(M.encode_sam(mask, predicted_iou=0.9)))
    assert (M.decode_mask(sam, h, w, strict=True) == mask).all()
    assert (M.decode_mask(mask.astype(np.uint8), h, w) == mask).all()
    if h > 1:
        assert (M.decode_mask(mask.tolist(), h, w) == mask).all()  # bitmap list-of-lists


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_modes():
    gray = np.array([[0, 7], [255, 0]], np.uint8)
    expected = gray != 0
    assert (M.decode_png(_png(gray, "L")) == expected).all()
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1, 2] = 1  # any channel nonzero
    rgb[1, 0] = 200
    assert (M.decode_png(_png(rgb, "RGB")) == expected).all()
    rgba = np.full((2, 2, 4), 255, np.uint8)  # white everywhere: only alpha decides
    rgba[..., 3] = gray
    assert (M.decode_png(_png(rgba, "RGBA")) == expected).all()
    pal = Image.fromarray(gray, mode="L").convert("P")
    buffer = io.BytesIO()
    pal.save(buffer, format="PNG")
    decoded = M.decode_png(buffer.getvalue())
    assert decoded.shape == (2, 2) and decoded[0, 0] == (np.asarray(pal)[0, 0] != 0)
    one_bit = io.BytesIO()
    Image.fromarray(expected).save(one_bit, format="PNG")  # mode "1"
    assert (M.decode_png(one_bit.getvalue(), 2, 2) == expected).all()


def test_sam_output_forms():
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:7] = True
    entry = M.encode_sam(mask, predicted_iou=0.97, stability_score=0.95, point_coords=[[3.5, 2.5]])
    assert entry["bbox"] == [2, 1, 4, 2]  # SAM's convention: x1 - x0 with inclusive x1
    assert entry["area"] == 15 and entry["crop_box"] == [0.0, 0.0, 8.0, 6.0]
    bitmap_entry = dict(entry, segmentation=mask.tolist())  # output_mode="binary_mask" saved as JSON
    uncompressed = dict(entry, segmentation=M.encode_uncompressed_rle(mask))
    stack = M.decode_sam_list([entry, bitmap_entry, uncompressed], 6, 8)
    assert stack.shape == (3, 6, 8) and (stack == mask).all()
    assert M.decode_sam_list([], 6, 8).shape == (0, 6, 8)


def test_keyed_dicts():
    assert (M.decode_mask({"box": [1, 1, 2, 2]}, 5, 5) == SQUARE).all()
    assert (M.decode_mask({"polygon": [[1, 1, 3, 1, 3, 3, 1, 3]]}, 5, 5) == SQUARE).all()
    assert (M.decode_mask({"rle": M.encode_rle(SQUARE)}, 5, 5) == SQUARE).all()
    assert (M.decode_mask({"png": M.encode_png_base64(SQUARE)}, 5, 5) == SQUARE).all()
    assert M.detect_format({"rle": {}}) == "keyed"


def test_bbox_and_area():
    assert M.mask_to_bbox(SQUARE) == [1.0, 1.0, 2.0, 2.0]
    assert M.mask_area(SQUARE) == 4
    assert M.mask_to_bbox(np.zeros((3, 3), bool)) == [0.0, 0.0, 0.0, 0.0]
    blob = _random_masks()[-1]
    rle = mask_utils.encode(np.asfortranarray(blob.astype(np.uint8)))
    assert M.mask_to_bbox(blob) == mask_utils.toBbox(rle).tolist() and M.mask_area(blob) == mask_utils.area(rle)


@pytest.mark.parametrize(
    "xy, expected",
    [
        ([[0, 0], [4, 0], [4, 4], [0, 4]], False),  # square
        ([[0, 0], [4, 4], [4, 0], [0, 4]], True),  # bow-tie
        ([[0, 0], [4, 0], [2, 1], [4, 4], [0, 4]], False),  # concave
        ([[0, 0], [4, 0], [4, 4], [2, 0], [0, 4]], True),  # a vertex touching another edge
        ([[0, 0], [3, 0], [1, 2]], False),  # triangle
        ([[5, 0], [9, 0], [9, 4], [0, 4], [2, 0]], False),  # a vertex on a horizontal edge's line, outside the edge
        # a vertex touching a later edge, found only from the earlier edge's start (o3) or end (o4)
        ([[2, 0], [3, 4], [0, 4], [0, 0], [4, 0]], True),
        ([[0, 4], [2, 0], [0, 0], [4, 0], [3, 4]], True),
        ([[0, 10], [4, 14], [4, 10], [0, 14]], True),  # a bow-tie away from y = 0
    ],
)
def test_self_intersection(xy, expected):
    assert M.polygon_self_intersects(np.array(xy, float)) is expected


def test_self_intersecting_warns_or_raises():
    bowtie = [[0, 0, 4, 4, 4, 0, 0, 4]]
    with pytest.warns(MaskWarning, match="self-intersecting"):
        mask = M.decode_mask(bowtie, 5, 5)
    assert mask.any()
    with pytest.raises(MaskError, match="polygon 0 is self-intersecting"):
        M.decode_mask(bowtie, 5, 5, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskWarning)  # a simple polygon warns nothing
        M.decode_mask([[1, 1, 3, 1, 3, 3, 1, 3]], 5, 5)


def _truncated_png() -> bytes:
    return M.encode_png(SQUARE)[:30]


@pytest.mark.parametrize(
    "obj, h, w, match",
    [
        ({"size": [4, 5], "counts": [25]}, 5, 5, r"RLE size \[4, 5\] does not match the image size \[5, 5\]"),
        ({"size": [5, 5], "counts": [20, 4]}, 5, 5, "counts sum to 24 but size 5x5 needs 25"),
        ({"size": [5, 5], "counts": [30, -5]}, 5, 5, r"counts\[1\] = -5 is negative"),
        ({"size": [5, 5], "counts": [20.0, 5]}, 5, 5, r"counts\[0\] = 20.0 is not an integer"),
        ({"size": [5, 5], "counts": ["20", 5]}, 5, 5, "is not an integer"),
        ({"size": [5, 5], "counts": "0~~"}, 5, 5, "invalid character"),
        ({"size": [5, 5], "counts": "0i"}, 5, 5, "truncated"),  # 'i' has the continuation bit set
        ({"size": [5, 5], "counts": "19"}, 5, 5, "counts sum to"),
        ({"size": [5], "counts": [25]}, 5, 5, "size must be"),
        ({"size": [0, 5], "counts": []}, 5, 5, "size must be positive"),
        ({"size": [5, 5]}, 5, 5, "needs 'size' and 'counts'"),
        ({"counts": 3, "size": [1, 3]}, 1, 3, "counts must be a string"),
        ([[1, 1, 3, 1, 3]], 5, 5, "odd number of coordinates"),
        ([[1, 1, 3, 1]], 5, 5, "2 points; a polygon needs at least 3"),
        ([[0, 0, 1, 1, 2, 2]], 5, 5, "degenerate"),
        ([[1, 1, 1, 1, 1, 1]], 5, 5, "degenerate"),
        ([[1, 1, float("nan"), 1, 3, 3]], 5, 5, "non-finite"),
        ([[1, 1, float("inf"), 1, 3, 3]], 5, 5, "non-finite"),
        ([[0, 0, 1e300, 0, 1e300, 1e300]], 5, 5, "far outside"),  # pycocotools would crash on it
        ([[1, 1, "a", 1, 3, 3]], 5, 5, "non-numeric"),
        ([], 5, 5, "empty mask list"),
        ([1, 1, 0, 2], 5, 5, "non-positive size"),
        ([1, 1, 2, -2], 5, 5, "non-positive size"),
        ([4, 4, 2, 2], 5, 5, "reaches outside the image"),
        ([-1, 0, 2, 2], 5, 5, "reaches outside the image"),
        ([1, float("nan"), 2, 2], 5, 5, "non-finite"),
        (b"not a png at all", 5, 5, "undecodable PNG"),
        ("@@@not-base64@@@", 5, 5, "not valid base64"),
        (base64.b64encode(b"GIF89a....").decode(), 5, 5, "undecodable PNG"),
        (None, 5, 5, "unrecognised mask object"),
        ({"foo": 1}, 5, 5, "neither"),
        (np.zeros((4, 5), bool), 5, 5, r"bitmap shape \(4, 5\) does not match"),
        (np.full((5, 5), 2), 5, 5, "0/1"),
        (np.zeros((5, 5, 2)), 5, 5, "must be 2-D"),
        ([[1, 1, 3, 1, 3, 3, 1, 3]], 0, 5, "height must be a positive integer"),
        ({"segmentation": {"size": [5, 5], "counts": [25]}, "area": 3}, 5, 5, "area 3 does not match"),
    ],
)
def test_malformed_inputs_raise_mask_error(obj, h, w, match):
    with pytest.raises(MaskError, match=match):
        M.decode_mask(obj, h, w, strict=True)


def test_png_errors():
    with pytest.raises(MaskError, match="undecodable PNG"):
        M.decode_png(_truncated_png())
    with pytest.raises(MaskError, match=r"PNG size 5x5 \(WxH\) does not match the image 6x5"):
        M.decode_png(M.encode_png(SQUARE), 5, 6)
    assert issubclass(MaskError, ValueError)


@pytest.mark.parametrize(
    "obj",
    [
        [[1, 1, 3, 1, 3, 3, 1, 3]],
        [1, 1, 2, 2],
        {"size": [5, 5], "counts": [6, 2, 3, 2, 12]},
        {"box": [1, 1, 2, 2]},
        SQUARE,
        M.encode_png(SQUARE),
        {"segmentation": SQUARE.tolist(), "area": 4},
    ],
    ids=["polygon", "box", "rle", "keyed", "array", "png", "sam-bitmap"],
)
def test_to_rle_matches_decode(obj):
    rle = M.to_rle(obj, 5, 5, strict=True)
    assert isinstance(rle["counts"], str) and rle == M.encode_rle(SQUARE)
    assert M.rle_area(rle) == 4


def test_to_rle_checks_like_decode():
    with pytest.raises(MaskError, match="odd number"):
        M.to_rle([[1, 1, 3, 1, 3]], 5, 5)
    with pytest.raises(MaskError, match="does not match the image size"):
        M.to_rle({"size": [4, 4], "counts": [16]}, 5, 5)


# ---------------------------------------------------------------------------------------------- user regions


def _square(h: int = 12, w: int = 16) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[2:7, 3:11] = True
    return mask


def test_decode_region_reads_every_form_alike():
    mask = _square()
    forms = [
        M.encode_rle(mask), {"rle": M.encode_rle(mask)}, {"rle": M.encode_uncompressed_rle(mask)},
        {"box": [3, 2, 8, 5]}, {"bbox": [3, 2, 8, 5]}, [3, 2, 8, 5], {"polygon": [[3, 2, 11, 2, 11, 7, 3, 7]]},
        {"png": M.encode_png_base64(mask)}, {"bitmap": mask.astype(int).tolist()}, mask, M.encode_sam(mask),
        mask.astype(int).tolist(),  # a bare bitmap: told from polygons by the image size
    ]
    for form in forms:
        decoded = M.decode_region(form, 12, 16)
        assert (decoded.mask == mask).all() and decoded.notes == (), form


def test_decode_region_clips_boxes_with_a_note_and_refuses_empty_masks():
    decoded = M.decode_region({"box": [10, 5, 20, 20]}, 12, 16, where="regions[3]")
    assert decoded.mask.sum() == 6 * 7 and decoded.mask[5:, 10:].all()
    assert decoded.notes == (("regions[3].box: box [10, 5, 20, 20] reaches outside the 16x12 (WxH) image; "
                             "clipped to [10, 5, 6, 7]"),)
    with pytest.raises(MaskError, match=r"lies outside") as info:
        M.decode_region({"box": [20, 0, 5, 5]}, 12, 16, where="regions[0]")
    assert info.value.where == "regions[0].box"
    with pytest.raises(MaskError, match="regions\\[2\\]: the mask is empty") as info:
        M.decode_region(M.encode_rle(np.zeros((12, 16), bool)), 12, 16, where="regions[2]")
    assert info.value.code == "empty_mask"


def test_decode_region_fits_sizes_only_when_asked_and_names_the_option():
    small = _square()[::2, ::2]
    fit = M.RegionFit(resize_option="pass --resize-masks")
    with pytest.raises(MaskError, match="pass --resize-masks") as info:
        M.decode_region({"png": M.encode_png_base64(small)}, 12, 16, fit=fit)
    assert info.value.code == "mask_size_mismatch"
    resized = M.decode_region({"rle": M.encode_rle(small)}, 12, 16, fit=M.RegionFit(resize=True)).mask
    assert resized.shape == (12, 16) and resized[2:6, 4:10].all()
    with pytest.raises(MaskError) as info:  # refused from its size, before decoding allocates it
        M.decode_region({"rle": {"size": [10**5, 10**5], "counts": [10**10]}}, 12, 16,
                        fit=M.RegionFit(resize=True, max_pixels=10**6))
    assert info.value.code == "image_too_large"


def test_decode_region_notes_what_it_tolerates():
    entry = M.encode_sam(_square()) | {"area": 3}
    assert "does not match" in M.decode_region(entry, 12, 16).notes[0]
    with pytest.raises(MaskError, match="does not match"):
        M.decode_region(entry, 12, 16, fit=M.RegionFit(strict=True))
    bowtie = {"polygon": [[0, 0, 10, 10, 10, 0, 0, 10]]}
    assert "self-intersecting" in M.decode_region(bowtie, 12, 16).notes[0]


@pytest.mark.parametrize(("region", "where", "code"), [
    ("box", "r", "invalid_type"), ({"circle": 1}, "r", "invalid_region"), ({"box": [1, 1, 2, 2], "png": "x"}, "r",
    "invalid_region"), ({"box": "abc"}, "r.box", "invalid_type"), ({"png": "%%"}, "r.png", "invalid_base64"),
    ({"size": [12, 16], "counts": [1]}, "r", "invalid_mask"), ({"polygon": "abc"}, "r.polygon", "invalid_type"),
])
def test_decode_region_errors_name_the_region(region, where, code):
    with pytest.raises(MaskError) as info:
        M.decode_region(region, 12, 16, where="r")
    assert (info.value.where, info.value.code) == (where, code)


@pytest.mark.parametrize(("region", "message"), [
    (7, ("r: a region must be an object with one of ['rle', 'polygon', 'box', 'png', 'bitmap'], a COCO RLE or a "
         "SAM entry, got int")),
    ({"circle": 1}, ("r: a region needs exactly one of ['rle', 'polygon', 'box', 'png', 'bitmap'], or is a COCO RLE "
                     "{size, counts} or a SAM entry with 'segmentation'; got keys ['circle']")),
    ({"png": 5}, "r.png: png must be base64 text, got int"),
    ({"polygon": 5}, "r.polygon: polygon must be a list of [x1, y1, x2, y2, ...] lists"),
    ([], "r: empty mask list: expected polygons, a box, a bitmap or RLE parts"),
])
def test_decode_region_error_messages(region, message):
    with pytest.raises(MaskError) as info:
        M.decode_region(region, 12, 16, where="r")
    assert str(info.value) == message


def test_image_to_mask_is_one_rule_for_pngs_and_images():
    rgba = np.zeros((12, 16, 4), np.uint8)
    rgba[2:7, 3:11, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    assert (M.image_to_mask(image) == _square()).all() and (M.alpha_mask(image) == _square()).all()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    assert (M.decode_png(buf.getvalue()) == _square()).all()


def test_decode_regions_stacks_in_request_order_and_keeps_every_note():
    square, other = _square(), np.zeros((12, 16), bool)
    other[8:12, 0:4] = True
    bowtie = {"polygon": [[0, 0, 10, 10, 10, 0, 0, 10]]}
    decoded = M.decode_regions([{"box": [10, 5, 20, 20]}, M.encode_rle(other), bowtie, {"rle": M.encode_rle(square)}],
                               12, 16, max_regions=4, where="messages[0].regions")
    assert decoded.masks.shape == (4, 12, 16) and decoded.masks.dtype == bool
    assert (decoded.masks[1] == other).all() and (decoded.masks[3] == square).all()
    assert decoded.masks[0].sum() == 6 * 7 and (decoded.masks[2] == M.decode_region(bowtie, 12, 16).mask).all()
    assert [note.split(":")[0] for note in decoded.notes] == ["messages[0].regions[0].box", "messages[0].regions[2].polygon"]


@pytest.mark.parametrize(("regions", "code", "message"), [
    ({"box": [1, 1, 2, 2]}, "invalid_type", "regions: must be a list of regions, got dict"),
    ([], "invalid_value", "regions: is empty: give at least one region"),
    ([{"box": [1, 1, 2, 2]}] * 3, "too_many_regions", "regions: too many regions: 3 > 2"),
])
def test_decode_regions_checks_the_list_first(regions, code, message):
    with pytest.raises(MaskError) as info:
        M.decode_regions(regions, 12, 16, max_regions=2)
    assert (str(info.value), info.value.code, info.value.where) == (message, code, "regions")


def test_decode_regions_names_the_bad_region_and_passes_the_fit_on():
    with pytest.raises(MaskError) as info:
        M.decode_regions([{"box": [1, 1, 2, 2]}, {"box": [20, 0, 5, 5]}], 12, 16, max_regions=2)
    assert info.value.where == "regions[1].box"
    small = {"rle": M.encode_rle(_square()[::2, ::2])}
    with pytest.raises(MaskError, match="or pass --resize-masks"):
        M.decode_regions([small], 12, 16, max_regions=1, fit=M.RegionFit(resize_option="pass --resize-masks"))
    resized = M.decode_regions([small], 12, 16, max_regions=2, fit=M.RegionFit(resize=True)).masks
    assert resized.shape == (1, 12, 16) and resized[0, 2:6, 4:10].all()


def test_fit_region_holds_decoded_masks_to_the_region_rules():
    square = _square()
    assert M.fit_region(square, 12, 16) is square
    resized = M.fit_region(square[::2, ::2], 12, 16, fit=M.RegionFit(resize=True))
    assert resized.shape == (12, 16) and resized[2:6, 4:10].all()
    with pytest.raises(MaskError) as info:
        M.fit_region(square[::2, ::2], 12, 16, fit=M.RegionFit(resize_option="set resize"), where="mask_images[1]")
    assert (str(info.value), info.value.code) == (
        "mask_images[1]: mask size 8x6 (WxH) differs from the image 16x12; send masks at the image size or set resize",
        "mask_size_mismatch")
    with pytest.raises(MaskError) as info:
        M.fit_region(np.zeros((12, 16), bool), 12, 16)
    assert (info.value.where, info.value.code) == ("region", "empty_mask")


def test_panoptic_segment_ids_read_rgb_as_r_plus_256g_plus_65536b(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (1, 0, 0)
    rgb[0, 1] = (0, 1, 0)
    rgb[0, 2] = (0, 0, 1)
    rgb[1, 0] = (255, 255, 255)
    rgb[1, 1] = (7, 2, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    expected = np.array([[1, 256, 65536], [256**3 - 1, 7 + 2 * 256 + 3 * 65536, 0]])
    ids = M.panoptic_segment_ids(buf.getvalue())
    assert ids.dtype == np.int64 and (ids == expected).all()
    path = tmp_path / "pan.png"
    path.write_bytes(buf.getvalue())
    assert (M.panoptic_segment_ids(str(path)) == expected).all()  # a path reads the same
    assert (M.panoptic_segment_ids(bytearray(buf.getvalue())) == expected).all()
    with pytest.raises(MaskError, match="undecodable panoptic PNG"):
        M.panoptic_segment_ids(b"not a png")


def _wide() -> np.ndarray:
    mask = np.zeros((12, 16), bool)
    mask[2:7, 3:15] = True
    return mask


def test_to_rle_keeps_height_and_width_apart_and_checks_both():
    wide = _wide()
    for obj in (wide, wide.astype(int).tolist(), M.encode_png(wide), {"box": [3, 2, 12, 5]}):
        rle = M.to_rle(obj, 12, 16)
        assert rle["size"] == [12, 16] and (M.decode_rle(rle) == wide).all()
    for obj in (wide[:, :15], M.encode_png(wide[:, :15])):  # one column short
        with pytest.raises(MaskError) as info:
            M.to_rle(obj, 12, 16)
        assert info.value.code == "mask_size_mismatch"
    bowtie = [[0, 0, 10, 10, 10, 0, 0, 10]]
    with pytest.warns(MaskWarning, match="self-intersecting"):  # accepted unless strict
        assert M.to_rle(bowtie, 12, 16) == M.encode_rle(M.decode_mask(bowtie, 12, 16))
    with pytest.raises(MaskError, match="polygon 0 is self-intersecting"):
        M.to_rle(bowtie, 12, 16, strict=True)


def test_rle_area_reads_str_and_bytes_counts():
    rle = M.encode_rle(_wide())
    assert M.rle_area(rle) == M.rle_area(dict(rle, counts=rle["counts"].encode())) == 5 * 12


def test_decode_box_is_boolean():
    box = M.decode_box([3, 2, 12, 5], 12, 16)
    assert box.dtype == bool and (box == _wide()).all()


def test_decode_sam_checks_sizes_and_areas():
    wide = _wide()
    entry = M.encode_sam(wide)
    with pytest.raises(MaskError, match="^SAM entry must be a dict with a 'segmentation' key$"):
        M.decode_sam({"bbox": [0, 0, 1, 1]})
    with pytest.raises(MaskError) as info:  # RLE of another height
        M.decode_sam(entry, 10, 16)
    assert info.value.code == "mask_size_mismatch"
    bitmap = dict(entry, segmentation=wide.astype(int).tolist())
    assert (M.decode_sam(bitmap) == wide).all()  # no image size: read as it is
    with pytest.raises(MaskError):  # a bitmap one column short is refused (read as a polygon, it has bools)
        M.decode_sam_list([dict(bitmap, segmentation=wide[:, :15].astype(int).tolist())], 12, 16)
    wrong_area = dict(entry, area=3)
    assert (M.decode_sam(wrong_area) == wide).all()  # tolerated unless strict
    with pytest.raises(MaskError, match="SAM entry area 3 does not match the mask's 60 pixels"):
        M.decode_sam(wrong_area, strict=True)


def test_a_sam_segmentation_dict_is_read_as_rle():
    with pytest.raises(MaskError, match="RLE needs 'size' and 'counts'") as info:
        M.decode_region({"segmentation": {"polygon": [[0, 0, 4, 0, 4, 4]]}}, 12, 16)
    assert info.value.where == "region"


def test_polygon_coordinates_may_reach_four_image_sizes_plus_16_outside():
    # 12x16 image: bound 4 * 16 + 16 = 80
    assert M.decode_polygons([0, 0, 80, 0, 0, 5], 12, 16).any()
    with pytest.raises(MaskError, match=r"polygon 0 has a coordinate far outside the 16x12 \(WxH\) image \(81 > 80\)"):
        M.decode_polygons([0, 0, 81, 0, 0, 5], 12, 16)
    with pytest.raises(MaskError, match="^polygon list is empty$"):
        M.decode_polygons([], 12, 16)
    with pytest.raises(MaskError, match="polygon 0 has non-numeric coordinates"):
        M.decode_polygons([[0, 0, [1, 2], 3, 4, 5]], 12, 16)  # ragged nesting
    with pytest.warns(MaskWarning, match=r"^polygon 0 is self-intersecting \(accepted: rasterised as pycocotools does; "
                                         r"strict=True rejects\)$"):
        M.decode_polygons([[0, 0, 10, 10, 10, 0, 0, 10]], 12, 16)


def test_self_intersection_of_polygons_with_more_than_512_points():
    angles = np.linspace(0, 2 * np.pi, 600, endpoint=False)
    circle = np.stack([50 + 40 * np.cos(angles), 50 + 40 * np.sin(angles)], axis=1)
    assert not M.polygon_self_intersects(circle)
    crossed = circle.copy()
    crossed[[100, 400]] = crossed[[400, 100]]  # two far vertices swapped: their edges cross the circle
    assert M.polygon_self_intersects(crossed)


def test_boxes_reaching_out_on_one_side_only_are_refused_or_clipped():
    for box in ([10, 2, 8, 5], [1, -1, 4, 4], [-1, 1, 4, 4], [1, 10, 4, 4]):  # right, top, left, bottom
        with pytest.raises(MaskError, match="reaches outside the image 16x12"):
            M.decode_box(box, 12, 16)
        assert M.decode_region({"box": box}, 12, 16).notes  # clipped, with a note


def test_bitmaps_with_a_channel_axis_and_bare_bitmaps():
    mask = _wide()
    assert (M.decode_binary(mask[..., None].astype(np.uint8)) == mask).all()
    with pytest.raises(MaskError, match="bitmap rows have different lengths"):
        M.decode_binary([[0, 1], [1]])
    assert M.detect_format([[0, 1, 1], [1, 0, 0]]) == "binary"  # no image size known: 0/1 rows are a bitmap


def test_encode_sam_keeps_the_given_points_and_crop_box():
    entry = M.encode_sam(_wide(), point_coords=[[3, 4]], crop_box=[0, 0, 8, 6])
    assert entry["point_coords"] == [[3.0, 4.0]] and entry["crop_box"] == [0.0, 0.0, 8.0, 6.0]
    assert M.encode_sam(_wide())["point_coords"] == []


def test_png_size_limits_are_image_too_large(monkeypatch):
    png = M.encode_png(_wide())
    with pytest.raises(MaskError) as info:
        M.decode_png(png, max_pixels=100)
    assert (str(info.value), info.value.code) == ("PNG mask is 16x12 (WxH): more than 100 pixels", "image_too_large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's decompression-bomb limit, lowered to this PNG
    with pytest.raises(MaskError) as info:
        M.decode_png(png)
    assert (str(info.value), info.value.code) == ("PNG mask is too large (decompression bomb limit)", "image_too_large")


def test_a_bare_row_list_of_another_width_is_not_a_bitmap():
    rows = _wide()[:, :15].astype(int).tolist()  # 12 rows of 15: read as polygons (odd coordinate counts)
    with pytest.raises(MaskError, match="odd number of coordinates"):
        M.decode_region(rows, 12, 16, fit=M.RegionFit(resize=True))


def test_rle_parts_merge_and_must_share_a_size():
    top, bottom = np.zeros((12, 16), bool), np.zeros((12, 16), bool)
    top[:3], bottom[9:] = True, True
    assert (M.decode_rle([M.encode_rle(top), M.encode_rle(bottom)]) == (top | bottom)).all()
    assert M.detect_format([M.encode_rle(top), M.encode_rle(bottom)]) == "rle"
    with pytest.raises(MaskError, match=r"RLE parts have different sizes \[\(10, 16\), \(12, 16\)\]"):
        M.decode_rle([M.encode_rle(top), M.encode_rle(bottom[:10])])


def test_rle_and_mask_checks_name_the_value():
    with pytest.raises(MaskError, match="^RLE must be a dict, got str$"):
        M.decode_rle("abc")
    with pytest.raises(MaskError, match=r"RLE size must be \[height, width\] integers, got \[True, 16\]"):
        M.decode_rle({"size": [True, 16], "counts": [192]})
    with pytest.raises(MaskError, match=r"^mask must be 2-D \(H, W\), got shape \(2, 2, 2\)$"):
        M.encode_rle(np.zeros((2, 2, 2), bool))
    with pytest.raises(MaskError, match=r"^PNG size 16x12 \(WxH\) does not match the image 16x10$"):
        M.decode_png(M.encode_png(_wide()), 10, 16)
    assert M.detect_format({"counts": "x"}) == "rle"  # RLE by either key; its checks then name what is missing
    assert M.detect_format([1, 2, 3, 4, 5, 6]) == "polygons"


def test_to_rle_reads_sam_entries_of_every_segmentation_form():
    wide = _wide()
    expected = M.encode_rle(wide)
    for seg in (wide.astype(int).tolist(), M.encode_png_base64(wide), [[3, 2, 15, 2, 15, 7, 3, 7]]):
        assert M.to_rle({"segmentation": seg, "area": 60}, 12, 16, strict=True) == expected
    with pytest.raises(MaskError) as info:  # a PNG segmentation of another width
        M.to_rle({"segmentation": M.encode_png_base64(wide[:, :15])}, 12, 16)
    assert info.value.code == "mask_size_mismatch"
    with pytest.raises(MaskError, match="self-intersecting"):
        M.to_rle({"segmentation": [[0, 0, 10, 10, 10, 0, 0, 10]]}, 12, 16, strict=True)
