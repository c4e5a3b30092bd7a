"""Evaluate one model on a split of the finished dataset: every measure of `mfpo.eval.metrics`, from the
model's answer log-probabilities under its chat template (no sampling), batched, on CPU or CUDA.

Per row of the split the model scores
- the chosen and the rejected answer on the clean image m, and the chosen answer on the dispreferred image
  m' (preference accuracies and margins);
- the chosen answer on m with noise in the key region (the row's mask), and with the same noise in a random
  rectangle of the same area (the image-sensitivity probe; rows without a mask are left out);
- "Yes" and "No" to POPE's object questions built from the grounded key objects (`box_phrases`).

The model is a checkpoint (Hub id or folder) or a LoRA adapter folder (`adapter_config.json`), applied to
its base model: a curriculum stage's `final/` is one.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mfpo.eval.config import EvalConfig
from mfpo.eval.metrics import pope_metrics, pope_questions, pope_text, preference_metrics, sensitivity_metrics
from mfpo.masks import decode_mask
from mfpo.models import ModelConfig, loading, select_dtype
from mfpo.noise import composite, diffusion_noise, random_region
from mfpo.train.data import require_split
from mfpo.vlm import Example, answer_logps, answer_spans, build_prompt, collate, load_vlm, with_answer
from pipeline.determinism import row_rng
from pipeline.errors import PipelineError
from pipeline.images import decode_rgb

log = logging.getLogger("mfpo")

EVAL_COLUMNS = (
    "sample_id",
    "images",
    "question",
    "chosen_text",
    "rejected_text",
    "rejected_image",
    "mask",
    "box_phrases",
    "image_id",
)
POPE_ANSWERS = ("Yes", "No")


def image_questions(ds: Any, n: int, setting: str, per_image: int, seed: int) -> list[Any]:
    """POPE's questions per *picture* of the first `n` rows: its objects are the union of what every row showing
    it grounded (several questions about one picture each ground some of them), asked once, on the first row
    that shows it. Rows of a dataset without `image_id` are each their own picture."""
    objects = ds.data.column("box_phrases").to_pylist()[:n] if "box_phrases" in ds.column_names else [[]] * n
    keys = ds.data.column("image_id").to_pylist()[:n] if "image_id" in ds.column_names else list(range(n))
    first: dict[Any, int] = {}
    union: dict[Any, list[str]] = {}
    for row, (key, found) in enumerate(zip(keys, objects, strict=True)):
        first.setdefault(key, row)
        union.setdefault(key, []).extend(found or [])
    order = list(first)
    asked = pope_questions([union[k] for k in order], setting, per_image, seed)
    return [replace(q, row=first[order[q.row]]) for q in asked]


def load_model(model: ModelConfig, base: ModelConfig | None) -> tuple[Any, Any, Any]:
    """(model in eval mode, processor, device): a checkpoint, or a LoRA adapter folder on `base` (merged, so
    it runs as fast as the base)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter = Path(model.model) / "adapter_config.json"
    if adapter.is_file():
        if base is None:
            raise PipelineError(f"{model.model} is a LoRA adapter and no base model is known: set train.model")
        from peft import PeftModel

        dtype = select_dtype(device, base.precision)
        net, processor = load_vlm(base, "cpu", dtype)
        with warnings.catch_warnings():  # peft reads transformers 5's deprecated alias; nothing a user could change
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            net = PeftModel.from_pretrained(net, model.model).merge_and_unload()
    else:
        dtype = select_dtype(device, model.precision)
        net, processor = load_vlm(model, "cpu", dtype)
    return net.to(device).eval(), processor, device


@dataclass
class _Job:
    key: tuple[str, int]  # (what, index): what the log-prob is of
    example: Example


def score(net: Any, processor: Any, device: Any, jobs: list[_Job], batch_size: int) -> dict[tuple[str, int], float]:
    """Summed answer log-prob of every job, `batch_size` sequences per forward pass."""
    import torch

    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dtype = next(net.parameters()).dtype
    out: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            examples = [j.example for j in chunk]
            batch = collate(examples, pad, device, dtype)
            logps, _ = answer_logps(net(**batch).logits, batch["input_ids"], answer_spans(examples))
            out.update(zip((j.key for j in chunk), logps.double().cpu().tolist(), strict=True))
    return out


def evaluate(
    model: ModelConfig,
    base: ModelConfig | None,
    dataset_dir: Path,
    cfg: EvalConfig,
    seed: int,
    system_prompt: str | None = None,
    cache_dir: Path | None = None,
    folder: Path | None = None,
) -> dict[str, Any]:
    """Every measure for one model on `cfg.split`; returns the results (what results.json holds). With
    `eval.generate.questions`, also the model's answers to them, written to `folder`."""
    from mfpo.train.data import open_split

    require_split(dataset_dir, cfg.split)
    ds = open_split(dataset_dir, cfg.split, cache_dir or dataset_dir.parent / "_cache", EVAL_COLUMNS)
    n = min(cfg.limit or len(ds), len(ds))
    questions = {s: image_questions(ds, n, s, cfg.pope.per_row, seed) for s in cfg.pope.settings}
    asked: dict[tuple[int, str], int] = {}  # the same question in two settings is scored once
    for setting_questions in questions.values():
        for q in setting_questions:
            asked.setdefault((q.row, q.object), len(asked))
    by_row: dict[int, list[tuple[int, str]]] = {}
    for (row, obj), k in asked.items():
        by_row.setdefault(row, []).append((k, obj))
    with loading(model.model, "eval"):
        net, processor, device = load_model(model, base)
    logp: dict[tuple[str, int], float] = {}
    # Rows a chunk at a time: the prepared sequences (pixel tensors) of a whole split would not fit in memory.
    chunk = max(16, cfg.batch_size)
    for start in range(0, n, chunk):
        jobs: list[_Job] = []
        for i, row in enumerate(ds[start : min(start + chunk, n)].to_pylist(), start=start):
            jobs += _row_jobs(processor, i, row, by_row.get(i, []), cfg, seed, system_prompt)
        logp.update(score(net, processor, device, jobs, cfg.batch_size))

    nan = float("nan")
    results: dict[str, Any] = {
        "model": model.model,
        "split": cfg.split,
        "rows": n,
        "preference": preference_metrics(
            [logp[("chosen", i)] for i in range(n)],
            [logp[("rejected", i)] for i in range(n)],
            [logp.get(("chosen_noised", i), nan) for i in range(n)],
        ),
    }
    probed = [i for i in range(n) if ("key_region", i) in logp]
    results["sensitivity"] = sensitivity_metrics(
        [logp[("chosen", i)] for i in probed],
        [logp[("key_region", i)] for i in probed],
        [logp[("random_region", i)] for i in probed],
    )
    results["pope"] = {
        s: pope_metrics(
            [logp[("pope-Yes", asked[(q.row, q.object)])] for q in qs],
            [logp[("pope-No", asked[(q.row, q.object)])] for q in qs],
            [q.label for q in qs],
        )
        for s, qs in questions.items()
    }
    if cfg.generate.questions:
        from mfpo.eval.generate import run_generate

        if folder is None:
            raise PipelineError("eval.generate: answers need an output folder")
        results["generate"] = run_generate(
            net, processor, device, cfg.generate, cfg.batch_size, system_prompt, model.model, folder
        )
    return results


def _row_jobs(
    processor: Any,
    i: int,
    row: dict[str, Any],
    pope: list[tuple[int, str]],
    cfg: EvalConfig,
    seed: int,
    system_prompt: str | None,
) -> list[_Job]:
    """Every sequence row `i` is scored by: chosen and rejected on m, chosen on m', chosen on the two probe
    images, and "Yes" / "No" to each of its POPE questions (`pope`: (question number, object))."""
    clean = decode_rgb(row["images"][0])
    prompt = build_prompt(processor, clean, row["question"], system_prompt)
    jobs = [
        _Job(("chosen", i), with_answer(processor, prompt, row["chosen_text"])),
        _Job(("rejected", i), with_answer(processor, prompt, row["rejected_text"])),
    ]
    if row.get("rejected_image") is not None:
        noised = build_prompt(processor, decode_rgb(row["rejected_image"]), row["question"], system_prompt)
        jobs.append(_Job(("chosen_noised", i), with_answer(processor, noised, row["chosen_text"])))
    for what, image in _probe_images(row, clean, cfg, seed).items():
        probe = build_prompt(processor, image, row["question"], system_prompt)
        jobs.append(_Job((what, i), with_answer(processor, probe, row["chosen_text"])))
    for k, obj in pope:
        question = build_prompt(processor, clean, pope_text(obj), system_prompt)
        jobs += [_Job((f"pope-{answer}", k), with_answer(processor, question, answer)) for answer in POPE_ANSWERS]
    return jobs


def _probe_images(row: dict[str, Any], clean: np.ndarray, cfg: EvalConfig, seed: int) -> dict[str, np.ndarray]:
    """The clean image with noise in the key region, and with the same noise in a random rectangle of the
    same area (the same eps, so only where it lands differs). None for a row without a usable mask."""
    if row.get("mask") is None:
        return {}
    region = decode_mask(row["mask"])
    if region.shape != clean.shape[:2] or not region.any():
        return {}
    rng = row_rng(seed, row["sample_id"], "eval-probe")
    elsewhere = random_region(region, rng)
    noised = diffusion_noise(clean, rng.standard_normal(clean.shape).astype(np.float32), cfg.probe.noise)
    return {
        "key_region": composite(clean, noised, region.astype(np.float32)),
        "random_region": composite(clean, noised, elsewhere.astype(np.float32)),
    }


def write_results(results: dict[str, Any], folder: Path) -> Path:
    """results.json and a bar chart of the headline measures (plot.png) in `folder`."""
    from pipeline.storage import write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "results.json", results)
    _bar_plot(results, folder / "plot.png")
    return folder / "results.json"


def headline(results: dict[str, Any]) -> dict[str, float | None]:
    """The measures one table row shows (also the lines of the per-stage plot)."""
    pref, sens = results["preference"], results["sensitivity"]
    row: dict[str, float | None] = {
        "text pref. acc.": pref["text_preference_accuracy"],
        "image pref. acc.": pref["image_preference_accuracy"],
        "image margin": pref["image_margin"],
        "key-region drop": sens["key_region_drop"],
        "random-region drop": sens["random_region_drop"],
        "drop ratio": sens["ratio"],
    }
    for setting, m in results["pope"].items():
        row[f"POPE {setting} F1"] = m["f1"]
    return row


def _bar_plot(results: dict[str, Any], path: Path) -> None:
    from mfpo.plots import figure, png_bytes
    from pipeline.storage import atomic_write

    values = {k: v for k, v in headline(results).items() if v is not None and np.isfinite(v)}
    fig, ax = figure(height=3.5, width=8)
    ax.barh(list(values), list(values.values()), color="#4c72b0")
    ax.invert_yaxis()
    ax.set_title(f"{Path(results['model']).name} on {results['split']} ({results['rows']} rows)")
    data = png_bytes(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
