"""Peak memory (RSS) of the driver and of the largest Ray worker at 1k and at 20k rows, default settings.

    .venv/bin/python bench/memory_flat.py                 # 1000 and 20000 rows
    .venv/bin/python bench/memory_flat.py --rows 500 5000

The weight-free path of `loop_vs_pipeline.py` (ingest, keywords, ground from the rows' boxes, GrabCut segment,
noise perturb, write) on tiny photos (32 pixels on the long side: the rows' count is what varies, not their
size). Every 0.2 s each process of the run's session is sampled: the `python -m pipeline run` process is the
driver, processes titled `ray::...` are Ray workers (raylet and GCS are neither). Prints each run's peaks and
the ratio 20k / 1k (target <= 1.3); writes bench/results/memory_flat.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_vs_pipeline import REPO, write_config, write_source


def peak_rss(cmd: list[str]) -> dict[str, float]:
    """Run `cmd` in a session of its own; peak RSS (MiB) of the driver and of the largest Ray worker."""
    import psutil

    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    peaks = {"driver_mib": 0.0, "worker_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if os.getsid(p.pid) != proc.pid:
                        continue
                    rss = p.memory_info().rss / 2**20
                    args = p.info["cmdline"] or []
                    if p.pid == proc.pid:
                        peaks["driver_mib"] = max(peaks["driver_mib"], rss)
                    elif args and args[0].startswith("ray::"):
                        peaks["worker_mib"] = max(peaks["worker_mib"], rss)
                except (psutil.Error, ProcessLookupError, PermissionError):
                    continue
            done.wait(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode})")
    done.set()
    watcher.join()
    return {**peaks, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[1000, 20000])
    parser.add_argument("--side", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mfpo-memory-"))
    results: dict[int, dict[str, float]] = {}
    try:
        for rows in args.rows:
            (root / f"src-{rows}").mkdir()
            source = write_source(root / f"src-{rows}", rows, args.side)
            cfg = write_config(root, source, root / f"out-{rows}")
            results[rows] = peak_rss([sys.executable, "-m", "pipeline", "run", str(cfg)])
            r = results[rows]
            print(
                f"{rows} rows: driver {r['driver_mib']:.0f} MiB, largest worker {r['worker_mib']:.0f} MiB, "
                f"{r['wall_s']:.1f} s",
                flush=True,
            )
        small, large = args.rows
        ratios = {k: results[large][k] / results[small][k] for k in ("driver_mib", "worker_mib")}
        print(
            f"{large} / {small} rows: driver {ratios['driver_mib']:.2f}x, largest worker {ratios['worker_mib']:.2f}x "
            "(target <= 1.3)"
        )
        (REPO / "bench" / "results" / "memory_flat.json").write_text(
            json.dumps(
                {
                    "side_px": args.side,
                    "cpus": os.cpu_count(),
                    "machine": platform.platform(),
                    "runs": results,
                    "ratios": ratios,
                },
                indent=2,
            )
            + "\n"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
