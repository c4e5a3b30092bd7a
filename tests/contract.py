"""The final dataset's column contract, checked row by row (only the columns that are present).

Mirrors the contract table of the design: users and the trainer rely on these invariants.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from stages.common import decode_mask

REQUIRED = ("sample_id", "images", "prompt", "chosen", "rejected", "question", "chosen_text", "rejected_text")


def _rgb(value: Any) -> np.ndarray:
    if isinstance(value, list):
        value = value[0]
    return np.asarray(Image.open(io.BytesIO(value["bytes"])).convert("RGB"))


def check(output_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, problems) of the dataset under output_dir/dataset."""
    files = sorted((output_dir / "dataset" / "data").glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    problems: list[str] = []
    if not rows:
        return rows, ["no rows"]
    problems += [f"missing column {c}" for c in REQUIRED if c not in rows[0]]
    ids = [r["sample_id"] for r in rows]
    if len(ids) != len(set(ids)):
        problems.append("duplicate sample_id")
    for r in rows:
        sid = r["sample_id"]
        img = _rgb(r["images"])
        h, w = img.shape[:2]
        for b in r.get("boxes") or []:
            if not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                problems.append(f"{sid}: box {b} outside {w}x{h}")
        if "boxes" in r and not (len(r["boxes"]) == len(r["box_scores"]) == len(r["box_phrases"])):
            problems.append(f"{sid}: boxes, box_scores and box_phrases differ in length")
        if "key_phrases" in r and len(r["key_phrases"]) != len(r["key_phrase_scores"]):
            problems.append(f"{sid}: key_phrases and key_phrase_scores differ in length")
        mask = None
        if r.get("mask") is not None:
            mask = decode_mask(r["mask"])
            if mask.shape != (h, w):
                problems.append(f"{sid}: mask {mask.shape} vs image {(h, w)}")
                mask = None
            elif abs(mask.mean() - r["mask_area"]) > 1e-3:
                problems.append(f"{sid}: mask_area {r['mask_area']} vs {mask.mean():.4f}")
        if r.get("rejected_image") is not None:
            rej = _rgb(r["rejected_image"])
            if rej.shape != img.shape:
                problems.append(f"{sid}: rejected_image shape {rej.shape}")
            elif mask is None:
                problems.append(f"{sid}: a rejected_image without the mask of what changed")
            else:
                if not np.array_equal(img[~mask], rej[~mask]):
                    problems.append(f"{sid}: pixels outside the mask changed")
                if np.abs(img[mask].astype(int) - rej[mask].astype(int)).mean() < 1:
                    problems.append(f"{sid}: pixels inside the mask barely changed")
        for c in ("difficulty", "ref_logp_chosen", "ref_logp_rejected", "ref_logp_chosen_noised"):
            if c in r and (r[c] is None or not math.isfinite(r[c])):
                problems.append(f"{sid}: {c} is not finite")
    return rows, problems
