"""Executors run a run's passes (see pipeline.schedule): in-process, or on Ray actor pools.

Both call `worker.run_pass`, so they write identical bytes. Ray runs one actor call per pass and shard on a
pool of actors per pass, each of which builds the pass's stages and sets each up once, on first use (a model
loads once per actor). Pools of different passes run at the same time, as far as the cluster's resources
allow: a shard committed upstream is handed to the next pass at once. We chose one call per shard over Ray
Data's `map_batches` because the shard is our unit of commit: output names, row order and resume stay exact
without re-deriving them from Ray Data's block boundaries.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.config import RayConfig
from pipeline.errors import PipelineError, failed_stage, first_line
from pipeline.schedule import Schedule
from pipeline.stage import NO_GPU_REPORTED, Resources, Stage
from pipeline.worker import PassSpec, PassTask, ShardResult, run_pass

log = logging.getLogger("mfpo")


class Executor(Protocol):
    name: str

    def cpus(self) -> int:
        """CPUs the run can use (the automatic shard size keeps them all busy)."""
        ...

    def run(self, schedule: Schedule) -> None: ...

    def close(self) -> None: ...


def machine_cpus() -> int:
    """This machine's CPUs as Ray counts them by default (this process's CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class _PassStages:
    """A worker's instances of one pass's stages, each built and set up when first needed (a stage with
    nothing left to do on resume loads nothing)."""

    def __init__(self, spec: PassSpec) -> None:
        self.spec = spec
        self.stages: dict[str, Stage] = {}

    def __call__(self, name: str) -> Stage:
        if name not in self.stages:
            stage = self.spec.stage(name).build()
            stage.setup()
            self.stages[name] = stage
        return self.stages[name]

    def teardown(self) -> None:
        for stage in self.stages.values():
            stage.teardown()
        self.stages.clear()


class LocalExecutor:
    """Runs passes one shard after another in this process (debugging, tests, tiny runs): pass by pass, so one
    pass's models are released before the next loads its own."""

    name = "local"

    def cpus(self) -> int:
        return machine_cpus()  # the same automatic shard size, so the same bytes, as the default Ray cluster

    def run(self, schedule: Schedule) -> None:
        for g in range(len(schedule.groups)):
            stages: _PassStages | None = None
            try:
                while (task := schedule.next_task(g)) is not None:
                    stages = stages or _PassStages(schedule.spec(g))
                    schedule.commit(run_pass(stages, task))
            finally:
                if stages is not None:
                    stages.teardown()
        if not schedule.complete():
            raise PipelineError("the run stopped with shards left that nothing could start (a bug: see run.log)")

    def close(self) -> None:
        pass


class _ShardActor:
    """Ray actor: one pass's stages, each set up once, running shard after shard. An exception (in setup() too)
    is raised by run(), so Ray reports it as the task's error with its real type and message."""

    def __init__(self, spec: PassSpec, gpus: float) -> None:
        if gpus == 0:
            # The driver has said once for the run that these workers get no GPU (RayExecutor.fit); the stages
            # need not say it again from every actor.
            os.environ[NO_GPU_REPORTED] = "1"
        self.stages = _PassStages(spec)

    def setup(self, names: list[str]) -> None:
        """Build and set up these stages ahead of their first shard. A failure is left for run() to raise again
        and report: nothing waits on this call."""
        for name in names:
            with contextlib.suppress(Exception):
                self.stages(name)

    def run(self, task: PassTask) -> list[ShardResult]:
        return run_pass(self.stages, task)

    def teardown(self) -> None:
        self.stages.teardown()


@dataclass
class _Pool:
    actors: list[Any]
    actor_cls: Any
    res: Resources
    idle: list[Any] = field(default_factory=list)

    @property
    def held(self) -> tuple[float, float]:
        """(CPUs, GPUs) its actors hold, all together."""
        return len(self.actors) * self.res.cpus, len(self.actors) * self.res.gpus


def _held(pools: list[_Pool]) -> tuple[float, float]:
    return sum(p.held[0] for p in pools), sum(p.held[1] for p in pools)


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
                # Ray colours its de-duplication notes ("[repeated 2x across cluster]") whatever the stream:
                # colorama strips ANSI codes from what this process writes to stdout and stderr.
                import colorama

                colorama.init(strip=True, convert=False)
            log.info("starting Ray (%s)", f"joining {address}" if address else "embedded local cluster")
            # Ray announces that token authentication is on (the secure default) on every start.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(**kwargs)
            self._started_here = True
        return ray

    def fit(
        self, ray: Any, res: Resources, num_tasks: int, stage: str, reserved: tuple[float, float] = (0.0, 0.0)
    ) -> tuple[int, Resources]:
        """Actor-pool size and per-actor resources for this cluster, beside pools already holding `reserved`
        (CPUs, GPUs): at least one actor, so a pass never waits for another's pool to be released. A stage that
        asks for GPUs on a cluster without any runs on CPU actors, with a warning, rather than waiting forever."""
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
        size = math.floor(max(total.get("CPU", 1) - reserved[0] - 1, res.cpus) / res.cpus)
        if res.gpus > 0:
            size = min(size, math.floor(max(total["GPU"] - reserved[1], res.gpus) / res.gpus))
        return max(1, min(size, num_tasks)), res

    @staticmethod
    def _fits(ray: Any, res: Resources, pools: dict[int, _Pool]) -> bool:
        """Whether one more actor with `res` can be placed now, beside the actors of `pools`. A pool is started
        ahead of its work only then: an actor Ray cannot place waits for freed resources, and Ray does not hand
        them out in pass order, so downstream actors idling on their input could take every CPU an upstream
        pass still needs (on 2 CPUs, segment waited forever while perturb's and score's actors held both)."""
        total = ray.cluster_resources()
        cpus, gpus = _held(list(pools.values()))
        need_gpus = res.gpus if total.get("GPU", 0) >= res.gpus else 0.0  # fit() runs those on CPU
        return total.get("CPU", 0) - cpus >= res.cpus - 1e-9 and total.get("GPU", 0) - gpus >= need_gpus - 1e-9

    def cpus(self) -> int:
        address = self.config.address or os.environ.get("RAY_ADDRESS")
        if address:
            return max(1, int(self._init().cluster_resources().get("CPU", 1)))
        return self.config.num_cpus or machine_cpus()

    def _pool(self, ray: Any, schedule: Schedule, g: int, others: list[_Pool]) -> _Pool:
        name = schedule.name(g)
        size, res = self.fit(ray, schedule.resources(g), schedule.shards(g), name, _held(others))
        # A worker process that dies mid-shard (OOM killer, preempted node, kill -9) is restarted and its shard
        # run again, a bounded number of times: a shard's output depends on its input only, and is written
        # atomically, so the retry gives the same bytes.
        retries = self.config.max_retries
        actor_cls = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=retries, max_task_retries=retries)(
            _ShardActor
        )
        pool = _Pool([], actor_cls=actor_cls, res=res)
        self._add_actors(schedule, g, pool, size)
        log.info("stage %s: %d Ray actor(s), %.2g CPU / %.2g GPU each", name, size, res.cpus, res.gpus)
        return pool

    @staticmethod
    def _add_actors(schedule: Schedule, g: int, pool: _Pool, n: int) -> None:
        for _ in range(n):
            actor = pool.actor_cls.remote(schedule.spec(g), pool.res.gpus)
            actor.setup.remote(schedule.stages_with_work(g))  # now, so that its first shard does not wait for it
            pool.actors.append(actor)
            pool.idle.append(actor)

    def _grow(self, ray: Any, schedule: Schedule, pools: dict[int, _Pool]) -> None:
        """After a pool is released, passes still at work take what it held: a pass whose pool started small
        beside its upstream's grows to what the cluster now leaves it (upstream passes first)."""
        for g, pool in sorted(pools.items()):
            if schedule.exhausted(g) or pool.res.workers is not None:
                continue
            others = [p for k, p in pools.items() if k != g]
            size, _ = self.fit(ray, pool.res, schedule.remaining(g) + len(pool.actors), schedule.name(g), _held(others))
            if size > len(pool.actors):
                log.info("stage %s: %d more Ray actor(s)", schedule.name(g), size - len(pool.actors))
                self._add_actors(schedule, g, pool, size - len(pool.actors))

    def run(self, schedule: Schedule) -> None:
        ray: Any = None
        pools: dict[int, _Pool] = {}
        in_flight: dict[Any, tuple[int, Any, PassTask]] = {}
        started: set[int] = set()
        current = ""
        try:
            while True:
                # Downstream passes first: a shard leaves the run as early as possible, and what is in flight
                # (the driver holds only that) stays bounded by the pools' sizes.
                for g in reversed(range(len(schedule.groups))):
                    while g not in pools or pools[g].idle:
                        if g not in pools and in_flight and not self._fits(ray, schedule.resources(g), pools):
                            break  # its pool starts once another is released (see _fits)
                        task = schedule.next_task(g)
                        if task is None:
                            break
                        if g not in pools:  # Ray starts only when there is work: a resume with none starts nothing
                            ray = ray or self._init()
                            pools[g] = self._pool(ray, schedule, g, list(pools.values()))
                            started.add(g)
                        actor = pools[g].idle.pop()
                        in_flight[actor.run.remote(task)] = (g, actor, task)
                    # The next pass's workers start (and load their models) while this pass works on its first
                    # shards, rather than after.
                    after = g + 1
                    if (
                        g in started
                        and after < len(schedule.groups)
                        and after not in started
                        and (not schedule.exhausted(after) and not schedule.waits_for_all(after))
                        and self._fits(ray, schedule.resources(after), pools)
                    ):
                        pools[after] = self._pool(ray, schedule, after, list(pools.values()))
                        started.add(after)
                finished = [g for g in pools if schedule.exhausted(g) and all(f[0] != g for f in in_flight.values())]
                for g in finished:
                    self._release(ray, pools.pop(g).actors)
                if finished:
                    self._grow(ray, schedule, pools)
                if not in_flight:
                    break
                done, _ = ray.wait(list(in_flight), num_returns=1)
                g, actor, task = in_flight.pop(done[0])
                current = schedule.name(g)
                pools[g].idle.append(actor)
                schedule.commit(ray.get(done[0]))
        except ray_errors() as err:
            raise translate(err, current, self.config.max_retries) from err
        finally:
            for pool in pools.values():
                self._release(ray, pool.actors)
        if not schedule.complete():
            raise PipelineError("the run stopped with shards left that nothing could start (a bug: see run.log)")

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


def ray_errors() -> tuple[type[BaseException], ...]:
    """Ray's exception base, without importing Ray when it is not installed or not started."""
    ray = sys.modules.get("ray")
    return (ray.exceptions.RayError,) if ray is not None else ()


def translate(err: BaseException, current: str, retries: int) -> PipelineError:
    """A Ray error as one line naming the stage and the real cause."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        cause = _cause(err)
        return PipelineError(f"stage {failed_stage(cause) or current}: {root_cause(err)}")
    if isinstance(err, ray.exceptions.RayActorError):
        return PipelineError(
            f"stage {current}: a Ray worker process died {retries + 1} time(s) running one shard "
            f"({first_line(err)}); see run.log and the Ray logs of its node"
        )
    return PipelineError(f"stage {current}: Ray: {first_line(err)}")


def _cause(err: BaseException) -> BaseException:
    cause: BaseException = err
    while getattr(cause, "cause", None) is not None and cause is not cause.cause:  # type: ignore[attr-defined]
        cause = cause.cause  # type: ignore[attr-defined]
    return cause


def root_cause(err: BaseException) -> str:
    """One line naming the real error inside Ray's wrappers: `PipelineError` messages as they are, anything
    else as `Type: message`."""
    cause = _cause(err)
    if isinstance(cause, PipelineError):
        return first_line(cause)
    return f"{type(cause).__name__}: {first_line(cause)}"


def make_executor(kind: str, ray_config: RayConfig) -> Executor:
    if kind == "local":
        return LocalExecutor()
    return RayExecutor(ray_config)
