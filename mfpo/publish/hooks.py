"""Run hooks: what the end of `python -m pipeline run` makes besides the stages' shards."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.registry import run_hook

log = logging.getLogger("mfpo")


@run_hook("dataset card")
def dataset_card(config: Any, output_dir: Path, statuses: list[Any]) -> None:
    """`dataset/README.md` and `dataset/mfpo/` once the write stage is done (and `write.card` is on)."""
    write = config.stages.get("write")
    done = {s.name: s.state for s in statuses}
    if write is None or not write.card or done.get("write") != "done":
        return
    from mfpo.publish.card import dataset_files, write_dataset_files

    push = config.push
    files = dataset_files(
        output_dir,
        config,
        [asdict(s) for s in statuses],
        repo_id=push.repo_id if push is not None else None,
        revision=push.revision if push is not None else None,
    )
    write_dataset_files(output_dir, files)
    log.info(
        "dataset card: %s (and %d picture(s))",
        Path(output_dir) / "dataset" / "README.md",
        sum(p.endswith(".png") for p in files),
    )
