"""A slow stage and a fast stage end to end, against the slowest stage running alone.

    .venv/bin/python bench/slow_fast_stages.py --rows 100

The weight-free path of `loop_vs_pipeline.py` on the same photos (640 pixels on the long side): segment
(GrabCut from the row's box, the slow stage) and perturb (forward-diffusion noise in the mask, then PNG: the fast
one), with ingest, keywords, ground (the rows' own boxes) and write around them, default settings. Measured, as
whole `python -m pipeline run` commands (start-up included every time):

- end to end: a fresh run of every stage;
- each stage alone: `run --only segment --force` and `run --only perturb --force` on that run's committed inputs.

Then the same with `run.fuse_stages: false` (one stage per pass: shards stream from one Ray pool to the next
instead of sharing a worker pass). Prints end to end / slowest stage alone (target <= 1.25) and writes
bench/results/slow_fast_stages-<rows>.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_vs_pipeline import save_result, timed, write_config, write_source


def with_fusion(cfg: Path, fuse: bool) -> Path:
    data = yaml.safe_load(cfg.read_text())
    data["run"]["fuse_stages"] = fuse
    out = cfg.with_name(f"{cfg.stem}-{'fused' if fuse else 'unfused'}.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--side", type=int, default=640)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mfpo-slowfast-"))
    pipeline = [sys.executable, "-m", "pipeline", "run"]
    results: dict[str, dict[str, float]] = {}
    try:
        (root / "src").mkdir()
        source = write_source(root / "src", args.rows, args.side)
        for fuse in (True, False):
            name = "fused passes (default)" if fuse else "one stage per pass (fuse_stages: false)"
            out = root / f"out-{fuse}"
            cfg = with_fusion(write_config(root, source, out), fuse)
            wall = {"end_to_end": timed([*pipeline, str(cfg)])[0]}
            for stage in ("segment", "perturb"):
                wall[f"{stage}_alone"] = timed([*pipeline, str(cfg), "--only", stage, "--force"])[0]
            shutil.rmtree(out)
            wall["end_to_end_again"] = timed([*pipeline, str(cfg)])[0]
            slowest = max(wall["segment_alone"], wall["perturb_alone"])
            wall["ratio"] = min(wall["end_to_end"], wall["end_to_end_again"]) / slowest
            results[name] = wall
            print(
                f"{name}: end to end {min(wall['end_to_end'], wall['end_to_end_again']):.1f} s, segment alone "
                f"{wall['segment_alone']:.1f} s, perturb alone {wall['perturb_alone']:.1f} s -> end to end / slowest "
                f"alone {wall['ratio']:.2f} (target <= 1.25)",
                flush=True,
            )
        save_result(f"slow_fast_stages-{args.rows}", {"rows": args.rows, "side_px": args.side, "runs": results})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
