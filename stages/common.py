"""What the stages share: the column types of the data contract, a source field kept in `meta`, the device a
stage computes on, optional packages named with their install line. The method's own pieces (masks, model
loading, text as data) live in `mfpo`; they are re-exported here for stages written against this module."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pyarrow as pa

from mfpo.masks import box_mask, clip_box, decode_mask, encode_mask
from mfpo.models import ModelConfig, Precision, loading, missing_model_dir, select_dtype
from mfpo.text import TEXT_SLOT, UnencodableText, around_slot, special_strings, text_ids
from pipeline.errors import PipelineError
from pipeline.stage import NO_GPU_REPORTED, Resources

__all__ = [  # the re-exported method names, then this module's own
    "BOXES_TYPE",
    "FLOATS_TYPE",
    "MASK_TYPE",
    "STRINGS_TYPE",
    "TEXT_SLOT",
    "ModelConfig",
    "Precision",
    "UnencodableText",
    "around_slot",
    "box_mask",
    "clip_box",
    "decode_mask",
    "encode_mask",
    "loading",
    "meta_field",
    "missing_model_dir",
    "missing_package",
    "require",
    "select_device",
    "select_dtype",
    "special_strings",
    "text_ids",
]

log = logging.getLogger("mfpo")

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])  # COCO RLE
BOXES_TYPE = pa.list_(pa.list_(pa.float64()))  # [[x0, y0, x1, y1], ...] in pixels
FLOATS_TYPE = pa.list_(pa.float64())
STRINGS_TYPE = pa.list_(pa.string())


def meta_field(row: dict[str, Any], key: str) -> Any:
    """A field of the source row kept in `meta` by ingest."""
    try:
        return json.loads(row.get("meta") or "{}").get(key)
    except json.JSONDecodeError:
        return None


_CPU_FALLBACK_SAID: set[str] = set()


def select_device(resources: Resources, stage: str) -> Any:
    """CUDA when the stage asked for a GPU and one is visible; otherwise CPU, with a warning if a GPU was asked
    for. Either way torch computes on as many threads as the stage has CPUs (`resources.cpus`, at least one), as
    a Ray actor with those CPUs does (Ray sets OMP_NUM_THREADS so): a reduction summed in the same order on
    either executor gives the same bytes; torch's default (every core) would move a score across the rounding."""
    import torch

    torch.set_num_threads(max(1, int(resources.cpus)))
    if resources.gpus > 0:
        if torch.cuda.is_available():
            return torch.device("cuda")
        # One line per stage and process, and none from a Ray worker whose driver already said it for the run.
        if stage not in _CPU_FALLBACK_SAID and not os.environ.get(NO_GPU_REPORTED):
            _CPU_FALLBACK_SAID.add(stage)
            log.warning(
                "stage %s: resources.gpus=%g but no CUDA device is visible; running on CPU", stage, resources.gpus
            )
    return torch.device("cpu")


def missing_package(module: str, install: str) -> list[str]:
    """Before any worker starts: an optional dependency that is not installed, with the exact install line."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return [] if found else [f"this backend needs `{module}`: pip install {install}"]


def require(module: str, install: str) -> Any:
    """Import an optional dependency or fail with the exact install line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PipelineError(f"this backend needs `{module}`: pip install {install}") from err
