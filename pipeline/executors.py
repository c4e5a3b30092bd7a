"""Executors run a stage's pending shards: in-process, or on a Ray actor pool.

Both call `worker.run_shard`, so they write identical bytes. Ray runs one actor call per shard on a
pool of actors that each build the stage and call `setup()` once (a model loads once per actor). We
chose one-call-per-shard over Ray Data's `map_batches` because the shard is our unit of commit: output
names, row order and resume stay exact without re-deriving them from Ray Data's block boundaries.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import RayConfig
from pipeline.errors import PipelineError, first_line
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
        try:
            for task in tasks:
                if stage is None:  # no setup (model loading) when nothing is pending
                    stage = spec.build()
                    stage.setup()
                on_result(run_shard(stage, task, on_rows))
        finally:
            if stage is not None:
                stage.teardown()

    def close(self) -> None:
        pass


class _ShardActor:
    """Ray actor: one stage instance, set up once, runs shard after shard.

    An exception in setup() is kept and raised by run(): Ray then reports it as the task's error, with
    its real type and message, instead of "the actor died because of an error raised in its creation
    task" (and does not restart an actor whose setup can only fail again)."""

    def __init__(self, spec: StageSpec) -> None:
        self.error: Exception | None = None
        self.stage: Stage | None = None
        try:
            self.stage = spec.build()
            self.stage.setup()
        except Exception as err:
            self.error = err

    def run(self, task: ShardTask) -> ShardResult:
        if self.error is not None:
            raise self.error
        assert self.stage is not None
        return run_shard(self.stage, task)

    def teardown(self) -> None:
        if self.stage is not None and self.error is None:
            self.stage.teardown()


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
            if not sys.stderr.isatty() or os.environ.get("NO_COLOR"):
                os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # worker lines forwarded without ANSI colour codes
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
        # A worker process that dies mid-shard (OOM killer, preempted node, kill -9) is restarted and its shard
        # run again, a bounded number of times: a shard's output depends on its input only, and is written
        # atomically, so the retry gives the same bytes.
        retries = self.config.max_retries
        actor_cls = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=retries, max_task_retries=retries)(
            _ShardActor
        )
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
            raise PipelineError(f"stage {spec.name}: {root_cause(err)}") from err
        except ray.exceptions.RayActorError as err:
            raise PipelineError(
                f"stage {spec.name}: a Ray worker process died {retries + 1} time(s) running one shard "
                f"({first_line(err)}); see run.log and the Ray logs of its node"
            ) from err
        except ray.exceptions.RayError as err:
            raise PipelineError(f"stage {spec.name}: Ray: {first_line(err)}") from err
        finally:
            self._release(ray, actors)

    @staticmethod
    def _release(ray: Any, actors: list[Any]) -> None:
        """teardown() on every actor still alive (worker subprocesses, sockets), then free them."""
        with contextlib.suppress(Exception):
            ray.wait([a.teardown.remote() for a in actors], num_returns=len(actors), timeout=30)
        for actor in actors:
            ray.kill(actor)

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()


def root_cause(err: BaseException) -> str:
    """One line naming the real error inside Ray's wrappers: `PipelineError` messages as they are, anything
    else as `Type: message`."""
    cause: BaseException = err
    while getattr(cause, "cause", None) is not None and cause is not cause.cause:  # type: ignore[attr-defined]
        cause = cause.cause  # type: ignore[attr-defined]
    if isinstance(cause, PipelineError):
        return first_line(cause)
    return f"{type(cause).__name__}: {first_line(cause)}"


def make_executor(kind: str, ray_config: RayConfig) -> Executor:
    if kind == "local":
        return LocalExecutor()
    return RayExecutor(ray_config)
