"""The dataset card and the files that go beside it: `README.md` (a Hub dataset card built with
`huggingface_hub.DatasetCard`), `mfpo/pipeline.yaml` (the resolved configuration), `mfpo/summary.json`,
`mfpo/sheet.png` (the preview grid) and `mfpo/plots/*.png`.

`dataset_files()` returns them as bytes: the run writes them into `<output_dir>/dataset/` when the write
stage is done, and `push` builds them again for the repository it pushes to (the card's usage lines name
it). Nothing in them depends on the time, the machine or the output directory, so a rebuild from the same
dataset gives the same bytes and an unchanged dataset pushes no new commit.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from mfpo.publish import dataset as ds
from mfpo.publish.plots import PLOTS
from mfpo.publish.preview import card_pictures
from pipeline.storage import atomic_write

TAGS = ["mfpo", "preference", "dpo", "multimodal", "vision-language", "hallucination"]
DEFAULT_LICENSE = "unknown"
CARD_PREVIEW_ROWS = 8
_TEMPLATE = Path(str(resources.files("mfpo.publish") / "templates" / "dataset_card.md.j2"))  # package data


def dataset_files(
    output_dir: Path,
    config: Any,
    stages: list[dict[str, Any]],
    *,
    repo_id: str | None = None,
    revision: str | None = None,
) -> dict[str, bytes]:
    """Repo path -> bytes of the card and the files it embeds or links, for the dataset under output_dir."""
    dataset_dir = Path(output_dir) / "dataset"
    write_cfg = config.stages["write"]
    pictures = card_pictures(dataset_dir, CARD_PREVIEW_ROWS, config.run.seed)
    summary = {
        "config": config.to_dict(),
        "stages": stages,
        "splits": {name: _rows(files) for name, files in ds.splits(dataset_dir).items()},
        "buckets": ds.bucket_counts(dataset_dir),
        "key_objects": ds.key_object_counts(dataset_dir),
    }
    files = {
        "README.md": render_card(dataset_dir, config, write_cfg, stages, summary, pictures, repo_id, revision),
        "mfpo/pipeline.yaml": resolved_yaml(config),
        "mfpo/summary.json": (json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode(),
    }
    files.update(pictures)
    return files


def write_dataset_files(output_dir: Path, files: dict[str, bytes]) -> None:
    root = Path(output_dir) / "dataset"
    for rel, data in files.items():
        atomic_write(root / rel, lambda tmp, data=data: tmp.write_bytes(data))


def resolved_yaml(config: Any) -> bytes:
    header = (
        "# The resolved configuration that made this dataset (every default filled in), for\n"
        "#   python -m pipeline run pipeline.yaml\n"
        "# Secrets are never stored: keys ending in _env name the environment variable that holds one.\n"
    )
    return (header + yaml.safe_dump(config.resolved(), sort_keys=False, allow_unicode=True)).encode("utf-8")


def _rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]


def size_category(n: int) -> str:
    """The Hub's `size_categories` value for n rows."""
    return next((name for bound, name in SIZE_CATEGORIES if n < bound), "n>1B")


def render_card(
    dataset_dir: Path,
    config: Any,
    write_cfg: Any,
    stages: list[dict[str, Any]],
    summary: dict[str, Any],
    pictures: dict[str, bytes],
    repo_id: str | None,
    revision: str | None,
) -> bytes:
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard, DatasetCardData

    split_files = ds.splits(dataset_dir)
    schema = pq.read_schema(next(iter(split_files.values()))[0])
    features = Features.from_arrow_schema(schema)  # reads the `huggingface` schema metadata (Image features)
    rows = sum(summary["splits"].values())
    source = config.stages[next(iter(config.stages))].model_dump().get("source", "")
    card_data = DatasetCardData(
        pretty_name=write_cfg.pretty_name or config.run.name,
        license=write_cfg.license or DEFAULT_LICENSE,
        task_categories=["image-text-to-text"],
        tags=TAGS,
        size_categories=[size_category(rows)],
        source_datasets=[f"extended|{_hub_dataset(source)}"] if _hub_dataset(source) else ["original"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in split_files],
            }
        ],
    )
    splits = SplitDict()
    for name, files in split_files.items():
        splits.add(SplitInfo(name=name, num_bytes=_data_bytes(files), num_examples=summary["splits"][name]))
    info = DatasetInfo(
        features=features,
        splits=splits,
        download_size=sum(f.stat().st_size for fs in split_files.values() for f in fs),
        dataset_size=sum(s.num_bytes for s in splits.values()),
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)

    load_line = (
        f'ds = load_dataset("{repo_id}", split="{next(iter(split_files))}"'
        + (f', revision="{revision}"' if revision else "")
        + ")"
        if repo_id
        else f'ds = load_dataset("parquet", data_files="data/{next(iter(split_files))}-*.parquet", split="train")'
    )
    score = config.stages.get("score")
    raw_reference = (schema.metadata or {}).get(b"mfpo.reference")
    card = DatasetCard.from_template(
        card_data,
        template_path=str(_TEMPLATE),
        title=write_cfg.pretty_name or config.run.name,
        sheet="mfpo/sheet.png" if "mfpo/sheet.png" in pictures else None,
        rows=rows,
        splits=[{"name": n, "rows": summary["splits"][n], "shards": len(fs)} for n, fs in split_files.items()],
        columns=[{"name": f.name, "type": _type_name(features[f.name])} for f in schema],
        source=_describe_source(config),
        stages=[{"name": n, "text": describe_stage(n, c.model_dump(mode="json"))} for n, c in config.stages.items()],
        stage_counts=stages,
        buckets=list(summary["buckets"].items()),
        key_objects=summary.get("key_objects"),
        quarantine=[
            {"stage": s["name"], "reason": reason, "count": count}
            for s in stages
            for reason, count in sorted(s["reasons"].items())
        ],
        plots=[{"title": PLOTS[p.rsplit("/", 1)[-1]], "path": p} for p in pictures if p.startswith("mfpo/plots/")],
        load_line=load_line,
        model_id=score.model.model if score is not None else "llava-hf/llava-1.5-7b-hf",
        repo_id=repo_id,
        reference=json.loads(raw_reference) if raw_reference else None,
    )
    return (str(card).rstrip() + "\n").encode("utf-8")


def _data_bytes(files: list[Path]) -> int:
    """Uncompressed size of the split's data, as `datasets` reports num_bytes."""
    total = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return total


def _type_name(feature: Any, depth: int = 0) -> str:
    """A short, readable type: `list of string`, `list of Image`, `struct {role, content}`."""
    from datasets import Image, List, Value

    if isinstance(feature, Image):
        return "Image"
    if isinstance(feature, Value):
        return feature.dtype
    if isinstance(feature, List):
        return "list of " + _type_name(feature.feature, depth + 1)
    if isinstance(feature, dict):
        if depth == 0:
            return "struct {" + ", ".join(f"{k}: {_type_name(v, depth + 1)}" for k, v in feature.items()) + "}"
        return "struct {" + ", ".join(feature) + "}"
    return type(feature).__name__


def _hub_dataset(source: str) -> str | None:
    """ORG/NAME of a Hub dataset source: its id, or an `hf://datasets/ORG/NAME[@rev]/...` URI."""
    if source.startswith("hf://datasets/"):
        parts = source.removeprefix("hf://datasets/").split("/")
        return "/".join(parts[:2]).split("@")[0] if len(parts) >= 2 else None
    if source.count("/") == 1 and "://" not in source and not Path(source).suffix and not Path(source).exists():
        return source
    return None


def _describe_source(config: Any) -> str:
    first = next(iter(config.stages))
    cfg = config.stages[first].model_dump(mode="json")
    source = cfg.get("source", "?")
    hub = _hub_dataset(source)
    shown = f"[`{source}`](https://huggingface.co/datasets/{hub})" if hub else f"`{Path(source).name}`"
    parts = [shown, f"format `{cfg.get('format', 'auto')}`", f"split `{cfg.get('split', 'train')}`"]
    if cfg.get("revision"):
        parts.append(f"revision `{cfg['revision']}`")
    if cfg.get("limit"):
        parts.append(f"first {cfg['limit']} rows" + (" after a seeded shuffle" if cfg.get("shuffle") else ""))
    return ", ".join(parts)


def _model(cfg: dict[str, Any]) -> str:
    if cfg.get("revision"):
        return f"`{cfg['model']}` (revision `{cfg['revision']}`)"
    return f"`{cfg['model']}` ({'a local checkpoint' if Path(cfg['model']).exists() else 'revision not pinned'})"


def describe_stage(name: str, cfg: dict[str, Any]) -> str:
    """One line on what a stage did, from its configuration (the built-in stages get their own words)."""
    if name == "ingest":
        limits = cfg["image"]
        return (
            f"decoded and validated every image (at most {limits['max_pixels']} pixels, {limits['max_bytes']} bytes, "
            f"sides of at least {limits['min_side']} px), EXIF orientation applied, converted to 8-bit RGB"
        )
    if name == "keywords":
        how = {
            "lexicon": "the bundled LVIS/COCO object lexicon, ranked with PageRank over co-mentioned objects",
            "spacy": f"noun chunks of the spaCy pipeline `{cfg['spacy_model']}`, ranked with PageRank",
            "llm": f"an LLM (`{cfg['llm']['model']}`, {cfg['llm']['provider']})",
        }[cfg["backend"]]
        text = {"question": "question", "chosen": "chosen answer", "both": "question and the chosen answer"}
        return f"key objects named in the {text[cfg['text']]}, found with {how}; top {cfg['top_k']} kept"
    if name == "ground":
        if cfg["backend"] == "annotations":
            ann = cfg["annotations"]
            return f"boxes from the source's own annotations (`{ann['field']}`, {ann['select']})"
        model = _model(cfg["model"]) if cfg["backend"] == "grounding-dino" else "the original GroundingDINO package"
        return (
            f"{cfg['backend']} {model}, box threshold {cfg['box_threshold']}, text threshold {cfg['text_threshold']}, "
            f"NMS IoU {cfg['nms_iou']}, at most {cfg['max_boxes']} boxes per image"
        )
    if name == "segment":
        how = {
            "sam": f"SAM {_model(cfg['model'])}, best of three masks per box"
            if cfg.get("multimask")
            else f"SAM {_model(cfg['model'])}",
            "segment-anything": f"segment-anything `{cfg['package']['model_type']}`",
            "sam2": f"sam2 `{cfg['package']['config']}`",
            "grabcut": f"OpenCV GrabCut initialised from each box ({cfg['grabcut']['iterations']} iterations)",
            "box": "the boxes themselves",
        }[cfg["backend"]]
        return f"a mask per box by {how}; their union is the key region"
    if name == "perturb":
        noise = cfg["noise"]
        if cfg["method"] == "inpaint":
            what = f"Stable Diffusion inpainting {_model(cfg['inpaint']['model'])}, {cfg['inpaint']['steps']} steps"
        else:
            what = (
                f"`{cfg['method']}`: forward-diffusion noise `m' = sqrt(abar_t) m + sqrt(1 - abar_t) eps` at "
                f"t = {noise['timestep']} of {noise['num_train_timesteps']} ({noise['beta_schedule']} betas "
                f"{noise['beta_start']}..{noise['beta_end']}, pixels in "
                f"{'[0, 1]' if noise['scale'] == 'unit' else '[-1, 1]'}), "
                "seeded per row"
            )
        extra = []
        if cfg.get("dilate_px"):
            extra.append(f"region grown by {cfg['dilate_px']} px")
        if cfg.get("feather_px"):
            extra.append(f"feathered (sigma {cfg['feather_px']} px)")
        return f"the dispreferred image m' by {what}; rows without a key region: `{cfg['fallback']}`" + (
            f" ({', '.join(extra)})" if extra else ""
        )
    if name == "score":
        return (
            f"reference model {_model(cfg['model'])}: difficulty = {cfg['difficulty']} ({cfg['aggregate']} over the "
            "chosen answer's tokens) and the reference log-probs of chosen / rejected / chosen-on-m'"
        )
    if name == "bucket":
        shares = ", ".join(map(str, cfg.get("fractions") or ["equal"]))
        return f"curriculum buckets {', '.join(cfg['names'])} by rank of difficulty (shares: {shares})"
    if name == "write":
        return "every column joined into Parquet shards with Hugging Face feature metadata (images as `Image`)"
    shown = {k: v for k, v in cfg.items() if k != "resources"}
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items()) or "default configuration"
