"""How MFPO loads a model: a Hub id or local directory for `from_pretrained`, its revision, precision and
whether to trust shipped code; the dtype a precision means on a device; one-line errors while loading."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from pipeline.errors import PipelineError, first_line
from pipeline.strict import StrictModel

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
