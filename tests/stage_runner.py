"""Run one stage in-process on an Arrow table, the way a worker does (build, setup once, process)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.registry import get_stage
from pipeline.stage import BatchResult, Stage, StageContext


def build_stage(name: str, config: dict[str, Any], seed: int = 0) -> Stage:
    cls = get_stage(name)
    stage = cls(cls.Config.model_validate(config), StageContext(stage=name, seed=seed, run_name="t"))
    stage.setup()
    return stage


def run_stage(name: str, config: dict[str, Any], table: pa.Table, seed: int = 0) -> BatchResult:
    return build_stage(name, config, seed).process_batch(table)
