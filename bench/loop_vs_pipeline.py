"""The weight-free data path as a naive loop against the pipeline with default settings, on the same rows.

    .venv/bin/python bench/loop_vs_pipeline.py --rows 100 --reps 2
    .venv/bin/python bench/loop_vs_pipeline.py --rows 100 --reps 2 --side 800   # rows as costly as issue 11's
    .venv/bin/python bench/loop_vs_pipeline.py --rows 1000 --reps 1
    .venv/bin/python bench/loop_vs_pipeline.py --rows 100 --side 0              # the sample's own 320-px files

The loop is what a quick script does: one process, batch 1, per row decode the JPEG, GrabCut from the row's
box (5 iterations, OpenCV, seeded as the pipeline seeds that row: its k-means cost varies with the seed),
forward-diffusion noise at t=500 inside the mask (diffusers' DDPMScheduler, sigmoid betas), encode the result
as PNG, and at the end write one Parquet file. The pipeline runs `python -m pipeline run` with ingest ->
keywords (lexicon) -> ground (the rows' own boxes) -> segment (grabcut) -> perturb (diffusion-noise, t=500) ->
write, every other setting at its default (shard size, executor: an embedded Ray cluster on every core).

Rows cycle through five photos of the bundled sample, resized to `--side` pixels on the long side: 640 by
default (COCO's size, which LLaVA-style preference data is mostly made of; about 0.9 s a row here). At 800
pixels a row costs about 1.5 s, near the ~1.7 s a row of the measurement that opened issue 11. At the sample's
own 320 pixels (`--side 0`) a row costs 0.2 s, and the loop's libraries run part of it on a second core.

The split is what the cores give without any framework: the same loop started once per core, each process on
its share of the rows (rows k, k+N, ...), no coordination, no commits, no start-up beyond the loop's own. On the
2-core development VM two busy processes each run slower than one alone, so the split is well below 2x.

Runs are interleaved (loop, split, pipeline, loop, ...) so that a machine that slows down or speeds up affects
all of them. Wall time is measured around each child process; CPU time is the user + system time of every
process of the child's session (sampled, see `sampled`), Ray's raylet and workers included. Prints the ratios
and writes bench/results/loop_vs_pipeline-<rows>-<side>px.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "rlhfv_sample"

LOOP = r"""
import io, json, sys, time
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
sys.path.insert(0, sys.argv[3])
from pipeline.determinism import row_rng
from stages.perturb import NoiseConfig, composite, diffusion_noise
from stages.segment import GrabCutConfig, grabcut, grabcut_seed

rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
noise, cut = NoiseConfig(timestep=500), GrabCutConfig()
out = []
for k, row in enumerate(rows):
    data = (Path(sys.argv[1]).parent / row["image"]).read_bytes()
    img = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    # The pipeline's GrabCut seed for this row (run seed 0, sample_id = idx): k-means converges at a cost that
    # varies with the seed, so loop, split and pipeline do the very same work.
    seed = grabcut_seed(row_rng(0, str(row["idx"]), "segment"))
    mask = grabcut(img, row["annotations"][0]["box"], cut, seed=seed)
    rng = np.random.default_rng(k)
    noised = diffusion_noise(img, rng.standard_normal(img.shape).astype(np.float32), noise)
    result = composite(img, noised, mask.astype(np.float32))
    buf = io.BytesIO()
    Image.fromarray(result).save(buf, format="PNG")
    out.append({"idx": row["idx"], "image": data, "rejected_image": buf.getvalue(), "mask_area": float(mask.mean())})
pq.write_table(pa.Table.from_pylist(out), sys.argv[2], compression="zstd")
"""


def write_source(root: Path, rows: int, side: int | None = None) -> Path:
    """`rows` rows cycling through five photos of the bundled sample (each with one box), resized (Lanczos) to
    `side` pixels on their long side, boxes scaled with them; None keeps the sample's 320-pixel files."""
    from PIL import Image

    base = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines() if line.strip()]
    photos: dict[str, dict] = {}
    for row in base:
        if row["image"] not in photos and row.get("annotations"):
            photos[row["image"]] = row
        if len(photos) == 5:
            break
    shutil.copytree(SAMPLE / "images", root / "images")
    scale: dict[str, float] = {}
    for name in photos:
        with Image.open(root / name) as img:
            scale[name] = 1.0 if side is None else side / max(img.size)
            if side is not None:
                size = (round(img.width * scale[name]), round(img.height * scale[name]))
                img.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(root / name, quality=95)
    picked = list(photos.values())
    lines = []
    for i in range(rows):
        row = dict(picked[i % len(picked)])
        row["idx"] = i
        box = row["annotations"][0]["box"]
        row["annotations"] = [{**row["annotations"][0], "box": [round(v * scale[row["image"]]) for v in box]}]
        lines.append(json.dumps(row))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parts(source: Path, parts: int) -> list[Path]:
    """The rows of `source` dealt into `parts` files beside it (row k into part k mod parts)."""
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    paths = []
    for k in range(parts):
        path = source.with_name(f"part-{k}.jsonl")
        path.write_text("\n".join(lines[k::parts]) + "\n")
        paths.append(path)
    return paths


def write_config(root: Path, source: Path, out: Path) -> Path:
    cfg = {
        "run": {"name": "bench", "output_dir": str(out), "progress": False},
        "stages": {
            "ingest": {"source": str(source), "format": "rlhf-v"},
            "keywords": {},
            "ground": {"backend": "annotations", "annotations": {"select": "all"}},
            "segment": {"backend": "grabcut"},
            "perturb": {"method": "diffusion-noise", "noise": {"timestep": 500}},
            "write": {"card": False},
        },
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sampled(cmd: list[str]) -> dict[str, float]:
    """Run `cmd` in a session of its own and sample every process of that session every 0.1 s: wall time, CPU
    time (user + system of them all, so Ray's raylet and workers count: getrusage(RUSAGE_CHILDREN) misses them,
    they are not reaped through the driver), and peak RSS of the driver (`cmd` itself) and of the largest Ray
    worker (titled `ray::...`). A process that lives less than 0.1 s can be missed, and up to 0.1 s of a
    process's last moments."""
    import threading

    import psutil

    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds
    peaks = {"driver_mib": 0.0, "worker_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for p in psutil.process_iter(["pid", "create_time", "cmdline"]):
                try:
                    if os.getsid(p.pid) != proc.pid:
                        continue
                    t = p.cpu_times()
                    cpu[(p.pid, p.info["create_time"])] = t.user + t.system
                    rss = p.memory_info().rss / 2**20
                    args = p.info["cmdline"] or []
                    if p.pid == proc.pid:
                        peaks["driver_mib"] = max(peaks["driver_mib"], rss)
                    elif args and args[0].startswith("ray::"):
                        peaks["worker_mib"] = max(peaks["worker_mib"], rss)
                except (psutil.Error, ProcessLookupError, PermissionError):
                    continue
            done.wait(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode})")
    wall = time.perf_counter() - start
    time.sleep(3)  # Ray's workers outlive the driver by a few seconds: their CPU counts too
    done.set()
    watcher.join()
    return {"wall_s": wall, "cpu_s": sum(cpu.values()), **peaks}


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the child and every process of its session): see `sampled`."""
    r = sampled(cmd)
    return r["wall_s"], r["cpu_s"]


def save_result(name: str, result: dict) -> None:
    """bench/results/<name>.json, with the machine it was measured on."""
    result = {**result, "cpus": os.cpu_count(), "machine": platform.platform()}
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--side", type=int, default=640, help="long side of the photos in pixels (0: the sample's 320-pixel files)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mfpo-loop-"))
    try:
        (root / "src").mkdir()
        source = write_source(root / "src", args.rows, args.side or None)
        from pipeline.executors import machine_cpus

        cores = machine_cpus()
        parts = write_parts(source, cores)
        runs: dict[str, list[tuple[float, float]]] = {"loop": [], "split": [], "pipeline": []}
        for rep in range(args.reps):
            loop_out = root / f"loop-{rep}.parquet"
            runs["loop"].append(timed([sys.executable, "-c", LOOP, str(source), str(loop_out), str(REPO)]))
            # One shell whose children are the per-core loops: its session is sampled as one run.
            split = " & ".join(
                shlex.join([sys.executable, "-c", LOOP, str(part), str(root / f"split-{rep}-{k}.parquet"), str(REPO)])
                for k, part in enumerate(parts)
            )
            runs["split"].append(timed(["sh", "-c", f"{split} & wait"]))
            out = root / f"out-{rep}"
            cfg = write_config(root, source, out)
            runs["pipeline"].append(timed([sys.executable, "-m", "pipeline", "run", str(cfg)]))
            for name in runs:
                wall, cpu = runs[name][-1]
                print(f"rep {rep}: {name:8s} wall {wall:7.1f} s  cpu {cpu:7.1f} s", flush=True)
        best = {name: min(r[0] for r in rs) for name, rs in runs.items()}
        cpu = {name: min(r[1] for r in rs) for name, rs in runs.items()}
        speedup = best["loop"] / best["pipeline"]
        split_speedup = best["loop"] / best["split"]
        cpu_ratio = cpu["pipeline"] / cpu["loop"]
        print(
            f"{args.rows} rows ({args.side or 320} px) on {cores} cores: loop {best['loop']:.1f} s, "
            f"split {best['split']:.1f} s, pipeline {best['pipeline']:.1f} s "
            f"-> pipeline is {speedup:.2f}x the loop's speed (target >= 1.8x; the split, no framework: "
            f"{split_speedup:.2f}x); "
            f"CPU time pipeline/loop {cpu_ratio:.2f} (target <= 1.15)"
        )
        result = {
            "rows": args.rows,
            "side_px": args.side or 320,
            "reps": args.reps,
            "runs": runs,
            "best_wall_s": best,
            "best_cpu_s": cpu,
            "speedup": speedup,
            "split_speedup": split_speedup,
            "cpu_ratio": cpu_ratio,
        }
        save_result(f"loop_vs_pipeline-{args.rows}-{args.side or 320}px", result)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
