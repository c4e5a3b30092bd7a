"""Plots of a finished dataset (matplotlib, headless): difficulty per bucket, mask-area fraction, boxes per
image and the most frequent key phrases. Each is a PNG whose bytes depend only on the data (no timestamp,
no software tag), so rebuilding a card from the same dataset gives the same files."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from mfpo.plots import figure, png_bytes

PLOTS = {
    "difficulty_by_bucket.png": "Difficulty per bucket",
    "mask_area.png": "Mask area (fraction of the image)",
    "boxes_per_image.png": "Boxes per image",
    "key_phrases.png": "Most frequent key phrases",
}
_COLORS = ["#4c9a2a", "#e0a800", "#c0392b", "#2c7fb8", "#8e44ad", "#7f8c8d"]


def make_plots(table: pa.Table, top_phrases: int = 20) -> dict[str, bytes]:
    """File name -> PNG bytes for the plots this table has the columns for."""
    cols = set(table.column_names)
    out: dict[str, bytes] = {}
    if {"difficulty", "bucket"} <= cols:
        out["difficulty_by_bucket.png"] = _difficulty(table["difficulty"].to_pylist(), table["bucket"].to_pylist())
    elif "difficulty" in cols:
        out["difficulty_by_bucket.png"] = _difficulty(table["difficulty"].to_pylist(), None)
    if "mask_area" in cols:
        areas = [a for a in table["mask_area"].to_pylist() if a is not None]
        out["mask_area.png"] = _histogram(areas, PLOTS["mask_area.png"], "fraction of pixels in the key region")
    if "boxes" in cols:
        counts = Counter(len(b or []) for b in table["boxes"].to_pylist())
        out["boxes_per_image.png"] = _bars(
            [str(k) for k in sorted(counts)], [counts[k] for k in sorted(counts)], PLOTS["boxes_per_image.png"], "boxes"
        )
    if "key_phrases" in cols:
        phrases = Counter(p for ps in table["key_phrases"].to_pylist() for p in (ps or []))
        top = sorted(phrases.items(), key=lambda kv: (-kv[1], kv[0]))[:top_phrases]
        out["key_phrases.png"] = _bars(
            [p for p, _ in top][::-1], [c for _, c in top][::-1], PLOTS["key_phrases.png"], "", horizontal=True
        )
    return out


def _difficulty(values: list[float], buckets: list[str] | None) -> bytes:
    fig, ax = figure()
    clean = [(v, b) for v, b in zip(values, buckets or [None] * len(values), strict=True) if v is not None]
    bins = _bins([v for v, _ in clean])
    if buckets is None:
        ax.hist([v for v, _ in clean], bins=bins, color=_COLORS[3])
    else:
        order = sorted({b for _, b in clean}, key=lambda b: min(v for v, x in clean if x == b))
        ax.hist(
            [[v for v, x in clean if x == b] for b in order],
            bins=bins,
            stacked=True,
            label=[f"{b} ({sum(1 for _, x in clean if x == b)})" for b in order],
            color=[_COLORS[i % len(_COLORS)] for i in range(len(order))],
        )
        ax.legend(title="bucket", fontsize=8)
    ax.set_title(PLOTS["difficulty_by_bucket.png"])
    ax.set_xlabel("difficulty (reference-model entropy over the chosen answer)")
    ax.set_ylabel("rows")
    return png_bytes(fig)


def _histogram(values: list[float], title: str, xlabel: str) -> bytes:
    fig, ax = figure()
    ax.hist(values, bins=_bins(values, lo=0.0, hi=1.0), color=_COLORS[3])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return png_bytes(fig)


def _bars(labels: list[str], counts: list[int], title: str, xlabel: str, horizontal: bool = False) -> bytes:
    fig, ax = figure(height=max(3.2, 0.22 * len(labels) + 1.0) if horizontal else 3.2)
    if horizontal:
        ax.barh(labels, counts, color=_COLORS[3])
        ax.set_xlabel("rows")
    else:
        ax.bar(labels, counts, color=_COLORS[3])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
    ax.set_title(title)
    return png_bytes(fig)


def _bins(values: list[float], lo: float | None = None, hi: float | None = None) -> list[float]:
    """20 equal bins over the data's range (or [lo, hi]); one bin when every value is the same."""
    lo = min(values, default=0.0) if lo is None else lo
    hi = max(values, default=1.0) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    return [lo + (hi - lo) * i / 20 for i in range(21)]
