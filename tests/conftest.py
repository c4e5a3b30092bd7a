"""Fixtures several test modules share."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import (
    CHECKPOINTED,
    SAMPLE_JSONL,
    TRAIN,
    cli,
    publishable_source,
    publishable_stages,
    scored_stages,
    write_config,
)
from tiny_models import save_tiny_llava


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The bundled sample scored by a tiny LLaVA and trained through easy, medium and hard (CLI):
    (pipeline output folder, training folder). The config is `<output folder>/../cfg.yaml`."""
    root = tmp_path_factory.mktemp("train")
    llava = save_tiny_llava(root / "tiny-llava")
    stages = scored_stages(llava)
    cfg = write_config(root / "cfg.yaml", SAMPLE_JSONL, root / "out", stages=stages, shard_size=4)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"] = {**TRAIN, "model": {"model": str(llava)}}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    cli("run", str(cfg), check=True)
    cli("train", str(cfg), check=True)
    return root / "out", root / "out" / "train"


@pytest.fixture(scope="session")
def checkpointed(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted training of `trained`'s dataset with CHECKPOINTED settings: its output folder."""
    out = tmp_path_factory.mktemp("checkpointed") / "train"
    cli("train", str(trained[0].parent / "cfg.yaml"), "--set", f"train.output_dir={out}", *CHECKPOINTED, check=True)
    return out


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished weight-free dataset (boxes, masks, m') with one row quarantined at ingest and one at perturb:
    (config path, pipeline output folder)."""
    root = tmp_path_factory.mktemp("published")
    source = publishable_source(root / "src")
    config = write_config(root / "cfg.yaml", source, root / "out", stages=publishable_stages(source), shard_size=3)
    cli("run", str(config), check=True)
    return config, root / "out"
