"""Peak memory of writing the final dataset files, at 1k and at 20k rows, and how many files each split gets.

    .venv/bin/python bench/write_memory.py                 # 1000 and 20000 rows
    .venv/bin/python bench/write_memory.py --rows 500 5000
    .venv/bin/python bench/write_memory.py --max-shard-size 100000000   # several files per split

Each size: `ingest -> write` (the recipe's `write` settings: splits {train: 0.95, test: 0.05}, max_shard_size
500MB, no card) on rows cycling through the bundled sample's 320-pixel photos (about 30 KB each), local
executor, 256-row shards. Then the final files and their record are removed and the run is started again:
every shard is committed, so that run does nothing but write the final files, and its peak RSS (sampled every
0.1 s, `loop_vs_pipeline.sampled`) is the memory of that step. Prints, per size, the peak, the files per split
against ceil(bytes / max_shard_size) (bytes as the engine sizes rows, `pipeline.compact.row_nbytes`), and the
ratio of the peaks 20k / 1k (target <= 1.3); writes bench/results/write_memory.json.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loop_vs_pipeline import REPO, sampled, save_result, write_source

from pipeline.compact import row_nbytes


def config(root: Path, source: Path, out: Path, max_shard_size: int) -> Path:
    cfg = {
        "run": {"name": "bench", "output_dir": str(out), "progress": False, "executor": "local", "shard_size": 256},
        "stages": {
            "ingest": {"source": str(source), "format": "rlhf-v"},
            "write": {"splits": {"train": 0.95, "test": 0.05}, "max_shard_size": max_shard_size, "card": False},
        },
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def files_per_split(out: Path, max_shard_size: int) -> dict[str, dict[str, int]]:
    split: dict[str, dict[str, int]] = {}
    for f in sorted((out / "dataset" / "data").glob("*.parquet")):
        name = f.name.split("-", 1)[0]
        entry = split.setdefault(name, {"files": 0, "rows": 0, "bytes": 0})
        table = pq.read_table(f)  # one file at a time
        entry["files"] += 1
        entry["rows"] += table.num_rows
        entry["bytes"] += int(row_nbytes(table).sum())
        del table
    for entry in split.values():
        entry["bound"] = math.ceil(entry["bytes"] / max_shard_size)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[1000, 20000])
    parser.add_argument("--max-shard-size", type=int, default=500_000_000, help="bytes (default: the recipe's 500MB)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mfpo-write-memory-"))
    results: dict[int, dict] = {}
    try:
        for rows in args.rows:
            folder = root / f"run-{rows}"
            folder.mkdir()
            source = write_source(folder, rows)
            out = folder / "out"
            cfg = config(folder, source, out, args.max_shard_size)
            cmd = [sys.executable, "-m", "pipeline", "run", str(cfg)]
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
            (out / "write" / "_compact.json").unlink()
            shutil.rmtree(out / "dataset" / "data")
            run = sampled(cmd)  # every shard committed: only the final files are written
            splits = files_per_split(out, args.max_shard_size)
            results[rows] = {"peak_mib": run["driver_mib"], "wall_s": run["wall_s"], "splits": splits}
            shown = ", ".join(
                f"{name}: {s['rows']} rows, {s['bytes'] / 1e6:.0f} MB in {s['files']} file(s) (bound {s['bound']})"
                for name, s in results[rows]["splits"].items()
            )
            took = f"final files written in {run['wall_s']:.1f} s, peak {run['driver_mib']:.0f} MiB"
            print(f"{rows} rows: {took}; {shown}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        small, large = args.rows
        ratio = results[large]["peak_mib"] / results[small]["peak_mib"]
        print(f"{large} / {small} rows: peak RSS of the final-file write {ratio:.2f}x (target <= 1.3)")
        name = "write_memory" if args.max_shard_size == 500_000_000 else f"write_memory-{args.max_shard_size}"
        save_result(name, {"max_shard_size": args.max_shard_size, "runs": results, "ratio": ratio})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
