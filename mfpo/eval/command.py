"""`python -m pipeline eval CONFIG [--model PATH_OR_ID] [--split NAME] [--stages]`.

Without `--stages`: one model (by default the trained model, `<train output>/final`, else the reference
model) into `<output_dir>/eval/<model-name>/` (results.json, plot.png). With `--stages`: the reference
model and every finished curriculum stage into `<train output>/eval/<name>/`, a table and a line plot
(`stages.md`, `stages.png`, `results.json`) there, and the table and plot in the trained model's card.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mfpo.eval.evaluate import evaluate, headline, write_results
from mfpo.eval.generate import question_file
from mfpo.models import ModelConfig, missing_model_dir
from pipeline.errors import PipelineError
from pipeline.storage import RunLayout, Store, atomic_write, is_uri, local_folder, write_json, write_text

log = logging.getLogger("mfpo")


def _name(model: str) -> str:
    """A folder name for a model: its folder's or Hub repo's last part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"


def _base_model(cfg: Any, dataset: Path) -> ModelConfig:
    """The reference model the dataset was scored with (train.model when set): the starting point. A
    PipelineError when neither is known (a dataset without the score stage and no train.model)."""
    from mfpo.train.config import TrainConfig, policy_model_config
    from mfpo.train.data import read_reference

    train = cfg.train if cfg.train is not None else TrainConfig()
    return policy_model_config(train, read_reference(dataset))


@contextlib.contextmanager
def _locks(cfg: Any, model: str | None, stages: bool) -> Iterator[None]:
    """No writer while eval reads and writes: the pipeline's output folder shared (a `run` cannot rewrite the
    dataset, or `eval/` beside it, meanwhile; pushes, trainings and other evals read on), and the training
    folder shared while its `final/` model is read, exclusively with `--stages` (its records are read and the
    model card in `final/` is rewritten, so no training may write there meanwhile)."""
    from mfpo.train.records import locations, own_dataset, paths

    train = locations(cfg)[1].rstrip("/")
    run = cfg.output_location.rstrip("/")
    wanted: dict[str, bool] = {}  # location -> exclusive
    if not stages or own_dataset(cfg, paths(cfg)[0]):
        wanted[run] = False
    # A local training folder that does not exist yet holds no model to read: locking it would create it.
    if stages or (model is None and (is_uri(train) or local_folder(train).is_dir())):
        wanted[train] = stages  # beside the output folder's entry, which is never exclusive
    with contextlib.ExitStack() as stack:
        for location, exclusive in wanted.items():
            stack.enter_context(RunLayout(location).lock("eval", shared=not exclusive))
        yield


def run_eval(
    cfg: Any, model: str | None, split: str | None, stages: bool, sync: bool = True
) -> list[tuple[str, Path, dict[str, Any]]]:
    """Evaluate; returns (name, results.json, results) of every model evaluated. Object-store locations are read
    through their local mirrors, brought up to date first and uploaded to after, under the locks of `_locks`
    (sync=False: the caller, training, does all three)."""
    with _locks(cfg, model, stages) if sync else contextlib.nullcontext():
        return _run_eval(cfg, model, split, stages, sync)


def _run_eval(
    cfg: Any, model: str | None, split: str | None, stages: bool, sync: bool
) -> list[tuple[str, Path, dict[str, Any]]]:
    from mfpo.train.records import locations, paths

    settings = cfg.eval.model_copy(update={"split": split}) if split else cfg.eval
    dataset_location, train_location = locations(cfg)
    dataset, out = paths(cfg)
    if sync and is_uri(dataset_location):
        Store(dataset_location).pull()
    if sync and is_uri(train_location):
        Store(train_location).pull() if stages else Store(train_location).pull(("final",))
    if not (dataset / "data").is_dir():
        raise PipelineError(f"no dataset at {dataset_location}: run `python -m pipeline run CONFIG` first")
    try:
        base: ModelConfig | None = _base_model(cfg, dataset)
        unknown = ""
    except PipelineError as err:  # only needed for the reference model itself and for LoRA adapters
        base, unknown = None, f"{err}; or evaluate a full checkpoint with --model"
    system_prompt = cfg.train.system_prompt if cfg.train is not None else None
    if stages:
        if model is not None:
            raise PipelineError("eval: --stages evaluates the reference model and every stage; leave out --model")
        if base is None:
            raise PipelineError(unknown)
        targets = [("reference", base)]
        targets += [(d.name, ModelConfig(model=str(d / "final"))) for d in _finished_stages(out)]
        root = out / "eval"
    else:
        if model is not None:
            target = ModelConfig(model=model)
            name = _name(model)
        elif (out / "final" / "config.json").is_file() or (out / "final" / "adapter_config.json").is_file():
            target, name = ModelConfig(model=str(out / "final")), "final"
        else:
            if base is None:
                raise PipelineError(unknown)
            target, name = base, "reference"
        targets = [(name, target)]
        root = cfg.output_dir / "eval"
    key = "--model" if model is not None else "eval"
    problems = [p for _, target in targets for p in missing_model_dir(target.model, key)]
    if problems:
        raise PipelineError(problems[0])
    if settings.generate.questions:
        question_file(settings.generate)  # a missing file is refused now, not after the scoring
    done = []
    for name, target in targets:
        log.info("eval: %s (%s) on split %s", name, target.model, settings.split)
        results = evaluate(target, base, dataset, settings, cfg.run.seed, system_prompt, out / "_cache", root / name)
        results["name"] = name
        done.append((name, write_results(results, root / name), results))
    if stages:
        _stage_report(cfg, dataset, out, [(n, results) for n, _, results in done])
    if sync and stages and is_uri(train_location):
        Store(train_location).push(("eval", "final"), delete=False)
    elif sync and not stages and is_uri(cfg.output_location):
        Store(cfg.output_location).push(("eval",), delete=False)
    return done


def _finished_stages(out: Path) -> list[Path]:
    from mfpo.train.records import existing_stage_dirs

    return [d for d in existing_stage_dirs(out) if (d / "stage.json").is_file() and (d / "final").is_dir()]


def stage_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A Markdown table: one row per model, one column per headline measure."""
    columns = list(headline(rows[0][1]))
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, results in rows:
        values = headline(results)
        cells = ["-" if values[c] is None else f"{values[c]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stage_report(cfg: Any, dataset: Path, out: Path, rows: list[tuple[str, dict[str, Any]]]) -> None:
    """train/eval/{results.json, stages.md, stages.png}, and the same table and plot in the model card."""
    root = out / "eval"
    write_json(root / "results.json", {name: results for name, results in rows})
    table = stage_table(rows)
    write_text(root / "stages.md", table + "\n")
    plot = _line_plot(rows)
    atomic_write(root / "stages.png", lambda tmp: tmp.write_bytes(plot))
    final = out / "final"
    if final.is_dir() and cfg.train is not None:
        from mfpo.train.card import write_model_card
        from mfpo.train.records import read_stage_records

        atomic_write(final / "eval_stages.png", lambda tmp: tmp.write_bytes(plot))
        split = rows[0][1]["split"]
        write_model_card(final, cfg, dataset, read_stage_records(out), evaluation=(table, split, "eval_stages.png"))


def _line_plot(rows: list[tuple[str, dict[str, Any]]]) -> bytes:
    import math

    from mfpo.plots import figure, png_bytes

    names = [n for n, _ in rows]
    series = {c: [headline(r)[c] for _, r in rows] for c in headline(rows[0][1])}
    fig, ax = figure(height=4, width=8)
    for label, values in series.items():
        ys = [math.nan if v is None else v for v in values]
        ax.plot(names, ys, marker="o", label=label)
    ax.set_xlabel("model")
    ax.set_title(f"measures per curriculum stage ({rows[0][1]['split']} split, {rows[0][1]['rows']} rows)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    return png_bytes(fig)
