"""Resume: a run killed at any point, then re-run, gives exactly the rows and bytes of an uninterrupted
run; fingerprints invalidate a changed stage and what follows it, never what precedes it."""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

import pytest
from helpers import cli, dataset_rows, run_and_kill, tree, write_config, write_source

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

ROWS = 400


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_source(tmp_path_factory.mktemp("src"), ROWS, size=(32, 24))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    """An uninterrupted run, in its own output directory."""
    root = tmp_path_factory.mktemp("ref")
    cfg = write_config(root / "cfg.yaml", source, root / "out", shard_size=1)
    cli("run", str(cfg), check=True)
    return root / "out"


def _kill_when(cfg: Path, commits: Path, at_least: int) -> int:
    """Start a run and SIGKILL it once `commits` holds at least `at_least` completion records."""
    run_and_kill(["run", str(cfg)], lambda: len(list(commits.glob("*.json"))), at_least)
    return len(list(commits.glob("*.json")))


def test_sigkill_mid_stage_then_resume_is_identical(tmp_path: Path, source: Path, reference: Path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", source, out, shard_size=1)
    done = _kill_when(cfg, out / "ingest" / "_commits", 60)
    assert 60 <= done < ROWS, "killed in the middle of ingest"
    # Shards stream: write committed shards while ingest was still running, never one ingest had not committed.
    written = {p.name for p in (out / "write" / "_commits").glob("*.json")}
    assert written and written <= {p.name for p in (out / "ingest" / "_commits").glob("*.json")}
    done = _kill_when(cfg, out / "write" / "_commits", 80)
    assert 80 <= done < ROWS, "killed in the middle of write"
    status = json.loads(cli("status", str(cfg), "--json", check=True).stdout)["stages"]
    assert [s["state"] for s in status] == ["partial", "partial"]
    assert status[0]["shards_done"] >= status[1]["shards_done"]
    cli("run", str(cfg), check=True)

    assert tree(out) == tree(reference)  # same files, same bytes: no loss, no duplicates
    ids = [r["sample_id"] for r in dataset_rows(out)]
    assert len(ids) == len(set(ids)) == ROWS


def test_torn_shard_without_record_is_redone(tmp_path: Path, source: Path, reference: Path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", source, out, shard_size=1)
    cli("run", str(cfg), check=True)
    # A crash between writing a shard and committing it: the record is missing, the file is torn,
    # and a temporary file is left behind.
    (out / "write" / "_commits" / "shard-00007.json").unlink()
    shard = out / "write" / "train" / "shard-00007.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    (shard.parent / f".{shard.name}.tmp-12345").write_bytes(b"partial")
    (out / "ingest" / "_commits" / "shard-00003.json").write_text('{"shard": 3, "finger')  # torn record

    status = {s["name"]: s for s in json.loads(cli("status", str(cfg), "--json", check=True).stdout)["stages"]}
    assert status["ingest"]["shards_done"] == ROWS - 1 and status["write"]["shards_done"] == ROWS - 1
    cli("run", str(cfg), check=True)
    assert tree(out) == tree(reference)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_changed_config_redoes_that_stage_and_later_only(tmp_path: Path, source: Path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", source, out, shard_size=50)
    cli("run", str(cfg), check=True)
    ingest_before = _mtimes(out / "ingest")
    card_before = (out / "dataset" / "README.md").read_text()

    # The card's settings change the card, not the shards.
    renamed = ["--set", "stages.write.pretty_name=Renamed"]
    status = json.loads(cli("status", str(cfg), "--json", *renamed, check=True).stdout)["stages"]
    assert [s["state"] for s in status] == ["done", "done"]
    shards_before = _mtimes(out / "dataset" / "data")
    cli("run", str(cfg), *renamed, check=True)
    assert _mtimes(out / "dataset" / "data") == shards_before
    card = (out / "dataset" / "README.md").read_text()
    assert "# Renamed" in card and card != card_before

    changed = ["--set", "stages.write.split=all"]
    status = json.loads(cli("status", str(cfg), "--json", *changed, check=True).stdout)["stages"]
    assert [s["state"] for s in status] == ["done", "stale"]
    assert status[1]["why"] == 'stages.write.split: "train" -> "all"'  # what changed, as a config key
    cli("run", str(cfg), *changed, check=True)
    assert _mtimes(out / "ingest") == ingest_before  # upstream untouched
    names = sorted(p.name for p in (out / "dataset" / "data").glob("*.parquet"))
    assert names and all(n.startswith("all-") for n in names)  # the train-* shards are gone
    assert "split: all" in (out / "dataset" / "README.md").read_text()

    # An upstream change invalidates everything after it.
    limited = ["--set", "stages.ingest.limit=10"]
    status = json.loads(cli("status", str(cfg), "--json", *limited, check=True).stdout)["stages"]
    assert [s["state"] for s in status] == ["stale", "stale"]
    # write's files were made with split=all just above: its own change is named, not only its upstream's.
    assert [s["why"] for s in status] == ["stages.ingest.limit: null -> 10", 'stages.write.split: "all" -> "train"']
    table = cli("status", str(cfg), *limited, check=True, env={**os.environ, "COLUMNS": "250"}).stdout
    assert "why" in table and "stages.ingest.limit: null -> 10" in table
    cli("run", str(cfg), *limited, check=True)
    assert len(dataset_rows(out)) == 10
    assert len(list((out / "dataset" / "data").glob("*.parquet"))) == 1  # old shards cleared


def test_from_only_and_force(tmp_path: Path, source: Path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", source, out, shard_size=100)
    cli("run", str(cfg), check=True)
    data = out / "dataset" / "data"
    ingest0, write0 = _mtimes(out / "ingest"), _mtimes(data)

    cli("run", str(cfg), check=True)  # nothing to do: resume skips every committed shard
    assert (_mtimes(out / "ingest"), _mtimes(data)) == (ingest0, write0)

    cli("run", str(cfg), "--only", "write", "--force", check=True)
    ingest1, write1 = _mtimes(out / "ingest"), _mtimes(data)
    assert ingest1 == ingest0 and all(write1[k] > write0[k] for k in write0)

    cli("run", str(cfg), "--from", "ingest", check=True)
    ingest2, write2 = _mtimes(out / "ingest"), _mtimes(data)
    assert all(ingest2[k] > ingest1[k] for k in ingest1) and all(write2[k] > write1[k] for k in write1)


def test_only_needs_finished_upstream(tmp_path: Path, source: Path):
    cfg = write_config(tmp_path / "cfg.yaml", source, tmp_path / "out")
    proc = cli("run", str(cfg), "--only", "write")
    assert proc.returncode == 1
    assert "stage write needs ingest, which is pending" in proc.stderr
    proc = cli("run", str(cfg), "--from", "segment")
    assert proc.returncode == 1 and "--from segment: not a stage of this config" in proc.stderr


def test_second_run_on_same_output_is_refused(tmp_path: Path, source: Path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", source, out)
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        proc = cli("run", str(cfg))
    assert proc.returncode == 1 and "another run, push, train or eval is using" in proc.stderr


@pytest.mark.ray
def test_sigkill_of_a_ray_run_then_resume_is_identical(tmp_path: Path, source: Path, reference: Path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", source, out, shard_size=1, executor="ray")
    done = _kill_when(cfg, out / "ingest" / "_commits", 40)
    assert 40 <= done < ROWS, "killed in the middle of ingest, with Ray actors at work"
    cli("run", str(cfg), check=True)
    assert tree(out) == tree(reference)


@pytest.mark.ray
def test_auto_shard_size_is_recorded_and_kept_on_another_cluster(tmp_path: Path, source: Path):
    """run.shard_size: auto picks about 32 shards per CPU when the rows are planned, records the size, and a
    resume keeps it even where a fresh choice would differ (a cluster with four times the CPUs)."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", source, out, shard_size="auto")  # the local executor: this machine
    cli("run", str(cfg), check=True)
    cpus = len(os.sched_getaffinity(0))
    size = max(1, math.ceil(ROWS / (32 * cpus)))
    state = json.loads((out / "ingest" / "_stage.json").read_text())
    assert state["shard_size"] == size and state["num_shards"] == math.ceil(ROWS / size)
    assert f"run.shard_size auto: {size} rows per shard ({ROWS} rows, {cpus} CPUs)" in (out / "run.log").read_text()
    assert math.ceil(ROWS / (32 * 4 * cpus)) != size
    before = tree(out)
    for stage in ("ingest", "write"):
        for k in (0, 3):
            (out / stage / "_commits" / f"shard-{k:05d}.json").unlink()
    bigger = ["--set", "run.executor=ray", "--set", f"run.ray.num_cpus={4 * cpus}"]
    proc = cli("run", str(cfg), *bigger, check=True)
    assert "run.shard_size auto" not in proc.stderr and "2 of" in (out / "run.log").read_text()
    assert tree(out) == before
