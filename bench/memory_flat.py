"""Peak memory (RSS) of the driver and of the largest Ray worker at 1k and at 20k rows, default settings.

    .venv/bin/python bench/memory_flat.py                 # 1000 and 20000 rows
    .venv/bin/python bench/memory_flat.py --rows 500 5000

The weight-free path of `loop_vs_pipeline.py` (ingest, keywords, ground from the rows' boxes, GrabCut segment,
noise perturb, write) on tiny photos (32 pixels on the long side: the rows' count is what varies, not their
size). Every 0.1 s each process of the run's session is sampled (`loop_vs_pipeline.sampled`): the
`python -m pipeline run` process is the driver, processes titled `ray::...` are Ray workers (raylet and GCS are
neither). Prints each run's peaks and the ratio 20k / 1k (target <= 1.3); writes bench/results/memory_flat.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_vs_pipeline import sampled, save_result, write_config, write_source


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
            results[rows] = sampled([sys.executable, "-m", "pipeline", "run", str(cfg)])
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
        save_result("memory_flat", {"side_px": args.side, "runs": results, "ratios": ratios})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
