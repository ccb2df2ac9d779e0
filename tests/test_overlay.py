"""osprey.overlay (what `osprey describe --overlay` draws): outlines in each region's colour, number badges inside
the image that never overlap (even for masks sharing a corner or touching the image's edge), and a legend."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from osprey.overlay import colour, draw_regions

H, W = 120, 160
GREY = Image.new("RGB", (W, H), (128, 128, 128))


def _box(x0, y0, x1, y1):
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_outline_is_drawn_in_the_region_colour():
    mask = _box(40, 30, 100, 90)
    out = np.asarray(draw_regions(GREY, mask[None], ["a square"]).image)
    assert tuple(out[60, 40]) == colour(0)  # left edge
    assert tuple(out[89, 70]) == colour(0)  # bottom edge (last row inside)
    assert tuple(out[60, 70]) not in (colour(0), (128, 128, 128))  # inside: tinted, not outlined
    assert tuple(out[10, 10]) == (128, 128, 128)  # outside: untouched


def test_badges_are_inside_the_image_and_never_overlap():
    masks = np.stack([_box(0, 0, 30, 30), _box(0, 0, 20, 20), _box(2, 2, 25, 25),  # one shared corner
                      _box(150, 110, 160, 120), _box(140, 100, 160, 120),  # bottom-right corner of the image
                      _box(60, 0, 100, 5)])  # a thin strip at the top edge
    overlay = draw_regions(GREY, masks, [f"region {k}" for k in range(len(masks))])
    for badge in overlay.badges:
        assert 0 <= badge.x0 < badge.x1 <= W and 0 <= badge.y0 < badge.y1 <= H, badge
    for a, b in itertools.combinations(overlay.badges, 2):
        assert not a.overlaps(b), (a, b)
    pixels = np.asarray(overlay.image)
    for k, badge in enumerate(overlay.badges):  # each badge is painted in its region's colour
        patch = pixels[badge.y0:badge.y1, badge.x0:badge.x1].reshape(-1, 3)
        assert (patch == colour(k)).all(axis=1).mean() > 0.3


def test_a_free_corner_gets_its_badge_there():
    overlay = draw_regions(GREY, _box(50, 40, 90, 80)[None], ["x"])
    assert (overlay.badges[0].x0, overlay.badges[0].y0) == (50, 40)


def test_legend_below_the_image_holds_every_region():
    labels = ["a long caption that has to wrap because it is much wider than the legend could show on one line"] * 3
    masks = np.stack([_box(10, 10, 40, 40), _box(50, 50, 90, 90), _box(100, 10, 150, 60)])
    out = draw_regions(GREY, masks, labels).image
    assert out.width >= W and out.height > H
    legend = np.asarray(out)[H:]
    for k in range(3):  # a swatch per region
        assert (legend == colour(k)).all(axis=-1).any()
    assert (legend == (0, 0, 0)).all(axis=-1).sum() > 100  # the text


def test_labels_and_masks_must_agree():
    with pytest.raises(ValueError, match="2 masks but 1 labels"):
        draw_regions(GREY, np.stack([_box(0, 0, 5, 5)] * 2), ["one"])
