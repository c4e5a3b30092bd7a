"""Pictures of a finished dataset: a sheet (`sheet.png`, one row per sample: original | key objects | m'),
a self-contained HTML page (`index.html`, every image embedded) and the plots.

Panels are scaled with one bilinear filter, so the dispreferred panel differs from the original panel only
where the scaled mask is non-zero: what a viewer sees changed is what the pipeline changed. Everything is a
function of the dataset, the seed and the options: the same inputs give the same bytes.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mfpo.masks import decode_mask
from mfpo.publish import dataset as ds
from mfpo.publish.plots import make_plots
from pipeline.errors import RowError
from pipeline.images import ImageLimits, to_rgb, validate_image
from pipeline.storage import write_json

PANEL_NAMES = ("original", "key objects", "dispreferred")
RESAMPLE = Image.Resampling.BILINEAR  # non-negative weights: a pixel changes only if its footprint touches the mask
PAD = 8
HEADER = 28
CAPTION_WIDTH = 520
_BOX_COLORS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 200, 120), (200, 80, 255)]
_MASK_TINT = np.array([255, 0, 64], dtype=np.float32)
_MASK_ALPHA = 0.45
_THUMB_LIMITS = ImageLimits()  # quarantined payloads are decoded with the same bounds as ingest
_SHOWN_FIELDS = ("question", "chosen_text", "rejected_text")


@dataclass
class Panels:
    original: Image.Image
    overlay: Image.Image
    dispreferred: Image.Image | None
    missing: str = ""  # why there is no dispreferred panel

    def images(self) -> list[Image.Image | None]:
        return [self.original, self.overlay, self.dispreferred]


@dataclass
class PreviewFiles:
    folder: Path
    files: list[Path] = field(default_factory=list)
    samples: int = 0
    plots: int = 0

    @property
    def index(self) -> Path:
        return self.folder / "index.html"


def font(size: int = 13) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same glyphs on every machine


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    scale = min(size / width, size / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open(image: dict[str, Any] | None) -> Image.Image | None:
    if image is None or image.get("bytes") is None:
        return None
    with Image.open(io.BytesIO(image["bytes"])) as img:
        return to_rgb(img).copy()


def render_panels(row: dict[str, Any], size: int) -> Panels:
    """The three panels of one row, each scaled to fit a size x size cell."""
    original = _open(row["images"][0])
    assert original is not None
    w, h = original.size
    target = fit(w, h, size)
    small = original.resize(target, RESAMPLE)
    rejected = _open(row.get("rejected_image"))
    missing = ""
    if rejected is None:
        fallback = (row.get("perturbation") or {}).get("fallback")
        missing = f"no m' (fallback: {fallback})" if fallback else "no m'"
    return Panels(
        original=small,
        overlay=_overlay(small, row, (w, h)),
        dispreferred=rejected.resize(target, RESAMPLE) if rejected is not None else None,
        missing=missing,
    )


def _overlay(small: Image.Image, row: dict[str, Any], full_size: tuple[int, int]) -> Image.Image:
    """The original with the mask tinted and the boxes and their phrases drawn."""
    arr = np.asarray(small, dtype=np.float32).copy()
    if row.get("mask") is not None:
        mask = Image.fromarray(decode_mask(row["mask"]).astype(np.uint8) * 255).resize(small.size, Image.NEAREST)
        inside = np.asarray(mask) > 0
        arr[inside] = arr[inside] * (1 - _MASK_ALPHA) + _MASK_TINT * _MASK_ALPHA
    out = Image.fromarray(arr.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    sx, sy = small.width / full_size[0], small.height / full_size[1]
    label_font = font(11)
    phrases = row.get("box_phrases") or []
    for i, box in enumerate(row.get("boxes") or []):
        color = _BOX_COLORS[i % len(_BOX_COLORS)]
        x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=2)
        if i < len(phrases) and phrases[i]:
            # The label sits at the box's top left, moved left if it would run off the image.
            x = max(0.0, min(x0 + 2, out.width - draw.textlength(phrases[i], font=label_font) - 3))
            left, top, right, bottom = draw.textbbox((x, y0 + 1), phrases[i], font=label_font)
            draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=color)
            draw.text((x, y0 + 1), phrases[i], fill=(0, 0, 0), font=label_font)
    return out


def caption_lines(row: dict[str, Any], width_px: int, text_font: Any) -> list[str]:
    """The row's caption: id, bucket and difficulty; the question; truncated answers; what made m'."""
    head = [str(row["sample_id"])]
    if row.get("bucket"):
        head.append(str(row["bucket"]))
    if row.get("difficulty") is not None:
        head.append(f"difficulty {row['difficulty']:.3f}")
    lines = ["  ·  ".join(head)]
    for label, key, max_lines in (("Q", "question", 3), ("chosen", "chosen_text", 3), ("rejected", "rejected_text", 3)):
        lines += _wrap(f"{label}: {row.get(key) or ''}", width_px, text_font, max_lines)
    detail = []
    if row.get("key_phrases"):
        detail.append("key: " + ", ".join(row["key_phrases"]))
    if row.get("mask_area") is not None:
        detail.append(f"mask {100 * row['mask_area']:.1f}%")
    p = row.get("perturbation") or {}
    if p.get("method"):
        how = p["method"] + (f" t={p['timestep']}" if p.get("timestep") is not None else "")
        detail.append(how + (f" (fallback: {p['fallback']})" if p.get("fallback") else ""))
    if detail:
        lines += _wrap("  ·  ".join(detail), width_px, text_font, 2)
    return lines


def _wrap(text: str, width_px: int, text_font: Any, max_lines: int) -> list[str]:
    """Greedy word wrap to a pixel width; the last kept line ends with an ellipsis when text was cut."""
    words = " ".join(text.split()).split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        trial = f"{current} {word}".strip()
        if text_font.getlength(trial) <= width_px or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and text_font.getlength(last + " …") > width_px:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    # A single word wider than the line is cut too.
    return [line if text_font.getlength(line) <= width_px else _clip(line, width_px, text_font) for line in lines]


def _clip(line: str, width_px: int, text_font: Any) -> str:
    while line and text_font.getlength(line + "…") > width_px:
        line = line[:-1]
    return line + "…"


def render_sheet(rows: list[dict[str, Any]], size: int = 224) -> tuple[Image.Image, dict[str, Any]]:
    """The sheet and its layout: for each row, where each panel's image lies ([x, y, width, height])."""
    cell = size + PAD
    width = PAD + 3 * cell + CAPTION_WIDTH + PAD
    height = HEADER + max(len(rows), 1) * cell + PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    title_font, text_font = font(14), font(13)
    for i, name in enumerate((*PANEL_NAMES, "question and answers")):
        draw.text((PAD + i * cell, 6), name, fill=(60, 60, 60), font=title_font)
    layout: dict[str, Any] = {"panel_size": size, "panels": list(PANEL_NAMES), "rows": []}
    for r, row in enumerate(rows):
        top = HEADER + r * cell
        panels = render_panels(row, size)
        boxes: dict[str, list[int] | None] = {}
        for i, (name, img) in enumerate(zip(PANEL_NAMES, panels.images(), strict=True)):
            x_cell = PAD + i * cell
            draw.rectangle([x_cell, top, x_cell + size - 1, top + size - 1], fill=(238, 238, 238))
            if img is None:
                draw.text((x_cell + 10, top + size // 2 - 8), panels.missing, fill=(120, 120, 120), font=text_font)
                boxes[name] = None
                continue
            x, y = x_cell + (size - img.width) // 2, top + (size - img.height) // 2
            sheet.paste(img, (x, y))
            boxes[name] = [x, y, img.width, img.height]
        line_h = 16
        for k, line in enumerate(caption_lines(row, CAPTION_WIDTH - 12, text_font)[: size // line_h]):
            draw.text((PAD + 3 * cell, top + k * line_h), line, fill=(20, 20, 20) if k else (0, 0, 120), font=text_font)
        layout["rows"].append({"sample_id": row["sample_id"], "top": top, "panels": boxes})
    return sheet, layout


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------- products
def sample_rows(dataset_dir: Path, n: int, seed: int, bucket: str | None = None) -> list[dict[str, Any]]:
    return ds.load_rows(dataset_dir, ds.pick_samples(dataset_dir, n, seed, bucket))


def card_pictures(dataset_dir: Path, n: int, seed: int, size: int = 192) -> dict[str, bytes]:
    """What the dataset card embeds: the preview grid and the plots, as repo paths -> PNG bytes."""
    out: dict[str, bytes] = {}
    rows = sample_rows(dataset_dir, n, seed)
    if rows:
        sheet, _ = render_sheet(rows, size)
        out["mfpo/sheet.png"] = png_bytes(sheet)
    for name, data in make_plots(ds.read_columns(dataset_dir, ds.SUMMARY_COLUMNS)).items():
        out[f"mfpo/plots/{name}"] = data
    return out


def write_preview(
    output_dir: Path,
    stages: list[str],
    out: Path,
    *,
    n: int = 24,
    seed: int = 0,
    bucket: str | None = None,
    size: int = 224,
    title: str = "MFPO dataset",
    max_quarantine: int = 500,
) -> PreviewFiles:
    """sheet.png, sheet.json, index.html and the plots under `out`."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    dataset_dir = Path(output_dir) / "dataset"
    rows = sample_rows(dataset_dir, n, seed, bucket)
    result = PreviewFiles(out, samples=len(rows))
    out.mkdir(parents=True, exist_ok=True)
    sheet, layout = render_sheet(rows, size)
    _write(result, out / "sheet.png", png_bytes(sheet))
    write_json(out / "sheet.json", layout)
    result.files.append(out / "sheet.json")
    summary = ds.read_columns(dataset_dir, ds.SUMMARY_COLUMNS)
    for name, data in make_plots(summary).items():
        _write(result, out / name, data)
        result.plots += 1

    samples = [_page_sample(row, size) for row in rows]
    q_rows, q_total = ds.quarantined(output_dir, stages, limit=max_quarantine)
    images = ds.source_images(output_dir, {q["sample_id"] for q in q_rows if not q.get("payload")})
    quarantine = [_page_quarantine(q, images.get(q["sample_id"])) for q in q_rows]
    buckets = sorted(set(summary["bucket"].to_pylist()) - {None}) if "bucket" in summary.column_names else []
    env = Environment(loader=PackageLoader("mfpo.publish", "templates"), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template("index.html.j2").render(
        title=title,
        panel=size,
        samples=samples,
        shown=len(samples),
        total_rows=summary.num_rows,
        seed=seed,
        bucket=bucket,
        buckets=buckets,
        quarantine=quarantine,
        quarantine_total=q_total,
    )
    _write(result, out / "index.html", page.encode("utf-8"))
    return result


def _write(result: PreviewFiles, path: Path, data: bytes) -> None:
    from pipeline.storage import atomic_write

    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    result.files.append(path)


def _page_sample(row: dict[str, Any], size: int) -> dict[str, Any]:
    panels = render_panels(row, size)
    entries = []
    for name, img in zip(PANEL_NAMES, panels.images(), strict=True):
        if img is None:
            entries.append({"name": name, "src": None, "missing": panels.missing})
        else:
            # m' is noise: PNG keeps it exact; the other panels are photos.
            entries.append(
                {
                    "name": name,
                    "src": _data_uri(img, "PNG" if name == "dispreferred" else "JPEG"),
                    "width": img.width,
                    "height": img.height,
                }
            )
    fields: list[tuple[str, str]] = []
    if row.get("difficulty") is not None:
        fields.append(("difficulty", f"{row['difficulty']:.4f}"))
    for key in _SHOWN_FIELDS:
        if row.get(key) is not None:
            fields.append((key.replace("_text", ""), row[key]))
    if row.get("key_phrases"):
        scores = row.get("key_phrase_scores") or [None] * len(row["key_phrases"])
        fields.append(
            (
                "key phrases",
                ", ".join(
                    f"{p} ({s:.2f})" if s is not None else p for p, s in zip(row["key_phrases"], scores, strict=False)
                ),
            )
        )
    if row.get("boxes"):
        fields.append(
            (
                "boxes",
                "; ".join(
                    f"{ph}: [{', '.join(f'{v:.0f}' for v in b)}] ({sc:.2f})"
                    for b, ph, sc in zip(
                        row["boxes"], row.get("box_phrases") or [], row.get("box_scores") or [], strict=False
                    )
                ),
            )
        )
    if row.get("mask_area") is not None:
        fields.append(("mask area", f"{100 * row['mask_area']:.2f}%"))
    if row.get("perturbation"):
        fields.append(("perturbation", json.dumps(row["perturbation"], sort_keys=True)))
    for key, label in (
        ("ref_logp_chosen", "ref log p(chosen)"),
        ("ref_logp_rejected", "ref log p(rejected)"),
        ("ref_logp_chosen_noised", "ref log p(chosen | m')"),
    ):
        if row.get(key) is not None:
            fields.append((label, f"{row[key]:.3f}"))
    if row.get("source"):
        fields.append(("source", json.dumps(row["source"], sort_keys=True)))
    return {
        "sample_id": row["sample_id"],
        "bucket": row.get("bucket"),
        "difficulty": row.get("difficulty"),
        "panels": entries,
        "fields": fields,
    }


def _page_quarantine(q: dict[str, Any], stored_image: dict[str, Any] | None) -> dict[str, Any]:
    src = None
    data = q.get("payload") or (stored_image or {}).get("bytes")
    if data:
        try:
            clean = validate_image(data, _THUMB_LIMITS)  # bounded: a bomb or a broken file gets no thumbnail
            with Image.open(io.BytesIO(clean.data)) as img:
                thumb = to_rgb(img).copy()
            thumb.thumbnail((96, 96), RESAMPLE)
            src = _data_uri(thumb)
        except (RowError, OSError, ValueError):  # quarantined rows may well carry an image that does not decode
            src = None
    return {
        "stage": q["stage"],
        "sample_id": q["sample_id"],
        "reason": q["reason"],
        "src": src,
        "fields": json.dumps(q["fields"], indent=1, sort_keys=True, ensure_ascii=False)[:4000],
    }
