"""SIGKILL `python -m pipeline run CONFIG` (the data pipeline, Ray executor) at many points of every stage,
resume each time with the same command, and compare the output folder byte for byte with an uninterrupted run.

    .venv/bin/python bench/data_kill_points.py            # all 34 points: 30-45 minutes on a 2-core CPU
    .venv/bin/python bench/data_kill_points.py --points 5 27 34   # a few points (numbers as printed)

The config is weight-free apart from a tiny random-weight LLaVA built offline for `score` (tests/tiny_models.py),
so every stage runs: ingest, keywords (lexicon), ground (annotations), segment (grabcut), perturb
(diffusion-noise), score, bucket, write, then the dataset-card run hook. 26 rows of 32x24 JPEGs, shards of 4
(7 shards per stage, the last one short); one row has a corrupt image (quarantined at ingest) and one a
reversed box (quarantined at ground), so quarantine shards are written too. Ray: embedded local cluster,
`run.ray.num_cpus: 2`. Each uninterrupted run takes 1-1.5 minutes; each point 0.5 to 1.5 minutes.

The pipeline's code (pipeline/, stages/, mfpo/, prompts/) is copied once at the start and
every run uses the copy (PYTHONPATH), so edits to the working tree during the benchmark cannot make the
reference and a resumed run differ.

A kill point is a state of the output folder (or of run.log), watched every millisecond; the run's process group
is SIGKILLed the moment the state is seen. The run is started in a session of its own. Killing the group is not
enough for Ray: its worker processes each run in a process group of their own (same session), so they survive
the group kill, finish the shard in hand (writing files after the driver died) and exit about 2 s later, once
they notice their raylet is gone. The script waits for every process of the session to exit (killing any still
alive after 30 s by pid) before it resumes, and reports the survivors and what they wrote. "held" says whether
the state was still on disk once the driver had died (a commit may land between the look and the kill).

Each point uses a fresh output folder; the resume is the same command and must exit 0; then every file of the
folder (see EXCLUDE) must equal the reference's, byte for byte. A point whose state was never seen (the run
finished first) is reported as not tested and does not count as passed.

Prints one line per point and `N of M kill points resumed to byte-identical output`; writes JSON to
bench/results/data_kill_points.json. Exit 1 if a killed point failed (resume error or different bytes) or if the
two uninterrupted reference runs differ, 2 if fewer than 20 points were caught.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

ROWS = 24  # good rows; 2 bad rows are added (26 in all)
SHARD_SIZE = 4
NUM_SHARDS = 7  # ceil(26 / 4)
HALF = (NUM_SHARDS + 1) // 2
STAGES = ["ingest", "keywords", "ground", "segment", "perturb", "score", "bucket", "write"]
MIN_CAUGHT = 20
# Files that legitimately differ between two uninterrupted runs of the same config into two folders: run.log
# holds timestamps, pids, Ray's start-up lines and the output path. Everything else (summary.json, .lock, the
# card and its pictures) was checked to be byte-identical between two uninterrupted runs, and the script checks
# it again on every invocation (two reference runs), so it is compared too.
EXCLUDE = ("run.log",)


# ---------------------------------------------------------------------------------------------- observing a folder
def _names(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it]
    except OSError:
        return []


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _data_dir(out: Path, stage: str) -> Path:
    return out / "dataset" / "data" if stage == "write" else out / stage


def _shards(out: Path, stage: str) -> set[int]:
    """Numbers of the finished (renamed into place) data shards of a stage."""
    found = set()
    for name in _names(_data_dir(out, stage)):
        if name.startswith(".") or not name.endswith(".parquet"):
            continue
        if stage == "write" and name.startswith("train-"):
            found.add(int(name.split("-")[1]))
        elif name.startswith("shard-"):
            found.add(int(name[6:11]))
    return found


def _commits(out: Path, stage: str) -> set[int]:
    return {int(n[6:11]) for n in _names(out / stage / "_commits") if n.startswith("shard-") and n.endswith(".json")}


def uncommitted(stage: str) -> Callable[[Path], bool]:
    """A shard file of the stage is in place but its completion record is not (written, not committed)."""
    return lambda out: bool(_shards(out, stage) - _commits(out, stage))


def commits_at_least(stage: str, n: int) -> Callable[[Path], bool]:
    return lambda out: len(_commits(out, stage)) >= n


def stage_file(stage: str, name: str = "_stage.json") -> Callable[[Path], bool]:
    return lambda out: _exists(out / stage / name)


def all_committed_next_not_started(stage: str) -> Callable[[Path], bool]:
    nxt = STAGES[STAGES.index(stage) + 1]
    return lambda out: len(_commits(out, stage)) == NUM_SHARDS and not _exists(out / nxt / "_stage.json")


def quarantined(stage: str) -> Callable[[Path], bool]:
    return lambda out: any(n.endswith(".parquet") and not n.startswith(".") for n in _names(out / "quarantine" / stage))


def log_says(*needles: str, unless: Callable[[Path], bool] | None = None) -> Callable[[Path], bool]:
    def seen(out: Path) -> bool:
        try:
            text = (out / "run.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        return all(n in text for n in needles) and not (unless is not None and unless(out))

    return seen


def temp_anywhere(out: Path) -> bool:
    return any(".tmp-" in f for _, _, names in os.walk(out) for f in names)


def commit_temp(out: Path) -> bool:
    return any(".tmp-" in n for s in STAGES for n in _names(out / s / "_commits"))


def folder_temp(rel: str, prefix: str = ".") -> Callable[[Path], bool]:
    return lambda out: any(n.startswith(prefix) and ".tmp-" in n for n in _names(out / rel))


@dataclass(frozen=True)
class Point:
    name: str
    seen: Callable[[Path], bool]


POINTS: list[Point] = [
    Point("start-up: run.log created (lock taken), no stage file yet", lambda out: _exists(out / "run.log")),
    Point("ingest: _plan.parquet written", stage_file("ingest", "_plan.parquet")),
    Point("ingest: _stage.json written", stage_file("ingest")),
    Point("Ray start-up (run.log: 'starting Ray')", log_says("starting Ray")),
    Point("ingest: a shard written, its commit record not yet", uncommitted("ingest")),
    Point("ingest: quarantine shard written (corrupt image)", quarantined("ingest")),
    Point(f"ingest: {HALF} of {NUM_SHARDS} commit records", commits_at_least("ingest", HALF)),
    Point("keywords: _stage.json written", stage_file("keywords")),
    Point("keywords: a shard written, not committed", uncommitted("keywords")),
    Point(f"keywords: {HALF} of {NUM_SHARDS} commit records", commits_at_least("keywords", HALF)),
    Point("ground: first commit record", commits_at_least("ground", 1)),
    Point("ground: quarantine shard written (reversed box)", quarantined("ground")),
    Point("ground: all committed, segment not started", all_committed_next_not_started("ground")),
    Point("segment: _stage.json written", stage_file("segment")),
    Point("segment: a shard written, not committed", uncommitted("segment")),
    Point(f"segment: {HALF} of {NUM_SHARDS} commit records", commits_at_least("segment", HALF)),
    Point("perturb: _stage.json written", stage_file("perturb")),
    Point("perturb: a shard written, not committed", uncommitted("perturb")),
    Point(f"perturb: {HALF} of {NUM_SHARDS} commit records", commits_at_least("perturb", HALF)),
    Point(
        "score: Ray actors loading the model, no shard yet",
        log_says("stage score: ", "Ray actor(s)", unless=lambda out: bool(_shards(out, "score"))),
    ),
    Point("score: a shard written, not committed", uncommitted("score")),
    Point(f"score: {HALF} of {NUM_SHARDS} commit records", commits_at_least("score", HALF)),
    Point("bucket: _stage.json written (reading every difficulty)", stage_file("bucket")),
    Point("bucket: a shard written, not committed", uncommitted("bucket")),
    Point("bucket: all committed, write not started", all_committed_next_not_started("bucket")),
    Point("write: _stage.json written", stage_file("write")),
    Point("write: a dataset shard written, not committed", uncommitted("write")),
    Point(f"write: {HALF} of {NUM_SHARDS} commit records", commits_at_least("write", HALF)),
    Point(
        "summary.json written, dataset card not yet",
        lambda out: _exists(out / "summary.json") and not _exists(out / "dataset" / "README.md"),
    ),
    Point(
        "card hook: README.md written, pictures not yet",
        lambda out: _exists(out / "dataset" / "README.md") and not _exists(out / "dataset" / "mfpo" / "sheet.png"),
    ),
    Point("temp file: the first .tmp- file anywhere", temp_anywhere),
    Point("temp file: a commit record being written", commit_temp),
    Point("temp file: a dataset shard being written", folder_temp("dataset/data", ".train-")),
    Point("temp file: summary.json being written", folder_temp(".", ".summary.json")),
]


# ---------------------------------------------------------------------------------------------- the run
def make_source(folder: Path) -> Path:
    """write_source rows with a box on each picture's disc, plus a corrupt image and a reversed box."""
    from helpers import write_source

    src = write_source(folder, ROWS, size=(32, 24))
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["annotations"] = [{"label": "disc", "box": [10, 6, 22, 18]}]
    (folder / "images" / "broken.jpg").write_bytes((folder / "images" / "0.jpg").read_bytes()[:200])
    rows.insert(13, {**rows[0], "idx": 900, "image": "images/broken.jpg"})  # shard 3, quarantined at ingest
    rows.insert(21, {**rows[1], "idx": 901, "annotations": [{"label": "disc", "box": [22, 18, 10, 6]}]})  # shard 5
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return src


def make_stages(source: Path, model: Path) -> dict[str, Any]:
    return {
        "ingest": {"source": str(source), "resources": {"batch_size": 3}},
        "keywords": {"backend": "lexicon"},
        "ground": {"backend": "annotations", "annotations": {"select": "all"}},
        "segment": {"backend": "grabcut"},
        "perturb": {"method": "diffusion-noise"},
        "score": {"model": {"model": str(model)}, "resources": {"batch_size": 4}},
        "bucket": {},
        "write": {},
    }


CODE = ("pipeline", "stages", "mfpo", "prompts")
# How long processes that survive the group kill (Ray workers: each runs in a process group of its own, in the
# driver's session) may take to exit by themselves once their raylet is gone, before they are killed by pid.
SURVIVOR_WAIT_S = 30.0


def snapshot_code(dest: Path, attempts: int = 6) -> str:
    """Copy the pipeline's code into `dest` and run every command from there, so that edits made to the working
    tree while the benchmark runs (other people's work in progress) cannot change the code between the reference
    run and a resumed one. Retried while the copy does not import (an edit caught half-way). Returns a sha256 of
    the copied files."""
    for attempt in range(attempts):
        shutil.rmtree(dest, ignore_errors=True)
        for name in CODE:
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        check = subprocess.run(
            [
                sys.executable,
                "-c",
                "import pipeline.cli, pipeline.registry as r, stages; r._load(); print(stages.__file__)",
            ],
            cwd=dest,
            env=_env(dest),
            capture_output=True,
            text=True,
        )
        if check.returncode == 0 and check.stdout.strip().startswith(str(dest)):
            digest = hashlib.sha256()
            for f in sorted(p for p in dest.rglob("*") if p.is_file()):
                digest.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
            return digest.hexdigest()
        print(f"code snapshot does not import (attempt {attempt + 1}): {check.stderr.strip()[-300:]}", flush=True)
        time.sleep(60)
    sys.exit("the working tree's code never imported; try again later")


def _env(code: Path) -> dict[str, str]:
    return {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "PYTHONPATH": str(code)}


def run_pipeline(code: Path, cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(cfg)],
        cwd=code,
        env=_env(code),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _session_processes(sid: int) -> list[tuple[int, int, str]]:
    """(pid, process group, command) of every live process of session `sid`."""
    found = []
    for entry in _names(Path("/proc")):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
            if fields[0] in ("Z", "X") or int(fields[3]) != sid:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(entry), int(fields[2]), cmd.strip()[:100]))
    return found


def _stat_tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*") if root.exists() else []:
        with contextlib.suppress(OSError):
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def kill_at(code: Path, cfg: Path, out: Path, point: Point, logs: Path) -> dict[str, Any]:
    """Start the run in a session of its own, SIGKILL its process group the moment `point` is seen; then wait
    for (or kill) what survived the group kill. What happened."""
    with open(logs / "killed.stdout", "wb") as so, open(logs / "killed.stderr", "wb") as se:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(cfg)],
            cwd=code,
            env=_env(code),
            stdout=so,
            stderr=se,
            start_new_session=True,
        )
        started = time.monotonic()
        seen = False
        while proc.poll() is None:
            try:
                seen = point.seen(out)
            except OSError:
                seen = False
            if seen:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        at = time.monotonic() - started
        proc.wait()
    killed = seen and proc.returncode == -signal.SIGKILL
    try:
        held = bool(point.seen(out)) if killed else False
    except OSError:
        held = False
    at_kill = _stat_tree(out)
    survivors = _session_processes(proc.pid)
    alive, waited = survivors, time.monotonic()
    while alive and time.monotonic() - waited < SURVIVOR_WAIT_S:
        time.sleep(0.05)
        alive = _session_processes(proc.pid)
    gone_after = round(time.monotonic() - waited, 2)
    for pid, _, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    after = _stat_tree(out)
    return {
        "killed": killed,
        "killed_at_s": round(at, 3),
        "killed_rc": proc.returncode,
        "held": held,
        "survived_group_kill": [f"pid {pid} pgid {pg}: {cmd}" for pid, pg, cmd in survivors],
        "survivors_gone_after_s": gone_after if survivors and not alive else (None if alive else 0.0),
        "survivors_killed_by_pid": [f"pid {pid} pgid {pg}: {cmd}" for pid, pg, cmd in alive],
        "written_after_kill": sorted(rel for rel in after if at_kill.get(rel) != after[rel]),
        "removed_after_kill": sorted(set(at_kill) - set(after)),
        "files_at_kill": sorted(at_kill),
    }


def files(root: Path) -> dict[str, bytes]:
    from helpers import tree

    return tree(root, exclude=EXCLUDE)


def _parquet_detail(a: bytes, b: bytes) -> str:
    import io

    import pyarrow.parquet as pq

    ta, tb = pq.read_table(io.BytesIO(a)), pq.read_table(io.BytesIO(b))
    if ta.schema.metadata != tb.schema.metadata:
        return "schema metadata differs"
    if not ta.schema.equals(tb.schema):
        return f"schema differs: {ta.schema} vs {tb.schema}"
    if ta.num_rows != tb.num_rows:
        return f"{ta.num_rows} rows vs {tb.num_rows}"
    cols = [c for c in ta.column_names if not ta[c].equals(tb[c])]
    return f"columns differ: {cols}" if cols else "same table, different encoding"


def compare(ref: dict[str, bytes], got: dict[str, bytes]) -> dict[str, Any]:
    """Missing, extra and different files (with a precise description of each difference)."""
    different = []
    for rel in sorted(set(ref) & set(got)):
        if ref[rel] == got[rel]:
            continue
        item: dict[str, Any] = {
            "path": rel,
            "size_ref": len(ref[rel]),
            "size_resumed": len(got[rel]),
            "sha256_ref": hashlib.sha256(ref[rel]).hexdigest()[:16],
            "sha256_resumed": hashlib.sha256(got[rel]).hexdigest()[:16],
        }
        try:
            if rel.endswith(".parquet"):
                item["detail"] = _parquet_detail(ref[rel], got[rel])
            elif rel.endswith((".json", ".md", ".yaml")):
                diff = difflib.unified_diff(
                    ref[rel].decode().splitlines(), got[rel].decode().splitlines(), "reference", "resumed", lineterm=""
                )
                item["detail"] = "\n".join(list(diff)[:40])
        except Exception as err:  # a torn file: say so rather than fail the benchmark
            item["detail"] = f"unreadable: {type(err).__name__}: {err}"
        different.append(item)
    return {
        "missing": sorted(set(ref) - set(got)),
        "extra": sorted(set(got) - set(ref)),
        "different": different,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "data_kill_points.json"))
    parser.add_argument("--points", type=int, nargs="*", help="run only these points (1-based, as printed)")
    parser.add_argument("--keep", help="keep the working folder here (default: a temporary folder, removed)")
    args = parser.parse_args()
    from helpers import write_config
    from tiny_models import save_tiny_llava

    chosen = [k for k in range(len(POINTS)) if not args.points or k + 1 in args.points]
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        code = root / "code"
        code_sha = snapshot_code(code)
        source = make_source(root / "source")
        stages = make_stages(source, save_tiny_llava(root / "tiny-llava"))

        def config(name: str) -> tuple[Path, Path]:
            out = root / name
            cfg = write_config(root / f"{name}.yaml", source, out, executor="ray", shard_size=SHARD_SIZE, stages=stages)
            return cfg, out

        # Two uninterrupted runs: the reference, and a check that nothing but EXCLUDE differs between runs.
        refs = []
        for name in ("reference", "reference-2"):
            cfg, out = config(name)
            started = time.monotonic()
            proc = run_pipeline(code, cfg)
            if proc.returncode != 0:
                sys.exit(f"the uninterrupted run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            refs.append(files(out))
            print(f"uninterrupted run {name}: {len(refs[-1])} files, {time.monotonic() - started:.0f} s", flush=True)
        ref = refs[0]
        repeat = compare(refs[0], refs[1])
        repeat_ok = not any(repeat.values())
        if not repeat_ok:
            print(f"two uninterrupted runs differ: {json.dumps(repeat, indent=2)}", flush=True)
        stage_files = sorted({rel.split("/")[0] for rel in ref})
        assert all(s in stage_files for s in STAGES[:-1]) and "dataset" in stage_files, stage_files

        for k in chosen:
            point = POINTS[k]
            cfg, out = config(f"kill-{k + 1:02d}")
            logs = root / f"kill-{k + 1:02d}-logs"
            logs.mkdir()
            started = time.monotonic()
            kill = kill_at(code, cfg, out, point, logs)
            resumed = run_pipeline(code, cfg)
            result: dict[str, Any] = {"point": k + 1, "name": point.name, **kill, "resume_rc": resumed.returncode}
            if resumed.returncode != 0:
                result["resume_stderr"] = resumed.stderr[-3000:]
            diff = compare(ref, files(out)) if out.exists() else {"missing": sorted(ref), "extra": [], "different": []}
            result["identical"] = resumed.returncode == 0 and not any(diff.values())
            result["diff"] = diff
            result["seconds"] = round(time.monotonic() - started, 1)
            if not kill["killed"]:
                verdict = "NOT TESTED (the run finished before the state was seen)"
            elif result["identical"]:
                verdict = "identical"
            elif resumed.returncode != 0:
                verdict = f"RESUME FAILED: {resumed.stderr.strip().splitlines()[-1:]}"
            else:
                verdict = (
                    f"DIFFERENT: {len(diff['missing'])} missing, {len(diff['extra'])} extra, "
                    f"{len(diff['different'])} different ({', '.join(d['path'] for d in diff['different'][:4])}"
                    f"{' '.join(diff['extra'][:4])})"
                )
            survived = len(kill["survived_group_kill"])
            if kill["survivors_killed_by_pid"]:
                survivors = f"{survived} survivor(s), {len(kill['survivors_killed_by_pid'])} killed by pid"
            else:
                survivors = f"{survived} survivor(s) gone in {kill['survivors_gone_after_s']:.1f} s"
            print(
                f"{k + 1:2d}. {point.name:58s} killed={kill['killed']!s:5s} at {kill['killed_at_s']:5.1f} s "
                f"held={kill['held']!s:5s} {survivors:32s} resume rc={resumed.returncode} {verdict} "
                f"({result['seconds']:.0f} s)",
                flush=True,
            )
            results.append(result)

    tested = [r for r in results if r["killed"]]
    passed = [r for r in tested if r["identical"]]
    failed = [r for r in tested if not r["identical"]]
    untested = [r for r in results if not r["killed"]]
    total = time.monotonic() - t0
    report = {
        "config": {
            "executor": "ray",
            "ray": {"num_cpus": 2},
            "rows": ROWS + 2,
            "shard_size": SHARD_SIZE,
            "num_shards": NUM_SHARDS,
            "stages": STAGES,
            "compared": "every file under the output folder except " + ", ".join(EXCLUDE),
        },
        "code_sha256": code_sha,
        "uninterrupted_runs_identical": repeat_ok,
        "uninterrupted_runs_diff": repeat,
        "points": results,
        "total": len(results),
        "tested": len(tested),
        "passed": len(passed),
        "failed": [r["point"] for r in failed],
        "not_tested": [r["point"] for r in untested],
        "seconds": round(total, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    extra = f" ({len(untested)} not tested: {[r['point'] for r in untested]})" if untested else ""
    print(f"{len(passed)} of {len(results)} kill points resumed to byte-identical output{extra}; {total / 60:.1f} min")
    if failed or not repeat_ok:
        sys.exit(1)
    if len(tested) < min(MIN_CAUGHT, len(chosen)):
        sys.exit(2)


if __name__ == "__main__":
    main()
