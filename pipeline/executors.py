"""Executors run a stage's pending shards: in-process, or on a Ray actor pool.

Both call `worker.run_shard`, so they write identical bytes. Ray runs one actor call per shard on a
pool of actors that each build the stage and call `setup()` once (a model loads once per actor). We
chose one-call-per-shard over Ray Data's `map_batches` because the shard is our unit of commit: output
names, row order and resume stay exact without re-deriving them from Ray Data's block boundaries.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import RayConfig
from pipeline.errors import PipelineError
from pipeline.registry import get_stage
from pipeline.stage import Resources, Stage, StageConfig, StageContext
from pipeline.worker import ShardResult, ShardTask, run_shard

log = logging.getLogger("mfpo")


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to build a stage: picklable, no live objects."""

    name: str
    config: StageConfig
    context: StageContext
    prepared: Any = None  # the driver's prepare() result, for stages with global inputs

    def build(self) -> Stage:
        stage = get_stage(self.name)(self.config, self.context)
        stage.prepared = self.prepared
        return stage


OnResult = Callable[[ShardResult], None]
OnRows = Callable[[int], None]


class Executor(Protocol):
    name: str

    def run_stage(
        self, spec: StageSpec, tasks: Iterator[ShardTask], num_tasks: int, on_result: OnResult, on_rows: OnRows
    ) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs shards one after another in this process (debugging, tests, tiny runs)."""

    name = "local"

    def run_stage(
        self, spec: StageSpec, tasks: Iterator[ShardTask], num_tasks: int, on_result: OnResult, on_rows: OnRows
    ) -> None:
        stage: Stage | None = None
        for task in tasks:
            if stage is None:  # no setup (model loading) when nothing is pending
                stage = spec.build()
                stage.setup()
            on_result(run_shard(stage, task, on_rows))

    def close(self) -> None:
        pass


class _ShardActor:
    """Ray actor: one stage instance, set up once, runs shard after shard."""

    def __init__(self, spec: StageSpec) -> None:
        self.stage = spec.build()
        self.stage.setup()

    def run(self, task: ShardTask) -> ShardResult:
        return run_shard(self.stage, task)


class RayExecutor:
    """Runs shards on a Ray actor pool: embedded local cluster by default, or `ray.address`."""

    name = "ray"

    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self._started_here = False

    def _init(self) -> Any:
        try:
            import ray
        except ImportError as err:  # pragma: no cover - ray is a core dependency
            raise PipelineError("the ray executor needs Ray: pip install 'ray[data]==2.60.*'") from err
        if not ray.is_initialized():
            address = self.config.address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": True,
                "logging_level": logging.WARNING,
            }
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = self.config.num_cpus
                kwargs["num_gpus"] = self.config.num_gpus
            log.info("starting Ray (%s)", f"joining {address}" if address else "embedded local cluster")
            # Ray announces that token authentication is on (the secure default) on every start.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(**kwargs)
            self._started_here = True
        return ray

    def fit(self, ray: Any, res: Resources, num_tasks: int, stage: str) -> tuple[int, Resources]:
        """Actor-pool size and per-actor resources for this cluster. A stage that asks for GPUs on a
        cluster without any runs on CPU actors, with a warning, rather than waiting forever."""
        total = ray.cluster_resources()
        if res.gpus > 0 and total.get("GPU", 0) < res.gpus:
            log.warning(
                "stage %s: asks for %.2g GPU per worker but the Ray cluster has %s; running on CPU",
                stage,
                res.gpus,
                total.get("GPU", 0),
            )
            res = Resources(res.cpus, 0.0, res.batch_size, res.workers)
        if res.workers is not None:
            return max(1, min(res.workers, num_tasks)), res
        # Leave one CPU's worth for the driver: on small machines a pool that takes every core starves
        # the driver and object transfers.
        size = math.floor(max(total.get("CPU", 1) - 1, res.cpus) / res.cpus)
        if res.gpus > 0:
            size = min(size, math.floor(total["GPU"] / res.gpus))
        return max(1, min(size, num_tasks)), res

    def run_stage(
        self, spec: StageSpec, tasks: Iterator[ShardTask], num_tasks: int, on_result: OnResult, on_rows: OnRows
    ) -> None:
        if num_tasks == 0:
            return
        ray = self._init()
        res = Resources.from_config(spec.config.resources)
        size, res = self.fit(ray, res, num_tasks, spec.name)
        actor_cls = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=0)(_ShardActor)
        actors = [actor_cls.remote(spec) for _ in range(size)]
        log.info("stage %s: %d Ray actor(s), %.2g CPU / %.2g GPU each", spec.name, size, res.cpus, res.gpus)
        idle = list(actors)
        in_flight: dict[Any, Any] = {}
        pending = iter(tasks)
        exhausted = False
        try:
            while True:
                # Submit lazily, one shard per idle actor, so the driver holds only what is in flight.
                while idle and not exhausted:
                    task = next(pending, None)
                    if task is None:
                        exhausted = True
                        break
                    actor = idle.pop()
                    in_flight[actor.run.remote(task)] = actor
                if not in_flight:
                    break
                done, _ = ray.wait(list(in_flight), num_returns=1)
                ref = done[0]
                idle.append(in_flight.pop(ref))
                result: ShardResult = ray.get(ref)
                on_rows(result.rows_in)
                on_result(result)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            raise PipelineError(f"stage {spec.name}: {type(cause).__name__}: {cause}") from err
        except ray.exceptions.RayError as err:  # an actor died, e.g. its setup() failed
            raise PipelineError(f"stage {spec.name}: Ray worker failed: {err}".splitlines()[0]) from err
        finally:
            for actor in actors:
                ray.kill(actor)

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()


def make_executor(kind: str, ray_config: RayConfig) -> Executor:
    if kind == "local":
        return LocalExecutor()
    return RayExecutor(ray_config)
