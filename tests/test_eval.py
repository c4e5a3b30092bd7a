"""Evaluation on tiny models, where each measure can be checked: a model whose vision features are zeroed
(it cannot see) has an image-sensitivity drop of 0 and an image-preference margin of 0, a model that sees
does not; `eval` writes results and a plot per model, and `eval --stages` a before/after table in the card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import SAMPLE_JSONL, chat_endpoint, cli

from mfpo.eval.command import run_eval
from mfpo.eval.config import EvalConfig
from mfpo.eval.evaluate import evaluate
from mfpo.models import ModelConfig
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.storage import RunLayout

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


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
    settings = EvalConfig(split="train", batch_size=5, pope={"per_row": 1})
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
    quick = ["--set", "eval.pope.per_row=1"]
    one = cli("eval", cfg, "--split", "train", *quick, check=True)
    results = json.loads((trained[0] / "eval" / "final" / "results.json").read_text())
    assert results["name"] == "final" and results["model"].endswith("train/final")
    assert (trained[0] / "eval" / "final" / "plot.png").stat().st_size > 1000
    assert "final: text pref. acc." in one.stdout
    cli("eval", cfg, "--split", "train", "--stages", *quick, check=True)
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
    nowhere = trained[0] / "no-such-model"
    bad = cli("eval", cfg, "--split", "train", "--model", str(nowhere))  # refused before anything loads
    assert bad.returncode == 1 and bad.stderr.strip() == f"error: --model: model directory {nowhere} does not exist"


def test_eval_is_refused_beside_a_writer_and_runs_beside_readers(trained):
    """eval reads the dataset and the trained model: refused in one line, before any model loads, while a run
    holds the output folder or a training the training folder; `--stages` rewrites the model card, so even a
    reader of the training folder (another eval) refuses it; beside a push and another eval it goes on."""
    out, train_out = trained
    cfg = load_config(str(out.parent / "cfg.yaml"), [])

    def busy(folder: Path) -> str:
        return re.escape(f"another run, push, train or eval is using {folder}; wait for it to finish before this eval")

    with RunLayout(out).lock("run"), pytest.raises(PipelineError, match=busy(out)):
        run_eval(cfg, None, "train", stages=False)
    with RunLayout(train_out).lock("train"):
        for stages in (False, True):
            with pytest.raises(PipelineError, match=busy(train_out)):
                run_eval(cfg, None, "train", stages=stages)
    with RunLayout(train_out).lock("eval", shared=True):
        with pytest.raises(PipelineError, match=busy(train_out)):
            run_eval(cfg, None, "train", stages=True)
        # Past the locks, to the dataset's splits (this one has no `test`).
        with RunLayout(out).lock("push", shared=True), pytest.raises(PipelineError, match="has no `test` split"):
            run_eval(cfg, None, None, stages=False)


def test_answers_for_an_external_question_file_with_a_judge(trained, tmp_path):
    """eval.generate: every record of the question file comes back, answered or with its error, in the
    layouts CHAIR-style and MMHal-Bench scripts read; the judge's `Rating: N` replies become the mean rating
    and the hallucination rate."""

    photo = SAMPLE_JSONL.parent / "images" / "astronaut.jpg"
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(photo.read_bytes())
    lines = [
        json.dumps(
            {"question_id": 1, "image": str(photo), "question": "What is she holding?", "gt_answer": "A helmet."}
        ),
        "not json",
        json.dumps({"question_id": 3, "image": "img/missing.jpg", "question": "What is here?"}),
        json.dumps({"question_id": 4, "image": "img/a.jpg", "question": "Describe the image."}),
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    prompts: list[str] = []

    def judge(body: dict, headers: object) -> str:  # scripted ratings: 5, then 1
        prompts.append(body["messages"][0]["content"])
        return f"Fine.\nRating: {5 if len(prompts) == 1 else 1}"

    with chat_endpoint(judge) as url:
        sets = {
            "eval.split": "train",
            "eval.limit": 2,
            "eval.pope.per_row": 1,
            "eval.generate.questions": str(questions),
            "eval.generate.max_new_tokens": 6,
            "eval.generate.judge.enabled": "true",
            "eval.generate.judge.llm.base_url": url,
        }
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        proc = cli("eval", str(trained[0].parent / "cfg.yaml"), "--model", str(trained[1] / "final"), *args)
    assert proc.returncode == 0, proc.stderr
    folder = trained[0] / "eval" / "final"
    records = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    assert [r.get("question_id") for r in records] == [1, None, 3, 4]
    assert records[1]["error"].startswith("bad line 2") and records[2]["error"].startswith("image: file not found")
    for r in (records[0], records[3]):
        assert isinstance(r["answer"], str) and r["model_answer"] == r["answer"] and "error" not in r
    assert [r["judge_rating"] for r in (records[0], records[3])] == [5, 1]
    assert json.loads((folder / "answers.json").read_text()) == records
    assert "Reference answer: A helmet." in prompts[0] and "Reference answer: (none given)" in prompts[1]
    summary = json.loads((folder / "results.json").read_text())["generate"]
    assert summary["questions"] == 4 and summary["answered"] == 2 and summary["errors"] == 2
    assert summary["judge"]["mean_rating"] == 3.0 and summary["judge"]["hallucination_rate"] == 0.5


def test_questions_from_a_hub_dataset(trained, tmp_path):
    """eval.generate.questions as a Hub dataset id (image and question columns): every row is answered."""

    import pyarrow as pa
    import pyarrow.parquet as pq
    from hub_server import HubServer

    photo = (SAMPLE_JSONL.parent / "images" / "astronaut.jpg").read_bytes()
    folder = tmp_path / "qs" / "data"
    folder.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": photo, "path": None}] * 2, image_type),
            "question": ["What is she holding?", "Is there a cat?"],
            "question_id": [7, 8],
        }
    )
    pq.write_table(table, folder / "test-00000-of-00001.parquet")
    with HubServer(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf-home", token="hf_writer")
        hub.upload({"hub-user/qs": ("dataset", folder.parent, "")}, tmp_path / "hf-home")
        sets = ["eval.split=train", "eval.limit=1", "eval.pope.per_row=1", "eval.generate.questions=hub-user/qs"]
        args = [a for s in [*sets, "eval.generate.max_new_tokens=4"] for a in ("--set", s)]
        proc = cli("eval", str(trained[0].parent / "cfg.yaml"), "--model", str(trained[1] / "final"), *args, env=env)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (trained[0] / "eval" / "final" / "answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == [7, 8]
    assert all(isinstance(r["answer"], str) and "error" not in r and "image" not in r for r in records)
