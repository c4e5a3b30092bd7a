"""Multi-node MFPO training through Ray Train: the same curriculum code, run by N data-parallel workers.

Ray Train starts the workers (on any node of the cluster `run.ray.address` / `RAY_ADDRESS` points at,
or on an embedded local cluster) and sets up torch.distributed between them (NCCL on GPUs, gloo on
CPUs); inside each worker the transformers Trainer finds that process group and runs DDP. Rank 0
writes checkpoints, stage records and the final model, so `output_dir` must be on storage every node
sees.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mfpo_train.config import TrainConfig

log = logging.getLogger("mfpo")


def _worker(config: dict[str, Any]) -> None:
    from mfpo_train.trainer import train

    train(
        TrainConfig.model_validate(config["train"]),
        Path(config["dataset"]),
        Path(config["out"]),
        config["seed"],
        resume=config["resume"],
    )


def launch(
    cfg: TrainConfig, dataset: Path, out: Path, seed: int, resume: bool, address: str | None, num_cpus: int | None
) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            **({} if address else {"num_cpus": num_cpus}),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    settings = cfg.ray
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "dataset": str(dataset.resolve()),
            "out": str(out.resolve()),
            "seed": seed,
            "resume": resume,
        },
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})},
        ),
        run_config=RunConfig(name="mfpo-train", storage_path=str((out / "ray").resolve())),
    )
    log.info("train: %d Ray Train workers (%s)", settings.num_workers, "GPU" if settings.use_gpu else "CPU")
    trainer.fit()
    from mfpo_train.trainer import read_stage_records

    return read_stage_records(out)
