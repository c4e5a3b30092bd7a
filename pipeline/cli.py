"""Command line: `python -m pipeline run|status|train|preview|push CONFIG` (also installed as `mfpo-pipeline`)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.config import PipelineConfig, load_config
from pipeline.errors import ConfigError, PipelineError, first_line
from pipeline.runner import HOOK_INPUTS, Runner, StageStatus, log_to
from pipeline.storage import Store

app = typer.Typer(
    help="MFPO data pipeline: turn a text-preference dataset into an MFPO dataset, resumably.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

ConfigArg = Annotated[str, typer.Argument(help="Pipeline YAML, e.g. pipeline.yaml or examples/quickstart.yaml")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set stages.ingest.limit=100 (repeatable)"),
]


def _load(config: str, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        _say("config error", str(err))
        raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigArg,
    from_stage: Annotated[str | None, typer.Option("--from", help="Redo this stage and every later one")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run just this stage (its inputs must be done)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo finished shards instead of resuming")] = False,
    overrides: SetOpt = None,
) -> None:
    """Run the stages in config order, resuming whatever is already committed."""
    cfg = _load(config, overrides)
    runner = Runner(cfg)
    _console_logging()
    try:
        runner.run(from_stage=from_stage, only=only, force=force)
    except ConfigError as err:  # found before any work (e.g. an output folder inside the source)
        _say("config error", str(err))
        raise typer.Exit(2) from None
    except PipelineError as err:
        _fail(str(err), runner)
    except Exception as err:
        _fail(f"{type(err).__name__}: {err}", runner)
    statuses = runner.status()
    _print_status(statuses, Console())
    _require_rows(statuses, runner.layout.location, getattr(next(iter(cfg.stages.values()), None), "source", None))


def _require_rows(statuses: list[StageStatus], location: str, source: Any = None) -> None:
    """A finished run whose last stage kept no row exits 1, naming the top quarantine reasons: an empty
    dataset must not pass for a finished one."""
    last = statuses[-1] if statuses else None
    if last is None or last.state != "done" or last.rows_kept > 0:
        return  # nothing finished yet (e.g. --only an earlier stage), or rows came out
    kinds: Counter[str] = Counter()
    for s in statuses:
        kinds.update(s.reasons)
    quarantined = sum(s.rows_quarantined for s in statuses)
    if quarantined:
        top = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common(3)) + (", ..." if len(kinds) > 3 else "")
        why = f"all {quarantined} quarantined ({top}); see {location.rstrip('/')}/quarantine/"
    else:
        why = f"the source {source} has no rows" if source else "the source has no rows"
    _say("error", f"run produced no rows: {why}")
    raise typer.Exit(1)


@app.command()
def status(
    config: ConfigArg,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    overrides: SetOpt = None,
) -> None:
    """Per stage: done/partial/pending/stale, shards, rows kept and quarantined, fingerprint."""
    cfg = _load(config, overrides)
    try:
        statuses = Runner(cfg).status()
        training = []
        if cfg.train is not None:
            from mfpo.train.command import train_status

            training = train_status(cfg)
    except PipelineError as err:
        _say("error", str(err))
        raise typer.Exit(1) from None
    except Exception as err:  # the store: no credentials, no such bucket
        _say("error", f"{cfg.output_location}: {type(err).__name__}: {first_line(err)}")
        raise typer.Exit(1) from None
    if as_json:
        payload = {"output_dir": cfg.output_location, "stages": [asdict(s) for s in statuses], "train": training}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        _print_status(statuses, Console())
        if training:
            _print_training(training, Console())


@app.command()
def train(
    config: ConfigArg,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep the finished stages that still match; continue the started one")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over: delete the earlier stages first")] = False,
    overrides: SetOpt = None,
) -> None:
    """Train with MFPO on the finished dataset, bucket by bucket (easy -> hard)."""
    cfg = _load(config, overrides)
    if cfg.train is None:
        _say("config error", "no `train:` section in the config (see pipeline.yaml)")
        raise typer.Exit(2)
    from mfpo.train.command import lead, paths, run_train, upload_log
    from mfpo.train.records import TrainRefused

    _, out = paths(cfg)
    logger = logging.getLogger("mfpo")
    handler = None
    if lead():  # under torchrun / accelerate launch / Ray Train, rank 0 alone prints and logs
        _console_logging()
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    _quiet_libraries(lead())
    try:
        summary = run_train(cfg, resume=resume, force=force, evaluate=lambda: _eval_after_training(cfg))
    except TrainRefused as err:
        logger.debug("train refused: %s", err)  # the file only: the console gets the line below
        _say("refused", str(err))
        raise typer.Exit(2) from None
    except PipelineError as err:
        logger.exception("training failed")
        _say("error", str(err))
        raise typer.Exit(1) from None
    except Exception as err:
        logger.exception("training failed")
        _say("error", f"{type(err).__name__}: {err} (details in {out / 'train.log'})")
        raise typer.Exit(1) from None
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
            with contextlib.suppress(Exception):  # the run's own error, if any, is what the user needs
                upload_log(cfg)
    if not lead():
        return
    for stage in summary["stages"]:
        Console().print(
            f"stage {stage['stage']} ({stage['bucket']}): {stage['rows']} rows, {stage['steps']} steps, "
            f"train loss {stage['train_loss']:.4f}",
            highlight=False,
        )
    Console().print(f"model saved to {out / 'final'}", highlight=False, soft_wrap=True)


def _eval_after_training(cfg: Any) -> None:
    """`train.eval_after_each_stage`: `eval --stages` inside the training's locks and object-store sync."""
    from mfpo.eval.command import run_eval

    run_eval(cfg, None, None, stages=True, sync=False)


@app.command(name="eval")
def evaluate(
    config: ConfigArg,
    model: Annotated[
        str | None, typer.Option("--model", help="Checkpoint or LoRA adapter folder, or Hub id (default: trained)")
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="Dataset split (default eval.split: test)")] = None,
    stages: Annotated[
        bool, typer.Option("--stages", help="The reference model and every curriculum stage; table and plot")
    ] = False,
    overrides: SetOpt = None,
) -> None:
    """Does the model look at the image? Preference accuracies, an image-sensitivity probe and POPE questions."""
    cfg = _load(config, overrides)
    from mfpo.eval.command import run_eval

    _console_logging()
    _quiet_libraries(True)
    try:
        done = run_eval(cfg, model, split, stages)
    except PipelineError as err:
        _say("error", str(err))
        raise typer.Exit(1) from None
    console = Console()
    for name, path, results in done:
        pref, sens = results["preference"], results["sensitivity"]
        pope = ", ".join(f"{s} F1 {m['f1']:.3f}" for s, m in results["pope"].items())
        ratio = "-" if sens["ratio"] is None else f"{sens['ratio']:.2f}"
        console.print(
            f"{name}: text pref. acc. {pref['text_preference_accuracy']:.3f}, image pref. acc. "
            f"{pref['image_preference_accuracy']:.3f}, key/random drop {sens['key_region_drop']:.3f}/"
            f"{sens['random_region_drop']:.3f} (ratio {ratio}); POPE {pope} -> {path}",
            highlight=False,
            soft_wrap=True,
        )
        generated = results.get("generate")
        if generated:
            judge = generated.get("judge")
            judged = (
                f"; judge {judge['model']}: mean rating {judge['mean_rating']}, hallucination rate "
                f"{judge['hallucination_rate']} ({judge['unrated']} unrated)"
                if judge
                else ""
            )
            console.print(
                f"{name}: {generated['answered']} of {generated['questions']} questions answered "
                f"({generated['errors']} with an error){judged} -> {generated['answers']}",
                highlight=False,
                soft_wrap=True,
            )


def _quiet_libraries(lead: bool) -> None:
    """Library chatter off: transformers' and datasets' info lines and progress bars (our log has the steps);
    other ranks keep only errors."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning() if lead else hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not lead:
        warnings.simplefilter("ignore")


@app.command()
def preview(
    config: ConfigArg,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples to show")] = 24,
    bucket: Annotated[
        str | None, typer.Option("--bucket", help="Only this curriculum bucket (easy, medium, hard)")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Which samples (default: run.seed)")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Folder (default: <output_dir>/preview)")] = None,
    size: Annotated[int, typer.Option("--size", min=32, max=1024, help="Panel size in pixels")] = 224,
    overrides: SetOpt = None,
) -> None:
    """Pictures of the finished dataset: sheet.png (original | key objects | m'), index.html and plots."""
    cfg = _load(config, overrides)
    folder = Path(out) if out else cfg.output_dir / "preview"
    try:
        from mfpo.publish.preview import write_preview

        write = cfg.stages.get("write")
        with Store(cfg.output_location).local_view(HOOK_INPUTS) as run_folder:
            result = write_preview(
                run_folder,
                list(cfg.stages),
                folder,
                n=n,
                seed=cfg.run.seed if seed is None else seed,
                bucket=bucket,
                size=size,
                title=(write.pretty_name if write is not None else None) or cfg.run.name,
            )
    except PipelineError as err:
        _say("error", str(err))
        raise typer.Exit(1) from None
    Console().print(
        f"preview of {result.samples} sample(s) in {folder}: sheet.png, index.html and {result.plots} plot(s)",
        highlight=False,
        soft_wrap=True,
    )
    Console().print(f"open {result.index.resolve().as_uri()}", highlight=False, soft_wrap=True)


@app.command()
def push(
    config: ConfigArg,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Hub dataset repo ORG/NAME (or push.repo_id)")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (default main)")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing")] = False,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; change nothing")] = False,
    allow_stale: Annotated[
        bool, typer.Option("--allow-stale", help="Push even if a stage is not done or the contract check fails")
    ] = False,
    overrides: SetOpt = None,
) -> None:
    """Upload the finished dataset, its card, preview and plots to the Hugging Face Hub."""
    cfg = _load(config, overrides)
    from mfpo.publish.config import PushConfig
    from mfpo.publish.hub import PushRefused
    from mfpo.publish.hub import push as run_push

    given = {"repo_id": repo_id, "revision": revision, "message": message}
    update = {k: v for k, v in given.items() if v is not None}
    update.update({k: True for k, v in (("private", private), ("create_pr", create_pr)) if v})
    try:
        settings = PushConfig.model_validate({**cfg.push.model_dump(), **update})
    except ValidationError as err:
        e = err.errors()[0]
        _say("config error", f"push.{e['loc'][0]}: {e['msg']} (got {e['input']!r})")
        raise typer.Exit(2) from None
    if not settings.repo_id:
        _say("config error", "push needs a repo id: pass --repo-id ORG/NAME or set push.repo_id")
        raise typer.Exit(2)
    runner = Runner(cfg)
    _console_logging()
    console = Console()
    try:
        with (
            runner.layout.lock("push", shared=True),
            log_to(runner.layout.log_path),
            runner.layout.store.local_view(HOOK_INPUTS),
        ):
            result = run_push(
                cfg,
                runner.status(),
                settings,
                dry_run=dry_run,
                allow_stale=allow_stale,
                echo=lambda line: console.print(line, highlight=False, soft_wrap=True),
            )
    except PushRefused as err:
        _say("refused", str(err))
        raise typer.Exit(2) from None
    except PipelineError as err:
        _fail(str(err), runner)
    except Exception as err:
        _fail(f"{type(err).__name__}: {err}", runner)
    if result.dry_run:
        _print_plan(result, console)
        return
    if result.pr_url:
        console.print(f"pull request: {result.pr_url}", highlight=False, soft_wrap=True)
    console.print(f"dataset: {result.url}", highlight=False, soft_wrap=True)
    console.print(
        f"load it: from datasets import load_dataset; ds = {result.load_line}", highlight=False, soft_wrap=True
    )


def _print_plan(result: object, console: Console) -> None:
    plan = result.plan  # type: ignore[attr-defined]
    table = Table(title=f"dry run: {result.repo_id}")  # type: ignore[attr-defined]
    for col in ("file", "size", "action"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for f, why in plan.upload:
        table.add_row(f.path, f"{f.size:,}", f"upload ({why})")
    for f in plan.unchanged:
        table.add_row(f.path, f"{f.size:,}", "unchanged")
    for path in plan.delete:
        table.add_row(path, "", "delete")
    console.print(table)
    if plan.remote_note:
        console.print(plan.remote_note, highlight=False)
    console.print(
        f"would upload {len(plan.upload)} file(s) ({plan.upload_bytes:,} bytes), delete {len(plan.delete)}, "
        f"keep {len(plan.unchanged)}; nothing was changed",
        highlight=False,
    )


def _console_logging() -> None:
    logger = logging.getLogger("mfpo")
    if not any(getattr(h, "_mfpo_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda record: record.exc_info is None)  # tracebacks go to the run log only
        handler._mfpo_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def _fail(message: str, runner: Runner) -> None:
    first = first_line(message) or "failed"
    _say("error", first)
    if runner.layout.log_path.exists():
        err_console.print(f"(details in {runner.layout.log_path})", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _print_status(statuses: list[StageStatus], console: Console) -> None:
    table = Table(title="stages")
    stale = any(s.why for s in statuses)
    columns = ["stage", "state", "shards", "rows in", "kept", "quarantined", "fingerprint"] + (["why"] if stale else [])
    for col in columns:
        table.add_column(col, justify="right" if col in ("rows in", "kept", "quarantined") else "left")
    for s in statuses:
        shards = f"{s.shards_done}/{s.num_shards}" if s.num_shards is not None else "-"
        reasons = ", ".join(f"{k} {v}" for k, v in s.reasons.items())
        q = f"{s.rows_quarantined}" + (f" ({reasons})" if reasons else "")
        why = (s.why,) if stale else ()
        table.add_row(s.name, s.state, shards, str(s.rows_in), str(s.rows_kept), q, s.fingerprint, *why)
    console.print(table)


def _print_training(rows: list[dict], console: Console) -> None:
    table = Table(title="training (curriculum stages)")
    for col in ("stage", "state", "rows", "steps", "fingerprint", "why"):
        table.add_column(col, justify="right" if col in ("rows", "steps") else "left")
    for r in rows:
        table.add_row(
            r["name"],
            r["state"],
            "-" if r["rows"] is None else str(r["rows"]),
            "-" if r["steps"] is None else str(r["steps"]),
            r["fingerprint"],
            r["why"] or "",
        )
    console.print(table)


def _say(label: str, message: str) -> None:
    """`label: message` on stderr, one line: the label in red on a terminal, the message as plain text (never
    read as markup: paths, values and install lines carry square brackets)."""
    err_console.print(Text(f"{label}: ", style="red") + Text(message), soft_wrap=True, highlight=False)


def main() -> None:
    # What fails before a command's own handler (e.g. opening the output store for a URI whose filesystem
    # package is missing) is still one line.
    try:
        app()
    except PipelineError as err:
        _say("error", first_line(err))
        raise SystemExit(1) from None
