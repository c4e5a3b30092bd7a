"""`python -m pipeline train` and the training rows of `python -m pipeline status`.

Before anything is loaded or changed: the dataset must be `done` for the current config (when it is this
run's own), the policy's starting point must match the dataset's reference model, and the output folder
must fit the command (plain / --resume / --force, see `records.prepare_output`). Rank 0 holds the locks:
the training folder exclusively, the pipeline's output folder shared (a `run` cannot rewrite the dataset
while it is being trained on; other trainings and pushes may read it).

On an object store (`train.output_dir: s3://...`, or a run whose `output_dir` is one) training works in a
local mirror of the store (`pipeline.storage.Store.pull`): rank 0 brings it up to date first (the dataset,
and the training folder's stages and checkpoints, so a resume may happen on another machine) and uploads
after every record and checkpoint it writes, commit markers last (`Store.push`): a crash at any point
leaves in the store only checkpoints and stages that are whole.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mfpo.train.records import (
    COMMITTED,
    StagePlan,
    TrainRefused,
    lead,
    locations,
    own_dataset,
    paths,
    plan_stages,
    prepare_output,
    status,
)
from pipeline.storage import RunLayout, Store, is_uri

log = logging.getLogger("mfpo")


# The files whose presence commits a training folder's work: uploaded last, deleted first.
MARKERS = (COMMITTED, "stage.json")
# The training records `status` reads (a pull of these alone downloads no weights).
_RECORDS = ("stage.json", "_started.json", COMMITTED)


def dataset_fingerprint(cfg: Any, refuse: bool = True) -> str | None:
    """The dataset's fingerprint; for this run's own dataset, only when every stage is done for this config
    (TrainRefused otherwise, or None with refuse=False)."""
    from mfpo.train.data import dataset_fingerprint as of_files
    from pipeline.runner import Runner, not_ready

    dataset, _ = paths(cfg)
    if not own_dataset(cfg, dataset):
        if not (dataset / "data").is_dir():
            if not refuse:
                return None
            raise TrainRefused(f"train.dataset_dir {dataset}: no data/ folder there")
        return of_files(dataset)
    runner = Runner(cfg)
    statuses = runner.status()
    why = not_ready(statuses)
    if why is not None:
        if not refuse:
            return None
        raise TrainRefused(f"the dataset is not ready for this config: {why}")
    fp = runner.fingerprints()["write"]
    records = runner.layout.committed("write", fp, statuses[-1].num_shards or 0)
    return of_files(dataset, [fp, *(records[k].data_sha256 for k in sorted(records))])


@contextlib.contextmanager
def _locks(cfg: Any, dataset: Path) -> Iterator[None]:
    _, out = locations(cfg)
    with contextlib.ExitStack() as stack:
        if lead():
            stack.enter_context(RunLayout(out).lock("train"))
            if own_dataset(cfg, dataset) and out.rstrip("/") != cfg.output_location.rstrip("/"):
                stack.enter_context(RunLayout(cfg.output_location).lock("train", shared=True))
        yield


def _sync_down(cfg: Any) -> Store | None:
    """Rank 0: bring the local mirrors of object-store locations up to date (the dataset, and the training
    folder's records and checkpoints); the other ranks wait for it. The training store, when remote."""
    dataset, out = locations(cfg)
    if not (is_uri(dataset) or is_uri(out)):
        return None
    from accelerate import PartialState

    if lead():
        if is_uri(dataset):
            Store(dataset).pull()
        if is_uri(out):
            Store(out).pull()
    PartialState().wait_for_everyone()  # the other ranks read the mirrors rank 0 just wrote
    return Store(out) if is_uri(out) else None


def run_train(
    cfg: Any, resume: bool, force: bool, evaluate: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Everything `train` does; returns the summary (per stage: rows, steps, last metrics). `evaluate`: what
    `train.eval_after_each_stage` runs once the curriculum is done (the application passes `eval --stages`
    without its own syncing or locks: training holds both), so that training needs no evaluation code."""
    if resume and force:
        raise TrainRefused("use either --resume or --force, not both")
    dataset, out = paths(cfg)
    ray_workers = cfg.train.ray.num_workers
    remote = [loc for loc in locations(cfg) if is_uri(loc)]
    if ray_workers and remote:
        raise TrainRefused(
            f"train.ray.num_workers: Ray Train workers read the dataset and write checkpoints on a shared disk, "
            f"and {remote[0]} is an object store; train without train.ray (one process, or torchrun on one "
            "node), or give train.dataset_dir / train.output_dir on a disk every node mounts"
        )
    with _locks(cfg, dataset):
        store = _sync_down(cfg)
        publish = (lambda: store.push(last=MARKERS)) if store is not None and lead() else None
        summary = _train_locked(cfg, dataset, out, resume, force, publish, evaluate)
        if publish is not None:
            publish()
    return summary


def _train_locked(
    cfg: Any,
    dataset: Path,
    out: Path,
    resume: bool,
    force: bool,
    publish: Callable[[], None] | None,
    evaluate: Callable[[], None] | None,
) -> dict[str, Any]:
    fingerprint = dataset_fingerprint(cfg)
    assert fingerprint is not None
    plans = plan_stages(cfg.train, fingerprint)
    from mfpo.train.trainer import check_reference, world

    if lead():
        check_reference(cfg.train, dataset)
    evaluate_stages = cfg.train.eval_after_each_stage
    if evaluate_stages:
        from mfpo.train.data import require_split
        from pipeline.errors import PipelineError

        try:
            require_split(dataset, cfg.eval.split, "train.eval_after_each_stage")
        except PipelineError as err:  # training does not need it: the stages train, the evaluation is skipped
            log.warning("%s; skipping the evaluation after training", err)
            evaluate_stages = False
    ray_workers = cfg.train.ray.num_workers
    here = {"world_size": ray_workers, "device": None} if ray_workers else world()
    if lead():
        out.mkdir(parents=True, exist_ok=True)
        known = {k: v for k, v in here.items() if v is not None}
        for note in prepare_output(out, plans, known, resume, force):
            log.info("train: %s", note)
        if publish is not None:
            publish()  # what prepare_output removed goes from the store too (markers first)
    if ray_workers:
        from mfpo.train.ray_train import launch
        from mfpo.train.records import read_stage_records

        launch(cfg.train, dataset, out, cfg.run.seed, plans, cfg.run.ray.address, cfg.run.ray.num_cpus)
        summary = read_stage_records(out)
    else:
        from mfpo.train.trainer import train

        summary = train(cfg.train, dataset, out, cfg.run.seed, plans, publish)
    if lead():
        from mfpo.train.card import write_model_card

        write_model_card(out / "final", cfg, dataset, summary)
        if evaluate_stages and evaluate is not None:
            evaluate()  # under this training's locks, before its upload: the card gets the before/after table
        if cfg.train.extra_arguments.get("push_to_hub"):
            from mfpo.train.trainer import push_model

            log.info("train: model pushed: %s", push_model(cfg.train, out / "final"))
    return summary


def upload_log(cfg: Any) -> None:
    """The training log to an object-store output (it is written in the mirror, and never pulled)."""
    _, location = locations(cfg)
    log_file = paths(cfg)[1] / "train.log"
    if is_uri(location) and lead() and log_file.is_file():
        Store(location).write_bytes("train.log", log_file.read_bytes())


def train_status(cfg: Any) -> list[dict[str, Any]]:
    """The curriculum stages' rows for `status` (pending with a reason while the dataset is not done)."""
    _, out = paths(cfg)
    fingerprint = dataset_fingerprint(cfg, refuse=False)
    if fingerprint is None:
        names = ["all"] if cfg.train.curriculum.all_at_once else cfg.train.curriculum.order
        return [
            {
                "name": f"train/stage-{k}-{b}",
                "state": "pending",
                "why": "dataset not done",
                "rows": None,
                "steps": None,
                "fingerprint": "-",
            }
            for k, b in enumerate(names)
        ]
    plans: list[StagePlan] = plan_stages(cfg.train, fingerprint)
    _, location = locations(cfg)
    if is_uri(location):
        Store(location).pull(only=lambda rel: rel.rsplit("/", 1)[-1] in _RECORDS)
    return status(out, plans)


def train_folder(
    cfg: Any, dataset: Path, out: Path, seed: int = 0, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train on any finished dataset folder without a pipeline config (the Python entry point): the same
    fingerprints, folder rules and reference check as `python -m pipeline train`, in this process."""
    from mfpo.train.data import dataset_fingerprint as of_files
    from mfpo.train.trainer import check_reference, train, world

    plans = plan_stages(cfg, of_files(dataset))
    check_reference(cfg, dataset)
    with RunLayout(out).lock("train"):
        for note in prepare_output(out, plans, world(), resume, force):
            log.info("train: %s", note)
        return train(cfg, dataset, out, seed, plans)
