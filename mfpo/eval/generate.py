"""The hook for external hallucination benchmarks (Object HalBench / CHAIR, MMHal-Bench, AMBER, ...): the
model's answers to a user-supplied question file, written in the layout their scoring scripts read, and an
opt-in LLM judge through the same OpenAI-compatible client the keywords stage uses.

Questions: a JSONL file (one object per line with an image path and a question; a relative path is
resolved in `image_root`, default the file's folder) or a Hub dataset id (an image column and a question
column). Answers are greedy (no sampling), under the model's chat template, `eval.batch_size` at a time.

Written beside the model's results.json:
- `answers.jsonl`: every question's record as given (image bytes left out) plus `answer` (what CHAIR-style
  Object HalBench scripts read) and `model_answer` (MMHal-Bench's field), or `error` when the record could
  not be answered (a missing image, a bad line): such a record never stops the others;
- `answers.json`: the same records as one JSON list (MMHal-Bench's `eval_gpt4.py` reads a list);
- with `eval.generate.judge.enabled`: `judge_rating` (0-6, MMHal's scale) and `judge_reply` per answer, and in
  results.json the mean rating and the hallucination rate (ratings below 3, as MMHal-Bench counts it).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from mfpo.vlm import build_prompt, collate
from pipeline.errors import PipelineError, RowError, first_line
from pipeline.images import ImageLimits, decode_rgb, validate_image
from pipeline.stage import describe_value
from pipeline.storage import write_json, write_text
from pipeline.strict import StrictModel
from stages.llm import LlmClient, LlmConfig, load_template

log = logging.getLogger("mfpo")
_RATING = re.compile(r"rating\s*[:=]\s*([0-6])\b", re.IGNORECASE)


class JudgeLlmConfig(LlmConfig):
    """The keywords stage's client settings, with the judge's own template and a longer reply."""

    prompt: str = Field(
        "judge.txt", description="Template in prompts/ (or a path) with {question} {reference} {answer}."
    )
    max_new_tokens: int = Field(256, ge=1)


class JudgeSettings(StrictModel):
    enabled: bool = Field(False, description="Rate every answer with an LLM judge (an endpoint you configure).")
    llm: JudgeLlmConfig = Field(
        default_factory=JudgeLlmConfig,
        description="The judge: an OpenAI-compatible endpoint (or a local model), as stages.keywords.llm.",
    )


class GenerateSettings(StrictModel):
    questions: str | None = Field(
        None, description="JSONL file of {image, question, ...} records, or a Hub dataset id; null: no answers."
    )
    split: str = Field("test", description="Split of a Hub dataset id.")
    image_root: str | None = Field(
        None, description="Folder relative image paths are resolved in (default: the file's)."
    )
    image_field: str = "image"
    question_field: str = "question"
    reference_field: str | None = Field(
        "gt_answer", description="A record's reference answer, shown to the judge when present (MMHal: gt_answer)."
    )
    max_new_tokens: int = Field(256, ge=1)
    limit: int | None = Field(None, ge=1, description="Answer only the first N questions.")
    judge: JudgeSettings = Field(default_factory=JudgeSettings)


def question_file(cfg: GenerateSettings) -> Path | None:
    """The local question file (None: a Hub dataset id); a missing file is refused before any model loads."""
    assert cfg.questions is not None
    path = Path(cfg.questions).expanduser()
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson") or path.exists():
        if not path.is_file():
            raise PipelineError(f"eval.generate.questions: file not found: {cfg.questions}")
        return path
    return None


def read_questions(cfg: GenerateSettings) -> list[tuple[dict[str, Any], np.ndarray | None, str | None]]:
    """(record without image bytes, image or None, error or None) per question, in file order."""
    path = question_file(cfg)
    return _from_jsonl(path, cfg) if path is not None else _from_hub(cfg)


def _from_jsonl(path: Path, cfg: GenerateSettings) -> list[tuple[dict[str, Any], np.ndarray | None, str | None]]:
    root = Path(cfg.image_root).expanduser() if cfg.image_root else path.parent
    out = []
    lines = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    for n, line in enumerate(lines[: cfg.limit or len(lines)], start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            out.append(({"line": n}, None, f"bad line {n}: {first_line(err)}"))
            continue
        try:
            question = record.get(cfg.question_field)
            if not isinstance(question, str) or not question.strip():
                raise RowError(f"missing field: {cfg.question_field}")
            ref = record.get(cfg.image_field)
            if not isinstance(ref, str) or not ref.strip():
                raise RowError(f"missing field: {cfg.image_field} (an image path)")
            image_path = Path(ref).expanduser() if Path(ref).expanduser().is_absolute() else root / ref
            if not image_path.is_file():
                raise RowError(f"image: file not found: {image_path}")
            image = decode_rgb(validate_image(image_path.read_bytes(), ImageLimits()).data)
            out.append((record, image, None))
        except (RowError, OSError) as err:
            out.append((record, None, str(getattr(err, "reason", err))))
    return out


def _from_hub(cfg: GenerateSettings) -> list[tuple[dict[str, Any], np.ndarray | None, str | None]]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.questions, split=cfg.split)
    except Exception as err:
        raise PipelineError(f"eval.generate.questions: cannot load Hub dataset {cfg.questions!r}: {err}") from err
    for key in (cfg.image_field, cfg.question_field):
        if key not in ds.column_names:
            raise PipelineError(
                f"eval.generate: {cfg.questions!r} has no column {key!r} ({', '.join(ds.column_names)}); set "
                "eval.generate.image_field / question_field"
            )
    out = []
    for row in ds.select(range(min(cfg.limit or len(ds), len(ds)))):
        record = {k: describe_value(v) for k, v in row.items() if k != cfg.image_field}
        value = row[cfg.image_field]
        try:
            if hasattr(value, "convert"):  # a PIL image (datasets' Image feature)
                image = np.array(value.convert("RGB"))
            elif isinstance(value, dict) and value.get("bytes"):
                image = decode_rgb(validate_image(value["bytes"], ImageLimits()).data)
            else:
                raise RowError(f"image: column {cfg.image_field!r} holds no image bytes")
            out.append((record, image, None))
        except RowError as err:
            out.append((record, None, err.reason))
    return out


def generate_answers(
    net: Any,
    processor: Any,
    device: Any,
    items: list[tuple[np.ndarray, str]],
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None,
) -> list[str]:
    """Greedy answers to (image, question) pairs, batched with left padding (generation continues every
    sequence from its last real token)."""
    import torch

    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    side, tok.padding_side = tok.padding_side, "left"
    dtype = next(net.parameters()).dtype
    answers: list[str] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                # The prompts the score stage and the trainer build (a question's `<image>` is text), left-padded.
                prompts = [build_prompt(processor, img, q, system_prompt) for img, q in chunk]
                inputs = collate(prompts, tok.pad_token_id, device, dtype, left=True)
                out = net.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
                new = out[:, inputs["input_ids"].shape[1] :]
                answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers


def run_generate(
    net: Any, processor: Any, device: Any, cfg: GenerateSettings, batch_size: int, system_prompt: str | None,
    model_name: str, folder: Path,
) -> dict[str, Any]:  # fmt: skip
    """Answer the question file, judge when asked, write answers.jsonl / answers.json; returns the summary."""
    questions = read_questions(cfg)
    ready = [i for i, (_, image, error) in enumerate(questions) if error is None and image is not None]
    answers = generate_answers(
        net,
        processor,
        device,
        [(questions[i][1], questions[i][0][cfg.question_field]) for i in ready],  # type: ignore[misc]
        cfg.max_new_tokens,
        batch_size,
        system_prompt,
    )
    records = []
    for record, _, error in questions:
        records.append({**record, "model": model_name, **({"error": error} if error else {})})
    for i, answer in zip(ready, answers, strict=True):
        records[i].update(answer=answer, model_answer=answer)
    summary: dict[str, Any] = {"questions": len(records), "answered": len(ready), "errors": len(records) - len(ready)}
    if cfg.judge.enabled:
        summary["judge"] = _judge(records, ready, cfg)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json(folder / "answers.json", records)
    summary["answers"] = str(folder / "answers.jsonl")
    return summary


def _judge(records: list[dict[str, Any]], ready: list[int], cfg: GenerateSettings) -> dict[str, Any]:
    """MMHal-style ratings (0-6) of each answer by the configured judge; an answer the judge could not rate
    (an endpoint still failing after its retries, a reply without `Rating: N`) is counted as unrated."""
    key = "eval.generate.judge.llm"
    template = load_template(cfg.judge.llm.prompt, f"{key}.prompt")
    client = LlmClient(cfg.judge.llm, key, "judge")
    ratings = []
    for i in ready:
        r = records[i]
        reference = r.get(cfg.reference_field) if cfg.reference_field else None
        prompt = template.format(
            question=r[cfg.question_field], reference=reference if reference else "(none given)", answer=r["answer"]
        )
        try:
            reply = client.complete(prompt)
        except RowError as err:
            r["judge_error"] = err.reason
            continue
        r["judge_reply"] = reply
        match = _RATING.findall(reply)
        if match:
            r["judge_rating"] = int(match[-1])
            ratings.append(r["judge_rating"])
        else:
            r["judge_error"] = "judge: reply has no `Rating: N` (0-6)"
    return {
        "model": cfg.judge.llm.model,
        "rated": len(ratings),
        "unrated": len(ready) - len(ratings),
        "mean_rating": float(np.mean(ratings)) if ratings else None,
        "hallucination_rate": float(np.mean([x < 3 for x in ratings])) if ratings else None,
    }
