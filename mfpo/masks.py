"""Masks and boxes as MFPO's data holds them: a boolean HxW mask as COCO RLE (what pycocotools and the Hub
viewer read), boxes as [x0, y0, x1, y1] in pixels."""

from __future__ import annotations

from typing import Any

import numpy as np


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean HxW mask as COCO RLE with a text `counts` (what pycocotools and the Hub viewer read)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def box_mask(box: list[float], height: int, width: int) -> np.ndarray:
    """The pixels whose centres lie inside an [x0, y0, x1, y1] box."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    c1, r1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
    mask[r0:r1, c0:c1] = True
    return mask


def clip_box(box: list[float], height: int, width: int) -> list[float] | None:
    """Clip to the image; None when nothing of the box is left."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return [x0, y0, x1, y1]
