"""Deprecated: the vision-language model helpers moved to `mfpo.vlm`. This module re-exports them, with a
DeprecationWarning, for stages written against the old path; it will be removed in a later release."""

from __future__ import annotations

import warnings

from mfpo.vlm import (
    ANSWER_CHUNK,
    REFERENCE_FIELDS,
    REFERENCE_KEY,
    Example,
    answer_logps,
    answer_scores,
    answer_spans,
    build_example,
    build_prompt,
    collate,
    load_vlm,
    prompt_messages,
    reference_mismatch,
    reference_record,
    weights_identity,
    with_answer,
)

warnings.warn(
    "stages.vlm moved to mfpo.vlm: import from mfpo.vlm (stages.vlm will be removed in a later release)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ANSWER_CHUNK",
    "REFERENCE_FIELDS",
    "REFERENCE_KEY",
    "Example",
    "answer_logps",
    "answer_scores",
    "answer_spans",
    "build_example",
    "build_prompt",
    "collate",
    "load_vlm",
    "prompt_messages",
    "reference_mismatch",
    "reference_record",
    "weights_identity",
    "with_answer",
]
