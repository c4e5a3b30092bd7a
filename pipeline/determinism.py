"""Per-row randomness derived from (seed, sample_id, stage), never from worker order or time."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def stable_hash(*parts: Any, length: int = 64) -> str:
    """Hex sha256 of the canonical JSON of `parts` (sorted keys), truncated to `length` hex digits."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def row_seed(seed: int, sample_id: str, stage: str) -> int:
    """A 64-bit seed that depends only on the run seed, the row and the stage."""
    return int(stable_hash(seed, sample_id, stage, length=16), 16)


def row_rng(seed: int, sample_id: str, stage: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(row_seed(seed, sample_id, stage)))
