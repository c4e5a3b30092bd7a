"""Which shard of which stage can run now: the streaming schedule of one `run`.

The runner prepares every stage it runs (fingerprint, shards already committed, transient retries) and hands
them here grouped into passes: consecutive stages that one worker runs back to back on the same shard. A
pass's shard is ready as soon as the stage before its first pending stage has committed that shard, so a shard
moves on down the stages while others are still upstream, and a GPU pass and a CPU pass work at the same time.
A pass that starts with a stage with global inputs (bucket, which ranks every row) waits for every upstream
shard and runs the stage's `prepare()` once on the driver.

Executors ask `next_task(g)` for work for pass g and hand every finished pass to `commit()`; they know nothing
of the stages' order. Commit records are still written one per stage and shard, in stage order, so resume and
the bytes on disk are exactly what stage-by-stage execution gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.stage import Resources, Stage
from pipeline.storage import CommitRecord
from pipeline.worker import PassSpec, PassTask, ShardResult, ShardTask, StageSpec

log = logging.getLogger("mfpo")


@dataclass
class StageRun:
    """One stage's part of this run: what is committed and what is left."""

    index: int  # position among the config's stages
    name: str
    stage: Stage  # the driver's instance (paths, schema, prepare); workers build their own
    spec: StageSpec
    fingerprint: str
    num_shards: int
    committed: dict[int, CommitRecord]
    plan: pa.Table | None = None  # the source stage's planned rows
    shard_size: int = 0  # the source stage's rows per shard
    rows_expected: list[int] | None = None  # the run's first stage: input rows per shard
    started: float = field(default_factory=time.perf_counter)

    @property
    def pending(self) -> list[int]:
        return [k for k in range(self.num_shards) if k not in self.committed]


def fuse(runs: list[StageRun], enabled: bool) -> list[list[StageRun]]:
    """Consecutive stages that can share a worker pass: the same scheduling resources, no GPU (a GPU pass runs
    beside the CPU passes instead), at most one stage that loads a model (a worker never holds two), and never
    a stage with global inputs after the first (it must wait for every shard)."""
    groups: list[list[StageRun]] = []
    for run in runs:
        last = groups[-1] if groups and enabled else None
        if (
            last is not None
            and last[-1].index == run.index - 1
            and not run.stage.global_inputs
            and _scheduling(run.stage) == _scheduling(last[0].stage)
            and run.stage.resources.gpus == 0
            and not (run.stage.loads_model and any(r.stage.loads_model for r in last))
        ):
            last.append(run)
        else:
            groups.append([run])
    return groups


def _scheduling(stage: Stage) -> tuple[float, float, int | None]:
    res = stage.resources
    return (res.cpus, res.gpus, res.workers)


class Schedule:
    """The passes of one run and which of their shards are ready, handed out, committed."""

    def __init__(
        self,
        runs: list[StageRun],
        fuse_stages: bool,
        make_task: Callable[[StageRun, int], ShardTask],
        prepare: Callable[[StageRun], Any],
        commit: Callable[[StageRun, CommitRecord], None],
        progress: Any,
    ) -> None:
        self.runs = {r.name: r for r in runs}
        self.by_index = {r.index: r for r in runs}
        self.groups = fuse(runs, fuse_stages)
        self._make_task = make_task
        self._prepare = prepare
        self._commit = commit
        self._progress = progress
        self._specs: dict[int, PassSpec] = {}
        # Shards of each pass not yet handed out, in order.
        self._todo = [sorted({k for r in group for k in r.pending}) for group in self.groups]
        self._shards = [len(todo) for todo in self._todo]
        # Rows each stage is expected to see per shard: upstream's kept rows once known, else an upper bound.
        self._expected: dict[str, list[int]] = {}
        self._bars: dict[str, Any] = {}
        previous = runs[0].rows_expected if runs else None
        for run in runs:
            assert previous is not None
            expected = [run.committed[k].rows_in if k in run.committed else previous[k] for k in range(run.num_shards)]
            self._expected[run.name] = expected
            done = sum(run.committed[k].rows_in for k in run.committed)
            self._bars[run.name] = progress.add_task(run.name, total=sum(expected), completed=done)
            previous = [run.committed[k].rows_out if k in run.committed else expected[k] for k in range(run.num_shards)]

    # ------------------------------------------------------------------ what executors call
    def spec(self, g: int) -> PassSpec:
        """What workers build for pass g (after its prepare(), for a pass with global inputs)."""
        if g not in self._specs:
            self._specs[g] = PassSpec(g, tuple(r.spec for r in self.groups[g]))
        return self._specs[g]

    def resources(self, g: int) -> Resources:
        return self.groups[g][0].stage.resources

    def name(self, g: int) -> str:
        return "+".join(r.name for r in self.groups[g])

    def remaining(self, g: int) -> int:
        """Shards of pass g not handed out yet."""
        return len(self._todo[g])

    def shards(self, g: int) -> int:
        """Shards pass g has work for in this run."""
        return self._shards[g]

    def exhausted(self, g: int) -> bool:
        """Nothing more will be handed out for pass g."""
        return not self._todo[g]

    def waits_for_all(self, g: int) -> bool:
        """Pass g starts with a stage that needs every upstream row and has not had them yet."""
        return bool(self.groups[g][0].stage.global_inputs) and g not in self._specs

    def stages_with_work(self, g: int) -> list[str]:
        return [r.name for r in self.groups[g] if r.pending]

    def complete(self) -> bool:
        return all(not r.pending for r in self.runs.values())

    def next_task(self, g: int) -> PassTask | None:
        """A shard of pass g whose input is committed, with the pass's stages that still lack it; None when no
        shard of g is ready now."""
        group = self.groups[g]
        first = group[0]
        if first.stage.global_inputs and g not in self._specs:
            if not self._all_committed(first.index - 1):
                return None
            log.info("stage %s: reading every row's %s", first.name, ", ".join(first.stage.global_inputs))
            prepared = self._prepare(first)
            first.spec = StageSpec(first.spec.name, first.spec.config, first.spec.context, prepared)
            self.spec(g)
        for pos, k in enumerate(self._todo[g]):
            steps = [r for r in group if k not in r.committed]
            if self._is_committed(steps[0].index - 1, k):
                del self._todo[g][pos]
                self.spec(g)
                return PassTask(k, [self._make_task(r, k) for r in steps])
        return None

    def commit(self, results: list[ShardResult]) -> None:
        """Commit records of one finished pass, in stage order."""
        for result in results:
            run = self.runs[result.stage]
            record = result.record(run.fingerprint)
            self._commit(run, record)
            run.committed[result.shard] = record
            self._progress.advance(self._bars[run.name], result.rows_in)
            self._expected[run.name][result.shard] = result.rows_in
            for later in self.runs.values():  # later stages see at most the rows this one kept
                if later.index > run.index and result.shard not in later.committed:
                    expected = self._expected[later.name]
                    expected[result.shard] = min(expected[result.shard], result.rows_out)
                    self._progress.update(self._bars[later.name], total=sum(expected))
            if not run.pending:
                self._finished(run)

    # ------------------------------------------------------------------ helpers
    def _is_committed(self, index: int, k: int) -> bool:
        run = self.by_index.get(index)
        return run is None or k in run.committed  # a stage outside this run was checked to be done

    def _all_committed(self, index: int) -> bool:
        run = self.by_index.get(index)
        return run is None or not run.pending

    def _finished(self, run: StageRun) -> None:
        records = run.committed.values()
        reasons: dict[str, int] = {}
        for r in records:
            for kind, n in r.reasons.items():
                reasons[kind] = reasons.get(kind, 0) + n
        log.info(
            "stage %s: %d rows in, %d kept, %d quarantined%s (%.1f s)",
            run.name,
            sum(r.rows_in for r in records),
            sum(r.rows_out for r in records),
            sum(r.rows_quarantined for r in records),
            f" {dict(sorted(reasons.items()))}" if reasons else "",
            time.perf_counter() - run.started,
        )
