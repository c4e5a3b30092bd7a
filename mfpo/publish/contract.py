"""The final dataset's column contract (DESIGN.md, "The final dataset's columns"), checked row by row.

Only the columns that are present are checked: a stage that has not run adds none, but a column that is
present must be right. Column-level checks (ids, lengths, finiteness) cover every row; the pixel checks
(boxes inside the image, the mask's size and area, pixels outside the mask unchanged) decode images and
can be limited to a deterministic sample of rows for very large datasets.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from mfpo.masks import decode_mask
from pipeline.determinism import stable_hash

REQUIRED = ("sample_id", "images", "prompt", "chosen", "rejected", "question", "chosen_text", "rejected_text")
FINITE = ("difficulty", "ref_logp_chosen", "ref_logp_rejected", "ref_logp_chosen_noised")
# Columns the pixel checks decode; the other checks read everything but these.
_PIXEL_COLUMNS = ("images", "rejected_image", "mask")
MAX_PROBLEMS = 50  # enough to see a pattern; a broken dataset would otherwise print one line per row


@dataclass
class ContractReport:
    rows: int = 0
    pixel_rows: int = 0
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0  # found beyond MAX_PROBLEMS

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more_problems += 1


def image_rgb(value: Any) -> np.ndarray:
    """An `images` list or an Image struct as an HxWx3 uint8 array."""
    if isinstance(value, list):
        value = value[0]
    return np.asarray(Image.open(io.BytesIO(value["bytes"])).convert("RGB"))


def shard_files(dataset_dir: Path) -> list[Path]:
    return sorted((Path(dataset_dir) / "data").glob("*.parquet"))


def check_dataset(dataset_dir: Path, pixel_rows: int | None = None, seed: int = 0) -> ContractReport:
    """Check every shard under `dataset_dir/data`, one shard in memory at a time.

    `pixel_rows`: how many rows get the pixel checks (a sample chosen by a hash of (seed, sample_id), so
    the same rows every time); None checks every row.
    """
    report = ContractReport()
    files = shard_files(dataset_dir)
    if not files:
        report.add(f"no shards under {Path(dataset_dir) / 'data'}")
        return report
    names = pq.read_schema(files[0]).names
    report.problems += [f"missing column {c}" for c in REQUIRED if c not in names]
    pixel_ids = _pixel_sample(files, pixel_rows, seed)
    seen: set[str] = set()
    for f in files:
        if pq.read_schema(f).names != names:
            report.add(f"{f.name}: columns differ from {files[0].name}")
            continue
        table = pq.read_table(f)
        for row in _rows(table):
            sid = row["sample_id"]
            report.rows += 1
            if sid in seen:
                report.add(f"{sid}: duplicate sample_id")
            seen.add(sid)
            for problem in check_row(row, pixels=pixel_ids is None or sid in pixel_ids):
                report.add(f"{sid}: {problem}")
            report.pixel_rows += int(pixel_ids is None or sid in pixel_ids)
    if report.rows == 0:
        report.add("no rows")
    return report


def _pixel_sample(files: list[Path], pixel_rows: int | None, seed: int) -> set[str] | None:
    if pixel_rows is None:
        return None
    ids = [sid for f in files for sid in pq.read_table(f, columns=["sample_id"])["sample_id"].to_pylist()]
    if len(ids) <= pixel_rows:
        return None
    return set(sorted(ids, key=lambda sid: stable_hash(seed, sid, "contract"))[:pixel_rows])


def _rows(table: Any) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=64):
        yield from batch.to_pylist()


def check_row(r: dict[str, Any], pixels: bool = True) -> list[str]:
    """What is wrong with one row (empty when it holds the contract)."""
    problems: list[str] = []
    if "boxes" in r and not (len(r["boxes"]) == len(r["box_scores"]) == len(r["box_phrases"])):
        problems.append("boxes, box_scores and box_phrases differ in length")
    if "key_phrases" in r and len(r["key_phrases"]) != len(r["key_phrase_scores"]):
        problems.append("key_phrases and key_phrase_scores differ in length")
    if "key_phrase_sources" in r and len(r["key_phrases"]) != len(r["key_phrase_sources"]):
        problems.append("key_phrases and key_phrase_sources differ in length")
    if "unboxed_phrases" in r and not set(r["unboxed_phrases"]) <= set(r.get("key_phrases") or []):
        problems.append("unboxed_phrases names a phrase that is not a key phrase")
    prompt = r.get("prompt")
    if "prompt" in r and not (isinstance(prompt, list) and prompt and prompt[0].get("role") == "user"):
        problems.append("prompt is not a conversational user turn")
    for c in FINITE:
        if c in r and (r[c] is None or not math.isfinite(r[c])):
            problems.append(f"{c} is not finite")
    if pixels and "images" in r:
        problems += _pixel_problems(r)
    return problems


def _pixel_problems(r: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    try:
        img = image_rgb(r["images"])
    except Exception as err:
        return [f"images do not decode ({err})"]
    h, w = img.shape[:2]
    for b in r.get("boxes") or []:
        if len(b) != 4 or not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
            problems.append(f"box {b} outside the {w}x{h} image")
    mask = None
    if r.get("mask") is not None:
        mask = decode_mask(r["mask"])
        if mask.shape != (h, w):
            problems.append(f"mask {mask.shape} vs image {(h, w)}")
            mask = None
        elif abs(mask.mean() - r["mask_area"]) > 1e-3:
            problems.append(f"mask_area {r['mask_area']} vs {mask.mean():.4f}")
    if r.get("rejected_image") is not None:
        rej = image_rgb(r["rejected_image"])
        if rej.shape != img.shape:
            problems.append(f"rejected_image shape {rej.shape} vs {img.shape}")
        elif mask is None:
            problems.append("a rejected_image without the mask of what changed")
        else:
            if not np.array_equal(img[~mask], rej[~mask]):
                problems.append("pixels outside the mask changed")
            if mask.any() and np.abs(img[mask].astype(int) - rej[mask].astype(int)).mean() < 1:
                problems.append("pixels inside the mask barely changed")
    return problems
