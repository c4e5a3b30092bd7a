"""Test helpers around the project's dataset contract (mfpo.publish.contract): every row, fully checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mfpo.publish.contract import check_dataset, image_rgb, shard_files

_rgb = image_rgb


def check(output_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, problems) of the dataset under output_dir/dataset, every row pixel-checked."""
    dataset = Path(output_dir) / "dataset"
    rows = [r for f in shard_files(dataset) for r in pq.read_table(f).to_pylist()]
    return rows, check_dataset(dataset).problems
