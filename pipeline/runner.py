"""The runner: orders stages, fingerprints them, plans shards, resumes, commits, reports.

A stage's fingerprint is a hash of its config (minus scheduling resources), its code version, the run
seed and its upstream's fingerprint: changing a stage's config invalidates it and everything after
it, nothing before. Stages run one after another; within a stage, pending shards run on the executor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.compact import compact, complete
from pipeline.config import PipelineConfig
from pipeline.determinism import stable_hash
from pipeline.errors import ConfigError, PipelineError, describe_os_error, failed_stage, in_stage
from pipeline.executors import Executor, make_executor
from pipeline.progress import make_progress
from pipeline.registry import get_stage, run_hooks
from pipeline.schedule import Schedule, StageRun
from pipeline.stage import ALL_COLUMNS, SourceStage, Stage, StageContext
from pipeline.storage import CommitRecord, RunLayout, StageState, Store, nested
from pipeline.worker import InputPart, ShardTask, StageSpec, load_input

log = logging.getLogger("mfpo")
# What end-of-run hooks (the dataset card) read from the run: synced locally when the run is on an object store.
HOOK_INPUTS = ("dataset", "quarantine", "ingest")
# Quarantine reason kind of rows that failed on a transient error (an endpoint's 503): retried on the next run.
TRANSIENT = "transient"
# run.shard_size auto: shards per CPU of the cluster, and the bounds on rows per shard (see Runner._shard_size).
SHARDS_PER_CPU = 32
MIN_AUTO_SHARD = 1
MAX_AUTO_SHARD = 256


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
    why: str = ""  # stale: what changed since its files were made


def what_changed(stage: str, old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between the fingerprint inputs a stage's files were made with and this config's, in a few
    words (config keys first: `stages.ingest.limit: 12 -> null`)."""
    if not old:
        return "made by an older version of the pipeline"
    a, b = _flat(old.get("config") or {}), _flat(new.get("config") or {})
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if keys:
        shown = "; ".join(f"stages.{stage}.{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in keys[:3])
        return shown + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")
    for key, label in (("seed", "run.seed"), ("shard_size", "run.shard_size")):
        if old.get(key) != new.get(key):
            return f"{label}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
    if old.get("version") != new.get("version"):
        return f"the stage's code changed (version {old.get('version')} -> {new.get('version')})"
    if old.get("extra") != new.get("extra"):
        return "its input changed (e.g. the source files' content)"
    return "an earlier stage changed"


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def not_ready(statuses: list[StageStatus], config_path: str = "CONFIG") -> str | None:
    """Why the dataset on disk is not this config's, with what to do; None when every stage is done. A stale
    stage names what changed: a config given without the run's `--set` overrides reads as another config, and
    "run it first" would then redo everything from that stage on."""
    pending = [s for s in statuses if s.state != "done"]
    if not pending:
        return None
    first = pending[0]
    redo = ", ".join(s.name for s in pending)
    if first.state == "stale":
        after = ", and so is every stage after it" if first is not statuses[-1] else ""
        return (
            f"stage {first.name} is stale ({first.why or 'its config changed'}){after}: if the dataset was made "
            f"with --set overrides, give the same ones here; `python -m pipeline run {config_path}` would redo {redo}"
        )
    done = f"{first.shards_done} of {first.num_shards} shards" if first.num_shards else "not started"
    if first.num_shards and first.shards_done == first.num_shards:
        done = "every shard done, its final files not yet written"
    return f"stage {first.name} is {first.state} ({done}): `python -m pipeline run {config_path}` runs {redo}"


class Runner:
    def __init__(self, config: PipelineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.layout = RunLayout(config.output_location)
        self.names = list(config.stages)
        self._executor = executor
        self._stages: dict[str, Stage] = {}
        self._fingerprints: dict[str, str] | None = None
        self._inputs: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------- building blocks
    def context(self, name: str) -> StageContext:
        run = self.config.run
        return StageContext(stage=name, seed=run.seed, run_name=run.name)

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
                # Recorded with the stage's files: the config as it was, the rest as hashes (a source's file list).
                self._inputs[name] = {**parts, "extra": stable_hash(parts["extra"], length=16)}
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
                st.why = what_changed(name, state.inputs, self._inputs[name])
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
                    st.state = "done" if self._final_files_done(name, fp, records) else "partial"
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
        self._check_locations()
        try:
            self.layout.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(
                f"run.output_dir: cannot create {describe_os_error(err)}; choose a folder this user can write"
            ) from err
        with self.layout.lock(), log_to(self.layout.log_path, self.layout.store):
            log.info(
                "run %s -> %s (executor: %s)", self.config.run.name, self.layout.location, self.config.run.executor
            )
            redo: set[str] = set()
            if from_stage:
                redo = set(self.names[self.names.index(from_stage) :])
            elif force:
                redo = {only} if only else set(self.names)
            self.layout.sweep_run_temp_files()
            selected = [n for n in self.names if not only or n == only]
            self._check(selected)
            if only and self.names.index(only) > 0:
                self._require_done(self.names[self.names.index(only) - 1], only)
            progress = make_progress(self.config.run.progress)
            try:
                with progress:
                    runs: list[StageRun] = []
                    for name in selected:
                        with in_stage(name):
                            runs.append(self._prepare_stage(name, name in redo, runs[-1] if runs else None))
                    schedule = Schedule(
                        runs,
                        self.config.run.fuse_stages,
                        self._shard_task,
                        self._prepare_global,
                        self._commit,
                        progress,
                    )
                    if len(schedule.groups) < len(runs):
                        log.info("passes: %s", " | ".join(schedule.name(g) for g in range(len(schedule.groups))))
                    if not schedule.complete():
                        self._executor_or_default().run(schedule)
                for run in runs:
                    self._write_final_files(run)
            except OSError as err:  # the store: a full disk, a read-only folder, a lost bucket
                where = failed_stage(err)
                message = describe_os_error(err)
                raise PipelineError(f"stage {where}: {message}" if where else message) from err
            finally:
                if self._executor is not None:
                    self._executor.close()
            for st in self.status():
                if st.name in selected and st.state != "done":
                    raise PipelineError(f"stage {st.name}: only {st.shards_done} of {st.num_shards} shards committed")
            self._write_summary()
            last = self.status()[-1]
            if last.rows_kept == 0 and last.state == "done":
                log.info("run: no rows came out of %s; no dataset card or other end-of-run products", last.name)
                return
            self._run_hooks()

    def _final_files_done(self, name: str, fp: str, records: dict[int, CommitRecord]) -> bool:
        stage = self.stage(name)
        return stage.final_files(len(records)) is None or complete(self.layout.store, name, _final_key(fp, records))

    def _write_final_files(self, run: StageRun) -> None:
        """A stage whose shards are all committed writes its final files (pipeline.compact), once for the
        shards' current contents (a shard redone with other rows, e.g. after a transient failure, redoes them)."""
        spec = run.stage.final_files(run.num_shards)
        if spec is None:
            return
        records = self.layout.committed(run.name, run.fingerprint, run.num_shards)
        if len(records) < run.num_shards:
            return  # reported below as a partial stage
        key = _final_key(run.fingerprint, records)
        if complete(self.layout.store, run.name, key):
            return
        with in_stage(run.name):
            started = time.perf_counter()
            compact(self.layout.store, spec, run.name, key)
            log.info("stage %s: final files written in %.1f s", run.name, time.perf_counter() - started)

    def _check_locations(self) -> None:
        """The run's output folder apart from everything a stage reads: checked before anything is created."""
        output = self.layout.location
        for name in self.names:
            for location in self.stage(name).reads_from():
                where = nested(output, location)
                if where:
                    relation, why = (
                        ("is inside", "the run would read its own output")
                        if where == "inside"
                        else ("holds", "a redo would delete it")
                    )
                    raise ConfigError(
                        f"run.output_dir: {output} {relation} {location}, which stage {name} reads ({why}); "
                        "choose an output folder outside it"
                    )

    def _check(self, names: list[str]) -> None:
        """What would fail on every worker (a missing package or model directory) fails here, before Ray starts
        and before any work is done, in one line."""
        problems = [p for name in names for p in self.stage(name).check()]
        if problems:
            raise PipelineError("; ".join(dict.fromkeys(problems)))

    def _run_hooks(self) -> None:
        statuses = self.status()
        hooks = run_hooks()
        if not hooks:
            return
        # Hooks read and write a local folder: on an object store, a synced local view of the run.
        with self.layout.store.local_view(HOOK_INPUTS) as root:
            for name, hook in hooks.items():
                started = time.perf_counter()
                try:
                    hook(self.config, root, statuses)
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

    def _prepare_stage(self, name: str, reset: bool, upstream: StageRun | None) -> StageRun:
        """A stage's part of this run: its files checked against its fingerprint (cleared when stale or redone),
        its shards, what is committed, and shards that had transient failures withdrawn for another try."""
        index = self.names.index(name)
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
        shard_size = 0
        if isinstance(stage, SourceStage):
            plan = self._plan(stage, fp, state)
            shard_size = self._shard_size(plan.num_rows, state)
            num_shards = max(1, math.ceil(plan.num_rows / shard_size))
        elif upstream is not None:
            num_shards = upstream.num_shards
        else:  # --only: the stage before it is done
            upstream_state = self.layout.read_state(self.names[index - 1])
            assert upstream_state is not None and upstream_state.num_shards is not None
            num_shards = upstream_state.num_shards
        if state is None:
            self.layout.write_state(name, StageState(fp, num_shards, shard_size or None, self._inputs[name]))

        done = self.layout.committed(name, fp, num_shards)
        retry = sorted(k for k, rec in done.items() if TRANSIENT in rec.reasons)
        if retry:
            log.info("stage %s: %d shard(s) had rows fail on transient errors; running them again", name, len(retry))
            self._invalidate(index, retry, num_shards)
            done = {k: rec for k, rec in done.items() if k not in retry}
        pending = num_shards - len(done)
        if pending:
            log.info("stage %s: %d of %d shard(s) to do (fingerprint %s)", name, pending, num_shards, fp)
        else:
            log.info("stage %s: all %d shard(s) already done", name, num_shards)
        spec = StageSpec(name, self.config.stages[name], self.context(name))
        run = StageRun(index, name, stage, spec, fp, num_shards, done, plan, shard_size)
        if upstream is None:  # the first stage of this run: rows it will see per shard (later stages: the schedule)
            run.rows_expected = self._rows_per_shard(run)
        return run

    def _rows_per_shard(self, run: StageRun) -> list[int]:
        """Input rows per shard of a run's first stage: its slices of the plan, or what the stage before it kept."""
        if run.plan is not None:
            size = run.shard_size
            return [min(size, max(run.plan.num_rows - k * size, 0)) for k in range(run.num_shards)]
        upstream = self.names[run.index - 1]
        records = self.layout.committed(upstream, self.fingerprints()[upstream], run.num_shards)
        return [records[k].rows_out for k in range(run.num_shards)]

    def _shard_size(self, rows: int, state: StageState | None) -> int:
        """`run.shard_size`, or for auto the size recorded when these rows were planned, or a new choice: about
        SHARDS_PER_CPU shards per CPU (every worker busy, a short tail when the last shards finish: on 2 CPUs, 100
        rows of 2.5 s each ran 1.74x the loop's speed with 4-row shards, 1.82x with 2-row ones), within
        [MIN_AUTO_SHARD, MAX_AUTO_SHARD] rows (a worker's memory above)."""
        configured = self.config.run.shard_size
        if configured != "auto":
            return configured
        if state is not None and state.shard_size:
            return state.shard_size
        cpus = self._executor_or_default().cpus()
        size = min(MAX_AUTO_SHARD, max(MIN_AUTO_SHARD, math.ceil(rows / (SHARDS_PER_CPU * cpus))))
        log.info("run.shard_size auto: %d rows per shard (%d rows, %d CPUs)", size, rows, cpus)
        return size

    def _commit(self, run: StageRun, record: CommitRecord) -> None:
        with in_stage(run.name):
            self.layout.commit(run.name, record)
        log.debug(
            "stage %s: committed shard %d (%d kept, %d quarantined)",
            run.name,
            record.shard,
            record.rows_out,
            record.rows_quarantined,
        )

    def _prepare_global(self, run: StageRun) -> Any:
        """The driver's prepare() of a stage with global inputs, on those columns of every upstream row."""
        everything = [self._shard_task(run, k, columns=run.stage.global_inputs) for k in range(run.num_shards)]
        return run.stage.prepare(pa.concat_tables(load_input(t) for t in everything))

    def _invalidate(self, index: int, shards: list[int], num_shards: int) -> None:
        """Withdraw the commits of these shards at stage `index` and of what later stages made from them (all
        shards of a stage that ranks every row, and after it), last stage first: a kill in between leaves
        the earlier records, which lead here again."""
        affected: dict[str, list[int]] = {}
        wanted = list(shards)
        for name in self.names[index + 1 :]:
            if self.stage(name).global_inputs:
                wanted = list(range(num_shards))
            affected[name] = wanted
        for name in reversed(list(affected)):
            for k in affected[name]:
                self.layout.store.remove(self.layout.commit_path(name, k))
        for k in shards:
            self.layout.store.remove(self.layout.commit_path(self.names[index], k))

    def _plan(self, stage: SourceStage, fp: str, state: StageState | None) -> pa.Table:
        path = self.layout.plan_path(stage.name)
        if state is not None and self.layout.store.exists(path):
            return self.layout.store.read_parquet(path)
        log.info("stage %s: planning input rows", stage.name)
        stage.setup()
        plan = stage.plan()
        if "sample_id" not in plan.column_names:
            raise PipelineError(f"stage {stage.name}: plan() must return a sample_id column")
        self.layout.store.write_parquet(path, plan)
        return plan

    def _shard_task(self, run: StageRun, k: int, columns: tuple[str, ...] | None = None) -> ShardTask:
        """What a worker needs to run shard k of a stage: its slice of the plan, or the upstream files to read."""
        producers = self._producers(run.index)
        stage = run.stage
        wanted = list(columns) if columns else list(producers) if stage.inputs == ALL_COLUMNS else list(stage.inputs)
        task = ShardTask(
            stage=run.name,
            shard=k,
            num_shards=run.num_shards,
            store=self.layout.store,
            quarantine=self.layout.quarantine_path(run.name, k),
            columns=tuple(wanted),
        )
        if run.plan is not None:
            task.plan = run.plan.slice(k * run.shard_size, run.shard_size)
        else:
            previous = self.stage(self.names[run.index - 1])
            task.survivors = previous.output_path(k, run.num_shards)
            by_stage: dict[str, list[str]] = {}
            for col in wanted:
                by_stage.setdefault(producers[col], []).append(col)
            task.parts = [
                InputPart(self.stage(p).output_path(k, run.num_shards), tuple(cols)) for p, cols in by_stage.items()
            ]
        return task

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
        self.layout.store.write_json("summary.json", self._summary())


def _final_key(fingerprint: str, records: dict[int, CommitRecord]) -> str:
    """What a stage's final files are made from: its fingerprint and the bytes of every committed shard."""
    return stable_hash([fingerprint, *(records[k].data_sha256 for k in sorted(records))], length=16)


@contextlib.contextmanager
def log_to(path: Path, store: Store | None = None) -> Iterator[None]:
    """Log to a local file; with an object store, the file is uploaded to the store as it ends."""
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
        if store is not None and store.remote:
            with contextlib.suppress(Exception):  # the log must never hide the run's own error
                store.write_bytes(path.name, path.read_bytes())
