"""The curriculum's bookkeeping on disk: which stages are done for which configuration, which checkpoints
are complete, and what `train`, `train --resume` and `train --force` do with an output folder.

    <train output_dir>/
      stage-K-<bucket>/_started.json        fingerprint (+ world size, device) of the stage being trained
      stage-K-<bucket>/checkpoint-N/        a Trainer checkpoint; complete iff it holds `.committed`
      stage-K-<bucket>/optimizer.pt         optimizer state at the stage's end (schedule: curriculum)
      stage-K-<bucket>/reference.json       refreshed reference log-probs (curriculum.refresh_reference)
      stage-K-<bucket>/final/               the weights after the stage
      stage-K-<bucket>/stage.json           the stage's record: the commit point of a finished stage
      final/                                the trained model, its processor and model card
      eval/                                 `eval --stages`: per model results, table and plot (removed with
                                            the weights it measured)

Also here, for the trainer, `eval` and the application alike: where a configuration's dataset and training folder
are (`locations`, `paths`), whether the dataset is the run's own, and which process writes (`lead`).

A stage's fingerprint hashes the dataset's fingerprint, every training option that changes the weights
and the fingerprint of the stage before it: changing an option or the data redoes that stage and every
later one, never an earlier one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.determinism import stable_hash
from pipeline.errors import PipelineError
from pipeline.storage import local_folder, write_json

COMMITTED = ".committed"


class TrainRefused(PipelineError):
    """The output folder or the data do not allow this `train` (exit 2, nothing changed)."""


@dataclass(frozen=True)
class StagePlan:
    index: int
    bucket: str
    fingerprint: str
    inputs: dict[str, Any]  # what the fingerprint hashes, kept to say what changed

    @property
    def name(self) -> str:
        return f"stage-{self.index}-{self.bucket}"


def plan_stages(cfg: Any, dataset_fp: str) -> list[StagePlan]:
    names = ["all"] if cfg.curriculum.all_at_once else list(cfg.curriculum.order)
    plans, previous = [], ""
    for k, bucket in enumerate(names):
        inputs = {"dataset": dataset_fp, "config": cfg.weight_fields(), "stage": k, "bucket": bucket}
        fp = stable_hash({**inputs, "previous": previous}, length=16)
        plans.append(StagePlan(k, bucket, fp, inputs))
        previous = fp
    return plans


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def step_of(checkpoint: Path) -> int | None:
    """N of a Trainer's `checkpoint-N` folder."""
    number = checkpoint.name.removeprefix("checkpoint-")
    return int(number) if number.isdigit() else None


def committed_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in stage_dir.glob("checkpoint-*") if (p / COMMITTED).exists() and step_of(p) is not None]
    return sorted(found, key=step_of)


def commit_checkpoint(folder: Path) -> None:
    write_json(folder / COMMITTED, {"step": step_of(folder)})


def stage_state(out: Path, plan: StagePlan, world: dict[str, Any] | None = None) -> tuple[str, str]:
    """(done | partial | stale | pending, why). `world`: {world_size, device} of this run, when known."""
    folder = out / plan.name
    for record_name, state in (("stage.json", "done"), ("_started.json", "partial")):
        record = _read(folder / record_name)
        if record is None:
            continue
        if record.get("fingerprint") != plan.fingerprint:
            return "stale", changed(record.get("inputs") or {}, plan.inputs)
        if world is not None:
            differs = [f"{k} {record.get(k)} -> {v}" for k, v in world.items() if record.get(k) != v]
            if differs:
                return "stale", ", ".join(differs)
        return state, ""
    return "pending", ""


def changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two fingerprint inputs, in a few words."""
    if old.get("dataset") != new.get("dataset"):
        return "the dataset changed"
    a, b = old.get("config") or {}, new.get("config") or {}
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if keys:
        return "; ".join(f"train.{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in keys[:3])
    return "an earlier stage changed"


# ------------------------------------------------------------------------------ where training reads and writes
def locations(cfg: Any) -> tuple[str, str]:
    """(dataset, training output) as configured: local paths or object-store URIs."""
    run = cfg.output_location.rstrip("/")
    return cfg.train.dataset_dir or f"{run}/dataset", cfg.train.output_dir or f"{run}/train"


def paths(cfg: Any) -> tuple[Path, Path]:
    """(dataset folder, training output folder) on this machine: the folders themselves, or the local
    mirrors of object-store locations."""
    dataset, out = locations(cfg)
    return local_folder(dataset), local_folder(out)


def own_dataset(cfg: Any, dataset: Path) -> bool:
    run_dataset = local_folder(f"{cfg.output_location.rstrip('/')}/dataset")
    return dataset.resolve() == run_dataset.resolve() and "write" in cfg.stages


def lead() -> bool:
    """Whether this process is the launcher's rank 0 (torchrun, accelerate launch, Ray Train set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def read_stage_records(out: Path) -> dict[str, Any]:
    """The summary of a finished run, from the stage records rank 0 wrote."""
    return {"stages": [json.loads(p.read_text()) for p in sorted(out.glob("stage-*/stage.json"))]}


def existing_stage_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("stage-*") if p.is_dir())


def prepare_output(out: Path, plans: list[StagePlan], world: dict[str, Any], resume: bool, force: bool) -> list[str]:
    """Make the folder fit this run, or refuse (TrainRefused) before changing anything. Returns log lines.

    plain: only into a folder without stages; --resume: keep the leading stages that match, redo the rest;
    --force: start over."""
    stage_dirs = existing_stage_dirs(out)
    notes: list[str] = []
    if force:
        for p in [*stage_dirs, out / "final", out / "eval"]:
            shutil.rmtree(p, ignore_errors=True)
        return [f"--force: removed {len(stage_dirs)} earlier stage folder(s)"] if stage_dirs else []
    states = [stage_state(out, p, world) for p in plans]
    if not resume and stage_dirs:
        stale = [(p, why) for p, (s, why) in zip(plans, states, strict=True) if s == "stale"]
        known = {p.name for p in plans}
        if stale or any(d.name not in known for d in stage_dirs):
            what = f"{stale[0][0].name}: {stale[0][1]}" if stale else f"{stage_dirs[0].name} is not a stage of it"
            raise TrainRefused(
                f"{out} holds stages of another configuration ({what}); --force starts over (deletes them), "
                "--resume keeps the stages that still match, or set train.output_dir"
            )
        raise TrainRefused(
            f"{out} already holds {len(stage_dirs)} stage(s) of this configuration: --resume continues them, "
            "--force starts over"
        )
    # Resume: every stage from the first one that is not done (or not this configuration's) is redone.
    first_open = next((k for k, (s, _) in enumerate(states) if s != "done"), len(plans))
    keep = {p.name for p in plans[:first_open]}
    if first_open < len(plans) and states[first_open][0] == "partial":
        keep.add(plans[first_open].name)  # continues from its last complete checkpoint
    for d in stage_dirs:
        if d.name not in keep:
            why = next((w for p, (s, w) in zip(plans, states, strict=True) if p.name == d.name and w), "")
            notes.append(f"redoing {d.name}" + (f" ({why})" if why else ""))
            shutil.rmtree(d)
    if first_open < len(plans) or not (out / "final").exists():
        shutil.rmtree(out / "final", ignore_errors=True)
        shutil.rmtree(out / "eval", ignore_errors=True)  # `eval --stages` results of weights being replaced
    for d in out.glob("stage-*/checkpoint-*"):
        if not (d / COMMITTED).exists():  # a kill while the Trainer was writing it
            notes.append(f"ignoring incomplete {d.relative_to(out)}")
            shutil.rmtree(d)
    return notes


def status(out: Path, plans: list[StagePlan]) -> list[dict[str, Any]]:
    """Per curriculum stage: state, why, steps done (for `python -m pipeline status`)."""
    rows = []
    for p in plans:
        state, why = stage_state(out, p)
        record = _read(out / p.name / "stage.json") or {}
        checkpoints = committed_checkpoints(out / p.name) if state == "partial" else []
        rows.append(
            {
                "name": p.name,
                "state": state,
                "why": why,
                "rows": record.get("rows"),
                "steps": record.get("steps") if state == "done" else (step_of(checkpoints[-1]) if checkpoints else 0),
                "fingerprint": p.fingerprint,
            }
        )
    return rows
