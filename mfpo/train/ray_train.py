"""Multi-node MFPO training through Ray Train: the same curriculum code, run by N data-parallel workers.

Ray Train starts the workers (on any node of the cluster `run.ray.address` / `RAY_ADDRESS` points at,
or on an embedded local cluster) and sets up torch.distributed between them (NCCL on GPUs, gloo on
CPUs); inside each worker the transformers Trainer finds that process group and runs DDP. Rank 0
writes checkpoints, stage records and the final model, so `output_dir` must be on storage every node
sees. The driver checks the cluster can hold the workers before starting them, resolves local paths
(workers do not run in the driver's directory), and reports a failure as one line naming its cause.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mfpo.train.config import TrainConfig
from mfpo.train.records import StagePlan
from pipeline.errors import PipelineError

log = logging.getLogger("mfpo")


def _worker(config: dict[str, Any]) -> None:
    from mfpo.train.trainer import train

    train(
        TrainConfig.model_validate(config["train"]),
        Path(config["dataset"]),
        Path(config["out"]),
        config["seed"],
        [StagePlan(**p) for p in config["plans"]],
    )


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local model paths as absolute paths: a worker's working directory is not the driver's."""
    if cfg.model is not None and Path(cfg.model.model).exists():
        model = cfg.model.model_copy(update={"model": str(Path(cfg.model.model).resolve())})
        return cfg.model_copy(update={"model": model})
    return cfg


def use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.ray.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= cfg.ray.num_workers
    return bool(cfg.ray.use_gpu)


def check_resources(cfg: TrainConfig, gpu: bool) -> None:
    """Refuse at once, in one line, a worker group the cluster could never hold (Ray would wait forever)."""
    import ray

    have = ray.cluster_resources()
    n = cfg.ray.num_workers
    need = {"CPU": n * cfg.ray.cpus_per_worker, **({"GPU": float(n)} if gpu else {})}
    short = [f"{need[k]:g} {k} (the cluster has {have.get(k, 0):g})" for k in need if have.get(k, 0) < need[k]]
    if short:
        raise PipelineError(
            f"train.ray.num_workers={n} needs {', '.join(short)}; lower train.ray.num_workers or "
            f"train.ray.cpus_per_worker" + (", or set train.ray.use_gpu: false" if gpu else "")
        )


def root_cause(err: BaseException) -> str:
    """The innermost error a Ray worker raised, as one line (not Ray's wrappers)."""
    causes: list[BaseException] = []
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        causes.append(e)
        stack += [c for c in (e.__cause__, e.__context__) if c is not None]
        for attr in ("worker_failures", "error", "cause"):
            value = getattr(e, attr, None)
            if isinstance(value, BaseException):
                stack.append(value)
            elif isinstance(value, dict):
                stack += [v for v in value.values() if isinstance(v, BaseException)]
    inner = causes[-1]
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[-1] if text else ''}".strip()


def launch(
    cfg: TrainConfig,
    dataset: Path,
    out: Path,
    seed: int,
    plans: list[StagePlan],
    address: str | None,
    num_cpus: int | None,
) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            **({} if address else {"num_cpus": num_cpus}),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    gpu = use_gpu(cfg)
    check_resources(cfg, gpu)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.ray.start_timeout_s)
    cfg = absolute_paths(cfg)
    settings = cfg.ray
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "dataset": str(dataset.resolve()),
            "out": str(out.resolve()),
            "seed": seed,
            "plans": [asdict(p) for p in plans],
        },
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker, **({"GPU": 1} if gpu else {})},
        ),
        run_config=RunConfig(
            name="mfpo-train",
            storage_path=str((out / "ray").resolve()),
            failure_config=FailureConfig(max_failures=0),  # a failure is reported, not retried forever
        ),
    )
    log.info("train: %d Ray Train workers (%s)", settings.num_workers, "GPU" if gpu else "CPU")
    try:
        trainer.fit()
    except Exception as err:
        raise PipelineError(f"Ray Train failed: {root_cause(err)}") from err
