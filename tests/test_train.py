"""MFPO training on a tiny random-weight LLaVA: the curriculum runs its buckets in order on the right rows,
every trainable parameter changes, and the adapter, processor and model card are saved."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import SAMPLE_JSONL, cli, write_config
from safetensors.torch import load_file
from tiny_models import save_tiny_llava

TRAIN = {
    "finetune": "lora",
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},  # vision tower too
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "per_device_train_batch_size": 3,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_steps": 1000,
    "curriculum": {"epochs_per_stage": 1},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    llava = save_tiny_llava(root / "tiny-llava")
    stages = {
        "ingest": {"source": str(SAMPLE_JSONL), "limit": 9},
        "keywords": {},
        "ground": {"backend": "annotations", "annotations": {"select": "all"}},
        "segment": {"backend": "box"},
        "perturb": {},
        "score": {"model": {"model": str(llava)}},
        "bucket": {},
        "write": {},
    }
    cfg = write_config(root / "cfg.yaml", SAMPLE_JSONL, root / "out", stages=stages, shard_size=4)
    raw = cfg.read_text() + json.dumps({"train": {**TRAIN, "model": {"model": str(llava)}}})[1:-1].join(["\n", "\n"])
    cfg.write_text(raw.replace('"train": ', "train: "))
    cli("run", str(cfg), check=True)
    proc = cli("train", str(cfg), check=True)
    return root / "out", Path(proc.stdout and root / "out" / "train")


def test_curriculum_runs_buckets_in_order_on_their_rows(run):
    out, train = run
    rows = [
        r
        for f in sorted((out / "dataset" / "data").glob("*.parquet"))
        for r in pq.read_table(f, columns=["sample_id", "bucket"]).to_pylist()
    ]
    stages = sorted(train.glob("stage-*"))
    assert [p.name for p in stages] == ["stage-0-easy", "stage-1-medium", "stage-2-hard"]
    for p in stages:
        record = json.loads((p / "stage.json").read_text())
        assert sorted(record["sample_ids"]) == sorted(r["sample_id"] for r in rows if r["bucket"] == record["bucket"])
        assert record["steps"] == 1 and record["last_metrics"]["loss/image"] > 0


def test_every_trainable_parameter_changes(run):
    _, train = run
    first = load_file(str(train / "stage-0-easy" / "final" / "adapter_model.safetensors"))
    last = load_file(str(train / "final" / "adapter_model.safetensors"))
    # q and v projections of the 2 language-model and 2 vision layers, A and B each
    assert first.keys() == last.keys() and len(first) == 16
    unchanged = [k for k in first if (first[k] - last[k]).abs().max() == 0]
    assert unchanged == []
    assert all(first[k].abs().max() > 0 for k in first if "lora_B" in k)  # B starts at zero: stage 0 moved it


def test_model_card_and_processor_saved(run):
    _, train = run
    card = (train / "final" / "README.md").read_text()
    assert "base_model:" in card and "| 2 | hard | 3 | 1 |" in card
    assert (train / "final" / "processor_config.json").exists() or (train / "final" / "tokenizer.json").exists()
