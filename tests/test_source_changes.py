"""Sources that change or disagree: a source rewritten between planning and the first shard (on disk and in S3)
stops the run in one line and commits nothing from it; Parquet parts with different extra columns are read as
their union; an output folder inside the source folder, or a source inside the output folder, is refused
before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster import s3_server
from helpers import cli, dataset_rows, encode, photo, quarantine, rlhfv_line, write_config, write_source
from stage_runner import build_stage

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.runner import Runner
from stages.ingest import Ingest

CHANGED = "changed after the rows were planned"


def _reordered(source: Path) -> None:
    """The same rows, another order: what a re-export or a concurrent writer leaves behind."""
    lines = source.read_text(encoding="utf-8").splitlines()
    source.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")


def test_a_source_rewritten_after_planning_stops_the_run_and_commits_nothing(tmp_path: Path, monkeypatch):
    source = write_source(tmp_path / "data", 12)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", source, out)
    planned = Ingest.plan

    def plan_then_rewrite(self: Ingest) -> pa.Table:
        table = planned(self)
        _reordered(source)  # after the driver planned, before any worker reads
        return table

    monkeypatch.setattr(Ingest, "plan", plan_then_rewrite)
    with pytest.raises(PipelineError, match=CHANGED) as err:
        Runner(load_config(str(cfg))).run()
    message = str(err.value)
    assert "\n" not in message and str(source) in message and "run again to re-plan" in message
    assert not list(out.rglob("shard-*.parquet")), "a shard read from the changed source was committed"
    assert not list(out.rglob("_commits")) and not (out / "dataset").exists()

    monkeypatch.setattr(Ingest, "plan", planned)  # the next run re-plans the new content and pairs it right
    Runner(load_config(str(cfg))).run()
    rows = dataset_rows(out)
    assert len(rows) == 12
    by_id = {str(r["sample_id"]): r["question"] for r in rows}  # every question still belongs to its id
    assert by_id == {str(i): f"What colour is the disc in picture {i}?" for i in range(12)}


def test_a_parquet_source_rewritten_after_planning_is_refused_by_the_worker(tmp_path: Path):
    """The `datasets` reader: a worker that opens the rewritten file refuses the planned rows."""
    folder = tmp_path / "data"
    jsonl = write_source(folder, 6)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for r in rows:
        r["image"] = {"bytes": (folder / r["image"]).read_bytes(), "path": None}
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, folder / "train.parquet")
    config = {"source": str(folder / "train.parquet"), "format": "rlhf-v"}
    plan = build_stage("ingest", config).plan()
    pq.write_table(table.take(list(reversed(range(6)))), folder / "train.parquet")
    with pytest.raises(PipelineError, match=CHANGED):
        build_stage("ingest", config).process_batch(plan)


def test_a_source_in_s3_rewritten_after_planning_is_refused_by_the_worker(tmp_path: Path, monkeypatch):
    import s3fs

    with s3_server("src") as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # fsspec keeps one filesystem per set of arguments for the process; one made by an earlier test against
        # another (now stopped) server would be reused: this test's stages must open their own.
        s3fs.S3FileSystem.clear_instance_cache()
        monkeypatch.setattr(s3fs.S3FileSystem, "cachable", False)
        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
        local = write_source(tmp_path / "data", 6)
        fs.put(str(local.parent) + "/", "src/data/", recursive=True)
        config = {"source": "s3://src/data/train.jsonl"}
        planner = build_stage("ingest", config)
        plan = planner.plan()
        kept = build_stage("ingest", config).process_batch(plan)  # unchanged: read as planned
        assert len(kept.table) == 6 and not kept.rejected
        _reordered(local)
        fs.put(str(local), "src/data/train.jsonl")
        with pytest.raises(PipelineError, match=CHANGED):
            build_stage("ingest", config).process_batch(plan)
        fs.put(str(local), "src/data/train.jsonl")
        fs.rm("src/data/train.jsonl")
        fs.pipe("src/data/train.jsonl", local.read_bytes().splitlines(keepends=True)[0])  # shorter than planned
        with pytest.raises(PipelineError, match=CHANGED):
            build_stage("ingest", config).process_batch(plan)


def _parquet_parts(folder: Path, extra: list[dict[str, list]]) -> Path:
    """One Parquet part per `extra` (its extra columns), two good RLHF-V rows each."""
    folder.mkdir(parents=True)
    for k, columns in enumerate(extra):
        rows = [
            json.loads(rlhfv_line(f"p{k}-{i}", "x", f"What colour is disc {k}-{i}?"))
            | {"image": {"bytes": encode(photo(seed=2 * k + i)), "path": None}}
            for i in range(2)
        ]
        table = pa.Table.from_pylist(rows)
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values))
        pq.write_table(table, folder / f"part-{k}.parquet")
    return folder


@pytest.mark.slow
def test_parquet_parts_with_different_extra_columns_are_read_as_their_union(tmp_path: Path):
    source = _parquet_parts(tmp_path / "data", [{"score": [1, 2]}, {"lang": ["en", "fr"]}])
    out = tmp_path / "out"
    proc = cli("run", str(write_config(tmp_path / "cfg.yaml", source, out)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = {str(r["sample_id"]): json.loads(r["meta"]) for r in dataset_rows(out)}
    meta = {sid: {k: m[k] for k in ("score", "lang")} for sid, m in meta.items()}  # a part without one reads null
    assert meta == {
        "p0-0": {"score": 1, "lang": None},
        "p0-1": {"score": 2, "lang": None},
        "p1-0": {"score": None, "lang": "en"},
        "p1-1": {"score": None, "lang": "fr"},
    }
    assert not quarantine(out)


@pytest.mark.slow
def test_parquet_parts_that_give_a_column_two_types_are_refused_naming_both_files(tmp_path: Path):
    source = _parquet_parts(tmp_path / "data", [{"score": [1, 2]}, {"score": ["high", "low"]}])
    proc = cli("run", str(write_config(tmp_path / "cfg.yaml", source, tmp_path / "out")))
    assert proc.returncode != 0
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # one line
    assert "part-0.parquet and part-1.parquet give column 'score' different types (int64 vs string)" in error
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_an_output_folder_inside_the_source_folder_is_refused_before_anything_runs(tmp_path: Path):
    source = _parquet_parts(tmp_path / "data", [{}])
    out = source / "runs" / "first"
    proc = cli("run", str(write_config(tmp_path / "cfg.yaml", source, out)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"run.output_dir: {out} is inside {source}, which stage ingest reads" in proc.stderr
    assert "choose an output folder outside it" in proc.stderr
    assert not out.exists() and not (source / "runs").exists()  # nothing was created, nothing was read


@pytest.mark.slow
def test_a_source_inside_the_output_folder_is_refused(tmp_path: Path):
    out = tmp_path / "out"
    source = write_source(out / "inputs", 3)
    proc = cli("run", str(write_config(tmp_path / "cfg.yaml", source, out)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"run.output_dir: {out} holds {source}, which stage ingest reads (a redo would delete it)" in proc.stderr
