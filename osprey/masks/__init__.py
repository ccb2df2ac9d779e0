"""Region masks: codecs (`codecs`), geometry (`geometry`) and the one region decoder (`regions`).

Every format Osprey data, clients and evals use is decoded here to `(H, W) bool` and back, so that a polygon
means the same pixels everywhere; `regions` lists the accepted forms.
"""

from .codecs import (
    PNG_SIGNATURE,
    alpha_mask,
    decode_binary,
    decode_png,
    decode_rle,
    encode_png,
    encode_png_base64,
    encode_rle,
    encode_uncompressed_rle,
    image_to_mask,
    panoptic_segment_ids,
    rle_area,
    rle_counts,
)
from .errors import MaskError, MaskWarning
from .geometry import (
    box_to_polygon,
    decode_box,
    decode_polygons,
    mask_area,
    mask_to_bbox,
    polygon_self_intersects,
)
from .regions import (
    REGION_KEYS,
    DecodedRegion,
    DecodedRegions,
    RegionFit,
    decode_mask,
    decode_region,
    decode_regions,
    decode_sam,
    decode_sam_list,
    detect_format,
    encode_sam,
    fit_mask,
    fit_region,
    to_rle,
)

__all__ = [
    "PNG_SIGNATURE", "REGION_KEYS", "DecodedRegion", "DecodedRegions", "MaskError", "MaskWarning", "RegionFit",
    "alpha_mask", "box_to_polygon", "decode_binary", "decode_box", "decode_mask", "decode_png", "decode_polygons",
    "decode_region", "decode_regions", "decode_rle", "decode_sam", "decode_sam_list", "detect_format",
    "encode_png", "encode_png_base64", "encode_rle", "encode_sam", "encode_uncompressed_rle", "fit_mask", "fit_region",
    "image_to_mask", "mask_area", "mask_to_bbox", "panoptic_segment_ids", "polygon_self_intersects", "rle_area", "rle_counts", "to_rle",
]
