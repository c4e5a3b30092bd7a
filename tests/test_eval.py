"""Evaluation on tiny models, where each measure can be checked: a model whose vision features are zeroed
(it cannot see) has an image-sensitivity drop of 0 and an image-preference margin of 0, a model that sees
does not; `eval` writes results and a plot per model, and `eval --stages` a before/after table in the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli

from mfpo_eval.config import EvalConfig
from mfpo_eval.evaluate import evaluate
from stages.common import ModelConfig


def _blind(source: Path, target: Path) -> Path:
    """The same model with its projector's output zeroed: every image reaches the language model as zeros."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(source)
    projector = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        projector.weight.zero_()
        projector.bias.zero_()
    model.save_pretrained(target)
    AutoProcessor.from_pretrained(source).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def dataset(trained) -> Path:
    return trained[0] / "dataset"


def test_a_model_that_cannot_see_is_not_moved_by_the_image(trained, dataset, tmp_path):
    settings = EvalConfig(split="train", batch_size=5)
    blind = _blind(trained[0].parent / "tiny-llava", tmp_path / "blind")
    got = evaluate(ModelConfig(model=str(blind)), None, dataset, settings, seed=0)
    sens, pref = got["sensitivity"], got["preference"]
    assert got["rows"] == 9 and sens["rows"] == 9 and pref["image_rows"] == 9
    assert abs(sens["key_region_drop"]) < 1e-5 and abs(sens["random_region_drop"]) < 1e-5
    assert sens["ratio"] is None
    assert abs(pref["image_margin"]) < 1e-5
    assert abs(pref["text_margin"]) > 1e-3  # it still reads the answers
    for setting in ("random", "popular", "adversarial"):
        assert got["pope"][setting]["questions"] > 0
    # The model it was made from sees: the same probe moves it.
    sees = evaluate(ModelConfig(model=str(trained[0].parent / "tiny-llava")), None, dataset, settings, seed=0)
    assert abs(sees["sensitivity"]["key_region_drop"]) > 1e-4 and abs(sees["preference"]["image_margin"]) > 1e-4


def test_eval_command_and_the_stages_table_in_the_card(trained):
    cfg = str(trained[0].parent / "cfg.yaml")
    one = cli("eval", cfg, "--split", "train", check=True)
    results = json.loads((trained[0] / "eval" / "final" / "results.json").read_text())
    assert results["name"] == "final" and results["model"].endswith("train/final")
    assert (trained[0] / "eval" / "final" / "plot.png").stat().st_size > 1000
    assert "final: text pref. acc." in one.stdout
    cli("eval", cfg, "--split", "train", "--stages", check=True)
    root = trained[1] / "eval"
    table = json.loads((root / "results.json").read_text())
    assert list(table) == ["reference", "stage-0-easy", "stage-1-medium", "stage-2-hard"]
    # The last stage's results equal the trained model's: the same weights.
    assert table["stage-2-hard"]["preference"] == pytest.approx(results["preference"], abs=1e-5)
    card = (trained[1] / "final" / "README.md").read_text()
    assert "## Evaluation: before and after each curriculum stage" in card
    assert "| reference |" in card and "| stage-2-hard |" in card and "eval_stages.png" in card
    assert (trained[1] / "final" / "eval_stages.png").is_file() and (root / "stages.png").is_file()
    missing = cli("eval", cfg)  # no test split in this dataset
    assert missing.returncode == 1 and "eval.split: the dataset has no `test` split" in missing.stderr
