"""ground: boxes for each sample's key phrases.

Backends:
- `grounding-dino` (default): transformers' Grounding DINO (`IDEA-Research/grounding-dino-tiny` or
  `-base`, or any local copy), batched over images; the phrases of a row are joined the way the model
  was trained ("cat . red umbrella ."), boxes come back in original pixel coordinates with their score
  and matched phrase. `box_threshold` / `text_threshold` as in the original release.
- `annotations`: boxes that came with the dataset (ingest keeps source fields in `meta`), e.g.
  `{"annotations": [{"label": "cat", "box": [x0, y0, x1, y1]}]}`; kept when their label names one of the
  key phrases (`select: key_phrases`) or all of them (`select: all`).

Rows where nothing is found get empty lists; the `perturb` stage's `fallback` decides what happens.
- `groundingdino-py`: the original GroundingDINO package. It needs transformers < 5, so it runs in an
  environment of its own (`make groundingdino-env`), as a worker process this stage talks to over a
  pipe (`stages/groundingdino_worker.py`); the checkpoint is loaded with `weights_only=True`.
"""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from mfpo.masks import clip_box
from mfpo.models import ModelConfig, loading, select_dtype
from pipeline.errors import PipelineError, RowError
from pipeline.images import decode_rgb
from pipeline.registry import register
from pipeline.stage import BatchResult, Rejection, Stage, StageConfig
from pipeline.strict import StrictModel
from stages.common import BOXES_TYPE, FLOATS_TYPE, STRINGS_TYPE, meta_field, select_device
from stages.keywords import LEXICON_PATH, head_object, load_lexicon


class AnnotationsConfig(StrictModel):
    field: str = Field("annotations", description="Source field (in meta) holding the list of annotations.")
    label_key: str = "label"
    box_key: str = "box"
    box_format: Literal["xyxy", "xywh"] = Field("xyxy", description="xyxy: [x0,y0,x1,y1]; xywh: COCO style.")
    select: Literal["key_phrases", "all"] = Field("key_phrases", description="Which annotations to keep.")


class GroundingDinoPyConfig(StrictModel):
    python: str = Field(".venv-groundingdino/bin/python", description="Interpreter of the groundingdino-py env.")
    config_file: str = Field(
        "GroundingDINO_SwinT_OGC.py", description="Model config: a path, or a file name in the package's config folder."
    )
    checkpoint: str | None = Field(None, description="Local checkpoint (.pth or .safetensors).")
    text_encoder_type: str = Field("bert-base-uncased", description="BERT id, or a local directory offline.")


class GroundConfig(StageConfig):
    backend: Literal["grounding-dino", "groundingdino-py", "annotations"] = "grounding-dino"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(model="IDEA-Research/grounding-dino-tiny"))
    box_threshold: float = Field(0.35, ge=0, le=1, description="Minimum box confidence.")
    text_threshold: float = Field(0.25, ge=0, le=1, description="Minimum phrase-token confidence.")
    max_boxes: int = Field(5, ge=1, description="Keep at most this many boxes per image (highest scores).")
    nms_iou: float | None = Field(0.7, gt=0, le=1, description="Drop boxes overlapping a better one this much.")
    annotations: AnnotationsConfig = Field(default_factory=AnnotationsConfig)
    groundingdino_py: GroundingDinoPyConfig = Field(default_factory=GroundingDinoPyConfig)

    @model_validator(mode="after")
    def _checkpoint_for_package(self) -> GroundConfig:
        if self.backend == "groundingdino-py" and not self.groundingdino_py.checkpoint:
            raise ValueError("backend groundingdino-py needs groundingdino_py.checkpoint (a local file)")
        return self


@register
class Ground(Stage):
    name: ClassVar[str] = "ground"
    Config = GroundConfig
    version: ClassVar[int] = 3  # 3: unboxed_phrases
    inputs: ClassVar[tuple[str, ...]] = ("image", "meta", "key_phrases")
    outputs: ClassVar[tuple[str, ...]] = ("boxes", "box_scores", "box_phrases", "unboxed_phrases")
    config: GroundConfig

    def setup(self) -> None:
        cfg = self.config
        self.lexicon = load_lexicon(str(LEXICON_PATH), (), ())
        if cfg.backend == "grounding-dino":
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

            self.device = select_device(self.resources, self.name)
            self.dtype = select_dtype(self.device, cfg.model.precision)
            kwargs = cfg.model.pretrained_kwargs()
            with loading(cfg.model.model, "stages.ground.model.model"):
                self.processor = AutoProcessor.from_pretrained(cfg.model.model, **kwargs)
                self.model = AutoModelForZeroShotObjectDetection.from_pretrained(
                    cfg.model.model, dtype=self.dtype, **kwargs
                ).to(self.device)
            self.model.eval()
        elif cfg.backend == "groundingdino-py":
            self.device = select_device(self.resources, self.name)
            self.worker = _PackageWorker(cfg.groundingdino_py, self.device.type)

    @property
    def loads_model(self) -> bool:
        return self.config.backend != "annotations"

    def check(self) -> list[str]:
        cfg = self.config
        if cfg.backend == "grounding-dino":
            return cfg.model.missing_local("stages.ground.model.model")
        if cfg.backend == "groundingdino-py":
            problems = []
            if not Path(cfg.groundingdino_py.python).exists():
                problems.append(
                    f"stages.ground.groundingdino_py.python: {cfg.groundingdino_py.python} not found; create the "
                    "environment with `make groundingdino-env`"
                )
            checkpoint = cfg.groundingdino_py.checkpoint
            if checkpoint and not Path(checkpoint).is_file():
                problems.append(f"stages.ground.groundingdino_py.checkpoint: {checkpoint} not found")
            return problems
        return []

    def teardown(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
            self.worker = None

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return pa.schema(
            [
                ("sample_id", pa.string()),
                ("boxes", BOXES_TYPE),
                ("box_scores", FLOATS_TYPE),
                ("box_phrases", STRINGS_TYPE),
                ("unboxed_phrases", STRINGS_TYPE),  # key phrases that got no box
            ]
        )

    def process_batch(self, table: pa.Table) -> BatchResult:
        rows = table.to_pylist()
        if self.config.backend in ("annotations", "groundingdino-py"):
            one = self._from_annotations if self.config.backend == "annotations" else self._from_package
            results: list[list[tuple[list[float], float, str]] | RowError] = []
            for row in rows:
                try:
                    results.append(one(row))
                except RowError as err:
                    results.append(err)
        else:
            results = list(self._detect(rows))
        kept, rejected = [], []
        for row, found in zip(rows, results, strict=True):
            if isinstance(found, RowError):
                rejected.append(Rejection(row["sample_id"], found.reason, {"meta": row["meta"]}))
                continue
            found = self._postprocess(found)
            kept.append(
                {
                    "sample_id": row["sample_id"],
                    "boxes": [b for b, _, _ in found],
                    "box_scores": [s for _, s, _ in found],
                    "box_phrases": [p for _, _, p in found],
                    "unboxed_phrases": [p for p in row["key_phrases"] or [] if p not in {q for _, _, q in found}],
                }
            )
        return BatchResult(pa.Table.from_pylist(kept, schema=self.output_schema(table.schema)), rejected)

    # ------------------------------------------------------------------ backends
    def _detect(self, rows: list[dict[str, Any]]) -> list[list[tuple[list[float], float, str]]]:
        import torch

        out: list[list[tuple[list[float], float, str]]] = [[] for _ in rows]
        todo = [i for i, r in enumerate(rows) if r["key_phrases"]]
        if not todo:
            return out
        images = [decode_rgb(rows[i]["image"]) for i in todo]
        # Grounding DINO was trained on lower-case phrases separated by " . " and ending with " .".
        texts = [" . ".join(p.lower() for p in rows[i]["key_phrases"]) + " ." for i in todo]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        detections = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.config.box_threshold,
            text_threshold=self.config.text_threshold,
            target_sizes=[img.shape[:2] for img in images],
        )
        for i, img, det in zip(todo, images, detections, strict=True):
            h, w = img.shape[:2]
            if len(det["boxes"]) == 0:
                continue  # (the processor may still return a label list for an empty result)
            labels = det["text_labels"]
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), labels, strict=True):
                clipped = clip_box(box, h, w)
                if clipped is not None:
                    out[i].append((clipped, float(score), self._phrase_for(str(label), rows[i]["key_phrases"])))
        return out

    def _from_package(self, row: dict[str, Any]) -> list[tuple[list[float], float, str]]:
        if not row["key_phrases"]:
            return []
        h, w = decode_rgb(row["image"]).shape[:2]
        caption = " . ".join(p.lower() for p in row["key_phrases"]) + " ."
        reply = self.worker.ask(
            {
                "image": base64.b64encode(row["image"]["bytes"]).decode("ascii"),
                "caption": caption,
                "box_threshold": self.config.box_threshold,
                "text_threshold": self.config.text_threshold,
            }
        )
        if "error" in reply:
            raise RowError(f"ground: groundingdino-py failed on this image ({reply['error'][:200]})")
        found = []
        for box, score, label in zip(reply["boxes"], reply["scores"], reply["phrases"], strict=True):
            clipped = clip_box(box, h, w)
            if clipped is not None:
                found.append((clipped, float(score), self._phrase_for(str(label), row["key_phrases"])))
        return found

    def _from_annotations(self, row: dict[str, Any]) -> list[tuple[list[float], float, str]]:
        """The shipped boxes. Every entry must be a well-formed box on the image: shipped data that breaks
        that (wrong types, NaN, reversed or empty boxes, boxes off the image) quarantines the row rather than
        being clipped, sorted or dropped into something the data never said. Boxes partly off the image are
        clipped to it."""
        cfg = self.config.annotations
        anns = meta_field(row, cfg.field)
        if anns is None:
            return []
        if not isinstance(anns, list):
            raise RowError(f"annotations: meta field {cfg.field!r} must be a list, got {type(anns).__name__}")
        h, w = decode_rgb(row["image"]).shape[:2]
        wanted = {self._canonical(p): p for p in row["key_phrases"] or []}
        found = []
        for ann in anns:
            if not isinstance(ann, dict) or ann.get(cfg.box_key) is None:
                raise RowError(f"annotations: each entry needs a {cfg.box_key!r}")
            box = _annotation_box(ann[cfg.box_key], cfg.box_format, h, w)
            score = ann.get("score", 1.0)
            if not _is_number(score) or not math.isfinite(_as_float(score)):
                raise RowError(f"annotations: score {_shown(score)} must be a finite number")
            label = ann.get(cfg.label_key, "")
            if not isinstance(label, str | int) or isinstance(label, bool):
                raise RowError(f"annotations: label must be text, got {type(label).__name__}")
            label = str(label)
            phrase = wanted.get(self._canonical(label))
            if cfg.select == "key_phrases" and phrase is None:
                continue
            found.append((box, float(score), phrase or label))
        return found

    # ------------------------------------------------------------------ helpers
    def _canonical(self, text: str) -> str:
        """One name per object ("kitties" and "cat" -> "cat", "coffee cup" -> "cup"), via the lexicon."""
        return head_object(text, self.lexicon)

    def _phrase_for(self, label: str, phrases: list[str]) -> str:
        """The key phrase a detector label belongs to. Labels are token spans of the prompt, which may run over
        several of its " . "-separated phrases and its special tokens ("espresso coffee. crema. [SEP]"): the
        first of those parts that names a key phrase decides."""
        parts = [x.strip() for x in re.sub(r"\[(?:SEP|CLS|PAD)\]", " ", label).split(".") if x.strip()]
        for part in parts or [label.strip()]:
            canonical = self._canonical(part)
            for p in phrases:
                if self._canonical(p) == canonical or part in p:
                    return p
        return label.strip()

    def _postprocess(self, found: list[tuple[list[float], float, str]]) -> list[tuple[list[float], float, str]]:
        """Best-first, overlapping duplicates removed (class-agnostic NMS), at most max_boxes."""
        found = sorted(found, key=lambda f: -f[1])
        if self.config.nms_iou is not None and len(found) > 1:
            import torch
            from torchvision.ops import nms

            keep = nms(
                torch.tensor([f[0] for f in found], dtype=torch.float64),
                torch.tensor([f[1] for f in found], dtype=torch.float64),
                self.config.nms_iou,
            )
            found = [found[i] for i in sorted(keep.tolist())]
        return [([round(v, 2) for v in b], round(s, 6), p) for b, s, p in found[: self.config.max_boxes]]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond float range
        return math.inf


def _shown(value: Any) -> str:
    text = json.dumps(value, allow_nan=True, default=str)
    return text if len(text) <= 80 else text[:80] + "..."


def _annotation_box(value: Any, box_format: str, height: int, width: int) -> list[float]:
    """A shipped box as [x0, y0, x1, y1] pixels inside the image, or RowError('annotations: ...')."""
    if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise RowError(f"annotations: box {_shown(value)} must be a list of 4 numbers")
    x0, y0, a, b = (_as_float(v) for v in value)
    if not all(math.isfinite(v) for v in (x0, y0, a, b)):
        raise RowError(f"annotations: box {_shown(value)} has a NaN, infinite or out-of-range coordinate")
    x1, y1 = (x0 + a, y0 + b) if box_format == "xywh" else (a, b)
    if x1 < x0 or y1 < y0:
        raise RowError(f"annotations: box {_shown(value)} is reversed (x1 < x0 or y1 < y0; box_format {box_format})")
    if x1 == x0 or y1 == y0:
        raise RowError(f"annotations: box {_shown(value)} has zero area")
    clipped = clip_box([x0, y0, x1, y1], height, width)
    if clipped is None:
        raise RowError(f"annotations: box {_shown(value)} lies outside the {width}x{height} image")
    return clipped


class _PackageWorker:
    """The groundingdino-py worker process (its own environment), spoken to in JSON lines."""

    def __init__(self, cfg: GroundingDinoPyConfig, device: str) -> None:
        python = Path(cfg.python)
        if not python.exists():
            raise PipelineError(
                f"stages.ground.groundingdino_py.python: {cfg.python} not found; create the environment with "
                "`make groundingdino-env` (groundingdino-py needs transformers < 5, so it lives apart)"
            )
        script = Path(__file__).with_name("groundingdino_worker.py")
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - open for the worker's whole life
        self.proc = subprocess.Popen(
            [
                str(python),
                str(script),
                "--config",
                cfg.config_file,
                "--checkpoint",
                str(cfg.checkpoint),
                "--text-encoder",
                cfg.text_encoder_type,
                "--device",
                device,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        first = self._read()
        if "ready" not in first:
            raise PipelineError(f"groundingdino-py worker did not start: {first.get('error', 'no reply')}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-400:].strip().replace("\n", " | ")
            return {"error": f"worker exited ({tail})"}
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if reply.get("error", "").startswith("worker exited"):
            raise PipelineError(f"groundingdino-py {reply['error']}")
        return reply

    def close(self) -> None:
        """End the worker: closing its stdin ends its read loop; a worker that does not exit is killed."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
