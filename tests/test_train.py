"""MFPO training on a tiny random-weight LLaVA: the curriculum runs its buckets in order on the right rows,
every trainable parameter changes, and the adapter, processor and model card are saved."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import CROSS_PROCESS_ATOL, TRAIN, cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


@pytest.fixture(scope="module")
def run(trained: tuple[Path, Path]) -> tuple[Path, Path]:
    return trained


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
    from huggingface_hub import ModelCard

    card = ModelCard.load(train / "final" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] and "mfpo" in meta["tags"]
    assert "| 2 | hard | 3 | 1 |" in card.text
    assert (train / "final" / "processor_config.json").exists() or (train / "final" / "tokenizer.json").exists()


def test_image_preference_is_learned(run, tmp_path: Path):
    """On a toy set, a few dozen MFPO steps make the policy prefer the clean image for y_w on > 90% of rows,
    measured after training by an independent forward pass (not the training-time metric)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mfpo.train.command import train_folder
    from mfpo.train.config import TrainConfig
    from mfpo.vlm import answer_logps, answer_spans, build_example, collate
    from pipeline.images import decode_rgb

    out, _ = run
    base = str(out.parent / "tiny-llava")
    cfg = TrainConfig.model_validate(
        {
            **TRAIN,
            "model": {"model": base},
            "learning_rate": 5e-3,
            "loss": {"w_text": 0.0, "w_margin": 0.0},
            "curriculum": {"all_at_once": True, "epochs_per_stage": 12},
        }
    )
    summary = train_folder(cfg, out / "dataset", tmp_path / "train", seed=0)
    assert summary["stages"][0]["steps"] == 36  # 9 rows / 3 per step x 12 epochs: bounded

    processor = AutoProcessor.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), tmp_path / "train" / "final")
    model.eval()
    rows = [r for f in sorted((out / "dataset" / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    wins = 0
    for r in rows:
        examples = [
            build_example(processor, decode_rgb(img), r["question"], r["chosen_text"])
            for img in (r["images"][0], r["rejected_image"])
        ]
        batch = collate(examples, processor.tokenizer.pad_token_id, "cpu", torch.float32)
        with torch.no_grad():
            clean, noised = answer_logps(model(**batch).logits, batch["input_ids"], answer_spans(examples))[0].tolist()
        wins += (clean - r["ref_logp_chosen"]) > (noised - r["ref_logp_chosen_noised"])
    assert wins / len(rows) > 0.9, f"image preference accuracy {wins}/{len(rows)}"


def test_resume_from_a_mid_run_checkpoint_gives_the_same_weights(run, tmp_path: Path):
    """Kill training right after a checkpoint in the middle of the second stage, resume with --resume: the
    final adapter equals that of an uninterrupted run with the same seed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from helpers import REPO

    out, _ = run
    cfg = out.parent / "cfg.yaml"
    common = ["--set", "train.save_steps=1", "--set", "train.curriculum.epochs_per_stage=2"]
    cli("train", str(cfg), "--set", f"train.output_dir={tmp_path / 'straight'}", *common, check=True)

    target = tmp_path / "resumed"
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", str(cfg), "--set", f"train.output_dir={target}", *common],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((target / "stage-1-medium").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (target / "stage-1-medium" / "stage.json").exists()  # killed inside stage 1
    cli("train", str(cfg), "--resume", "--set", f"train.output_dir={target}", *common, check=True)

    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(target / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=CROSS_PROCESS_ATOL)


def test_the_same_trainer_runs_qwen2_vl(run, tmp_path: Path):
    """Qwen2-VL (dynamic patches, M-RoPE, per-token extras) trains through the same collator and Trainer, with
    the default adapters landing on its language model."""
    from tiny_models import save_tiny_qwen2_vl

    from mfpo.train.command import train_folder
    from mfpo.train.config import TrainConfig

    out, _ = run
    qwen = save_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    cfg = TrainConfig.model_validate(
        {
            **TRAIN,
            "model": {"model": str(qwen)},
            "reference_check": "warn",  # the dataset was scored by the tiny LLaVA: this exercises Qwen2-VL's path
            "lora": {"r": 4, "alpha": 8},
            "curriculum": {"all_at_once": True, "epochs_per_stage": 1},
        }
    )
    summary = train_folder(cfg, out / "dataset", tmp_path / "train", seed=0)
    assert summary["stages"][0]["steps"] == 3
    adapter = load_file(str(tmp_path / "train" / "final" / "adapter_model.safetensors"))
    assert adapter and all("language_model" in k for k in adapter)
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained from zero


def test_full_finetune_with_gradient_checkpointing(run, tmp_path: Path):
    """finetune: full — every trainable tensor (all but the frozen vision tower) changes."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mfpo.train.command import train_folder
    from mfpo.train.config import TrainConfig

    out, _ = run
    base = out.parent / "tiny-llava"
    cfg = TrainConfig.model_validate(
        {
            **TRAIN,
            "model": {"model": str(base)},
            "finetune": "full",
            "gradient_checkpointing": True,
            "learning_rate": 1e-3,
            "curriculum": {"all_at_once": True, "epochs_per_stage": 1},
        }
    )
    train_folder(cfg, out / "dataset", tmp_path / "full", seed=0)
    before = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "full" / "final").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    vision = {k for k in before if "vision_tower" in k}
    assert vision and not (changed & vision)  # frozen
    trainable = {k for k in before if k not in vision and "rotary" not in k}
    assert trainable - changed == set()


def torch_equal(a, b) -> bool:
    return bool((a == b).all())
