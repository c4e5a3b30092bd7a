"""The runner: orders stages, fingerprints them, plans shards, resumes, commits, reports.

A stage's fingerprint is a hash of its config (minus scheduling resources), its code version, the run
seed and its upstream's fingerprint: changing a stage's config invalidates it and everything after
it, nothing before. Stages run one after another; within a stage, pending shards run on the executor.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PipelineConfig
from pipeline.determinism import stable_hash
from pipeline.errors import PipelineError
from pipeline.executors import Executor, StageSpec, make_executor
from pipeline.progress import make_progress
from pipeline.registry import get_stage, run_hooks
from pipeline.stage import ALL_COLUMNS, SourceStage, Stage, StageContext
from pipeline.storage import CommitRecord, RunLayout, StageState, write_json, write_parquet
from pipeline.worker import InputPart, ShardResult, ShardTask, load_input

log = logging.getLogger("mfpo")


@dataclass
class StageStatus:
    name: str
    state: str  # done | partial | pending | stale
    fingerprint: str
    shards_done: int = 0
    num_shards: int | None = None
    rows_in: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Runner:
    def __init__(self, config: PipelineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.layout = RunLayout(config.output_dir)
        self.names = list(config.stages)
        self._executor = executor
        self._stages: dict[str, Stage] = {}
        self._fingerprints: dict[str, str] | None = None

    # ----------------------------------------------------------------------------- building blocks
    def context(self, name: str) -> StageContext:
        run = self.config.run
        return StageContext(stage=name, seed=run.seed, shard_size=run.shard_size, run_name=run.name)

    def stage(self, name: str) -> Stage:
        if name not in self._stages:
            self._stages[name] = get_stage(name)(self.config.stages[name], self.context(name))
        return self._stages[name]

    def fingerprints(self) -> dict[str, str]:
        if self._fingerprints is None:
            fps: dict[str, str] = {}
            upstream = ""
            for name in self.names:
                stage = self.stage(name)
                parts: dict[str, Any] = {
                    "stage": name,
                    "version": stage.version,
                    "config": self.config.stages[name].fingerprint_fields(),
                    "seed": self.config.run.seed,
                    "upstream": upstream,
                    "extra": stage.fingerprint_extra(),
                }
                if stage.is_source:
                    parts["shard_size"] = self.config.run.shard_size
                upstream = fps[name] = stable_hash(parts, length=16)
            self._fingerprints = fps
        return self._fingerprints

    def _executor_or_default(self) -> Executor:
        if self._executor is None:
            self._executor = make_executor(self.config.run.executor, self.config.run.ray)
        return self._executor

    # ----------------------------------------------------------------------------- status
    def status(self) -> list[StageStatus]:
        out = []
        for name, fp in self.fingerprints().items():
            state = self.layout.read_state(name)
            st = StageStatus(name=name, state="pending", fingerprint=fp)
            if state is not None and state.fingerprint != fp:
                st.state = "stale"
            elif state is not None and state.num_shards is not None:
                st.num_shards = state.num_shards
                records = self.layout.committed(name, fp, state.num_shards)
                st.shards_done = len(records)
                st.rows_in = sum(r.rows_in for r in records.values())
                st.rows_kept = sum(r.rows_out for r in records.values())
                st.rows_quarantined = sum(r.rows_quarantined for r in records.values())
                for r in records.values():
                    for k, v in r.reasons.items():
                        st.reasons[k] = st.reasons.get(k, 0) + v
                if st.shards_done == state.num_shards:
                    st.state = "done"
                elif st.shards_done:
                    st.state = "partial"
            out.append(st)
        return out

    # ----------------------------------------------------------------------------- run
    def run(self, from_stage: str | None = None, only: str | None = None, force: bool = False) -> None:
        for flag, value in (("--from", from_stage), ("--only", only)):
            if value is not None and value not in self.names:
                raise PipelineError(f"{flag} {value}: not a stage of this config ({', '.join(self.names)})")
        if from_stage and only:
            raise PipelineError("use either --from or --only, not both")
        self.layout.root.mkdir(parents=True, exist_ok=True)
        with self.layout.lock(), log_to(self.layout.log_path):
            log.info("run %s -> %s (executor: %s)", self.config.run.name, self.layout.root, self.config.run.executor)
            redo: set[str] = set()
            if from_stage:
                redo = set(self.names[self.names.index(from_stage) :])
            elif force:
                redo = {only} if only else set(self.names)
            progress = make_progress(self.config.run.progress)
            try:
                with progress:
                    for i, name in enumerate(self.names):
                        if only and name != only:
                            continue
                        if i > 0:
                            self._require_done(self.names[i - 1], name)
                        self._run_stage(i, name, reset=name in redo, progress=progress)
            finally:
                if self._executor is not None:
                    self._executor.close()
            self._write_summary()
            self._run_hooks()

    def _run_hooks(self) -> None:
        statuses = self.status()
        for name, hook in run_hooks().items():
            started = time.perf_counter()
            try:
                hook(self.config, self.layout.root, statuses)
            except PipelineError:
                raise
            except Exception as err:
                raise PipelineError(f"{name} (after the stages): {type(err).__name__}: {err}") from err
            log.debug("run hook %s: %.1f s", name, time.perf_counter() - started)

    def _require_done(self, upstream: str, name: str) -> None:
        st = next(s for s in self.status() if s.name == upstream)
        if st.state != "done":
            raise PipelineError(
                f"stage {name} needs {upstream}, which is {st.state}; run without --only (or --from {upstream})"
            )

    def _run_stage(self, index: int, name: str, reset: bool, progress: Any) -> None:
        stage = self.stage(name)
        fp = self.fingerprints()[name]
        state = self.layout.read_state(name)
        if reset or state is None or state.fingerprint != fp:
            if state is not None:
                log.info("stage %s: %s; clearing its outputs", name, "redo requested" if reset else "config changed")
            self.layout.reset_stage(name, stage.output_root())
            state = None
        self.layout.sweep_temp_files(name, stage.output_root())

        plan: pa.Table | None = None
        if isinstance(stage, SourceStage):
            plan = self._plan(stage, fp, state)
            num_shards = max(1, math.ceil(plan.num_rows / self.config.run.shard_size))
        else:
            upstream_state = self.layout.read_state(self.names[index - 1])
            assert upstream_state is not None and upstream_state.num_shards is not None
            num_shards = upstream_state.num_shards
        if state is None:
            write_json(self.layout.state_path(name), asdict(StageState(fp, num_shards)))

        done = self.layout.committed(name, fp, num_shards)
        pending = [k for k in range(num_shards) if k not in done]
        rows_of = self._rows_per_shard(index, num_shards, plan)
        task_id = progress.add_task(name, total=sum(rows_of), completed=sum(rows_of[k] for k in done))
        started = time.perf_counter()
        if pending:
            log.info("stage %s: %d of %d shard(s) to do (fingerprint %s)", name, len(pending), num_shards, fp)
        else:
            log.info("stage %s: all %d shard(s) already done", name, num_shards)

        def on_result(result: ShardResult) -> None:
            self.layout.commit(name, CommitRecord(fingerprint=fp, **asdict(result)))
            log.debug(
                "stage %s: committed shard %d (%d kept, %d quarantined)",
                name,
                result.shard,
                result.rows_out,
                result.rows_quarantined,
            )

        prepared = None
        if stage.global_inputs and pending:
            everything = self._tasks(
                index, name, stage, list(range(num_shards)), num_shards, None, rows_of, columns=stage.global_inputs
            )
            prepared = stage.prepare(pa.concat_tables(load_input(t) for t in everything))
        spec = StageSpec(name, self.config.stages[name], self.context(name), prepared)
        tasks = self._tasks(index, name, stage, pending, num_shards, plan, rows_of)
        self._executor_or_default().run_stage(
            spec, tasks, len(pending), on_result, lambda n: progress.advance(task_id, n)
        )
        st = next(s for s in self.status() if s.name == name)
        if st.state != "done":
            raise PipelineError(f"stage {name}: only {st.shards_done} of {num_shards} shards committed")
        stage.finalize(str(self.layout.root), self._summary())
        elapsed = time.perf_counter() - started
        log.info(
            "stage %s: %d rows in, %d kept, %d quarantined%s (%.1f s)",
            name,
            st.rows_in,
            st.rows_kept,
            st.rows_quarantined,
            f" {st.reasons}" if st.reasons else "",
            elapsed,
        )

    def _plan(self, stage: SourceStage, fp: str, state: StageState | None) -> pa.Table:
        path = self.layout.plan_path(stage.name)
        if state is not None and path.exists():
            return pq.read_table(path)
        log.info("stage %s: planning input rows", stage.name)
        stage.setup()
        plan = stage.plan()
        if "sample_id" not in plan.column_names:
            raise PipelineError(f"stage {stage.name}: plan() must return a sample_id column")
        write_parquet(path, plan)
        return plan

    def _rows_per_shard(self, index: int, num_shards: int, plan: pa.Table | None) -> list[int]:
        if plan is not None:
            size = self.config.run.shard_size
            return [min(size, max(plan.num_rows - k * size, 0)) for k in range(num_shards)]
        upstream = self.names[index - 1]
        records = self.layout.committed(upstream, self.fingerprints()[upstream], num_shards)
        return [records[k].rows_out for k in range(num_shards)]

    def _tasks(
        self,
        index: int,
        name: str,
        stage: Stage,
        pending: list[int],
        num_shards: int,
        plan: pa.Table | None,
        rows_of: list[int],
        columns: tuple[str, ...] | None = None,
    ) -> Iterator[ShardTask]:
        root = self.layout.root.resolve()
        producers = self._producers(index)
        wanted = list(columns) if columns else list(producers) if stage.inputs == ALL_COLUMNS else list(stage.inputs)
        for k in pending:
            task = ShardTask(
                shard=k,
                num_shards=num_shards,
                rows_in=rows_of[k],
                output=str(root / stage.output_path(k, num_shards)),
                quarantine=str(self.layout.quarantine_path(name, k).resolve()),
                columns=tuple(wanted),
            )
            if plan is not None:
                size = self.config.run.shard_size
                task.plan = plan.slice(k * size, size)
            else:
                previous = self.stage(self.names[index - 1])
                task.survivors = str(root / previous.output_path(k, num_shards))
                by_stage: dict[str, list[str]] = {}
                for col in wanted:
                    by_stage.setdefault(producers[col], []).append(col)
                task.parts = [
                    InputPart(str(root / self.stage(p).output_path(k, num_shards)), tuple(cols))
                    for p, cols in by_stage.items()
                ]
            yield task

    def _producers(self, index: int) -> dict[str, str]:
        """Column -> the latest stage before `index` that produces it, in production order."""
        producers: dict[str, str] = {}
        for name in self.names[:index]:
            for col in self.stage(name).outputs:
                producers.pop(col, None)
                producers[col] = name
        return producers

    def _summary(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "stages": [asdict(s) for s in self.status()]}

    def _write_summary(self) -> None:
        write_json(self.layout.root / "summary.json", self._summary())


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield
    except Exception:
        log.exception("run failed")
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
