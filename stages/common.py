"""Helpers the stages share: column types, masks (COCO RLE), boxes, devices, model loading and text as data."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.errors import PipelineError, first_line
from pipeline.stage import NO_GPU_REPORTED, Resources, StrictModel

log = logging.getLogger("mfpo")

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])  # COCO RLE
BOXES_TYPE = pa.list_(pa.list_(pa.float64()))  # [[x0, y0, x1, y1], ...] in pixels
FLOATS_TYPE = pa.list_(pa.float64())
STRINGS_TYPE = pa.list_(pa.string())


# ------------------------------------------------------------------------------------------- masks
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


def meta_field(row: dict[str, Any], key: str) -> Any:
    """A field of the source row kept in `meta` by ingest."""
    try:
        return json.loads(row.get("meta") or "{}").get(key)
    except json.JSONDecodeError:
        return None


# ------------------------------------------------------------------------------------------- models
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ModelConfig(StrictModel):
    """How a stage loads a model: any Hub id or local directory `from_pretrained` accepts."""

    model: str = Field(description="Hub id or local path of the checkpoint.")
    revision: str | None = Field(None, description="Hub branch, tag or commit (pin it for reproducibility).")
    precision: Precision = Field("auto", description="auto: bf16 on CUDA (fp16 if unsupported), fp32 on CPU.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint (off by default).")

    def missing_local(self, key: str) -> list[str]:
        """Before any worker starts: a model given as a local directory that does not exist. A Hub id has one
        slash (org/name); a value starting with . / ~ or with more path parts is a local directory."""
        return missing_model_dir(self.model, key)

    def pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs


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


def select_dtype(device: Any, precision: Precision) -> Any:
    import torch

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def missing_model_dir(model: str, key: str) -> list[str]:
    """A local model directory that does not exist, or (with HF_HUB_OFFLINE=1) a Hub id not in the cache."""
    from pathlib import Path

    looks_local = model.startswith((".", "/", "~")) or model.count("/") >= 2 or Path(model).exists()
    path = Path(model).expanduser()
    if not looks_local:
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "config.json"), str):
            return [f"{key}: {model} is not in the local Hub cache and HF_HUB_OFFLINE=1 forbids downloading it"]
        return []
    if path.is_dir():
        return []
    hint = " (the offline recipe's models are built by `make demo`)" if "outputs/models" in model else ""
    return [f"{key}: model directory {path} does not exist{hint}"]


@contextlib.contextmanager
def loading(model: str, key: str) -> Iterator[None]:
    """Errors while loading a model name the model and its config key, in one line (a worker's setup() error
    otherwise reaches the user as the last of a chain of HTTP errors). The loaders' own progress bars
    (transformers' "Loading weights", diffusers' "Loading pipeline components") are off meanwhile: every
    worker's would reach the terminal, torn, between the run's progress lines; downloads keep theirs
    (huggingface_hub's)."""
    import sys

    from transformers.utils import logging as transformers_logging

    loaders = [transformers_logging]
    if "diffusers" in sys.modules:  # the stage loading a diffusers pipeline imported it; not worth seconds here
        loaders.append(sys.modules["diffusers"].utils.logging)
    bars = [lib.is_progress_bar_enabled() for lib in loaders]
    for lib in loaders:
        lib.disable_progress_bar()
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        detail = f"{type(err).__name__}: {first_line(str(err))}".rstrip(": ")
        raise PipelineError(f"{key}: cannot load {model!r}: {detail}") from err
    finally:
        for lib, on in zip(loaders, bars, strict=True):
            if on:
                lib.enable_progress_bar()


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


# ------------------------------------------------------------------------------------------- text as data
class UnencodableText(ValueError):
    """A text that cannot be given to a model as text (the stage quarantines its row)."""


# Where data text goes while a chat template is rendered, when the text holds a special token's string:
# private-use characters, which no template or tokenizer gives a meaning.
TEXT_SLOT = "\ue000text\ue001"


def special_strings(tokenizer: Any, processor: Any = None) -> tuple[str, ...]:
    """The strings the tokenizer (or the processor: `<image>`, `<|image_pad|>`, ...) reads as special tokens.
    In data (a question, an answer) they are text, tokenised as the characters they are."""
    owner = processor if processor is not None else tokenizer
    cached = getattr(owner, "_mfpo_special_strings", None)
    if cached is None:
        found = set(tokenizer.all_special_tokens)
        found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        for attr in ("image_token", "video_token", "audio_token", "boi_token", "eoi_token", "fake_image_token"):
            value = getattr(processor, attr, None)
            if isinstance(value, str):
                found.add(value)
        cached = tuple(sorted((s for s in found if s), key=len, reverse=True))
        owner._mfpo_special_strings = cached
    return cached


def text_ids(tokenizer: Any, text: str, what: str) -> list[int]:
    """Token ids of `text` as plain text: a special token's string is split into ordinary tokens."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    if any(i in special for i in ids):  # a tokenizer that cannot split them: never pass one through as markup
        raise UnencodableText(f"{what}: the tokenizer reads part of it as a special token")
    return ids


def around_slot(rendered: str, what: str) -> tuple[str, str]:
    """The rendered chat template before and after the one place where the data text (TEXT_SLOT) goes."""
    before, found, after = rendered.partition(TEXT_SLOT)
    if not found or TEXT_SLOT in after:
        raise UnencodableText(f"{what}: the chat template does not place the {what} as given")
    return before, after
