"""Peak memory of training as the dataset grows: the trainer reads rows memory-mapped through `datasets`
and decodes images per batch, so its memory should not follow the row count.

    python bench/train_memory.py                 # 1k and 20k rows, tiny random-weight LLaVA, CPU

Each size is a fresh process training one epoch over every row (LoRA, batch 16). Reported per size: peak
anonymous memory (the process's own heap: `RssAnon`, sampled every 50 ms) and peak RSS (`VmHWM`, which
also counts the pages of the memory-mapped Arrow cache the process has read: page cache the kernel can
drop). For contrast, the same for reading every row into Python objects, as the trainer used to.
Ratios 20k / 1k are printed from one run.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_dataset(folder: Path, rows: int, model: Path) -> Path:
    """A finished MFPO dataset of `rows` rows (64x64 photos, noised m'), with the reference record of `model`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoProcessor

    from mfpo.models import ModelConfig
    from mfpo.vlm import REFERENCE_KEY, reference_record

    rng = np.random.default_rng(0)
    record = reference_record(ModelConfig(model=str(model)), AutoProcessor.from_pretrained(model), "float32", None)
    record["dtype"] = "float32"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("sample_id", pa.string()),
            ("images", pa.list_(image_type)),
            ("question", pa.string()),
            ("chosen_text", pa.string()),
            ("rejected_text", pa.string()),
            ("rejected_image", image_type),
            ("bucket", pa.string()),
            ("ref_logp_chosen", pa.float64()),
            ("ref_logp_rejected", pa.float64()),
            ("ref_logp_chosen_noised", pa.float64()),
        ],
        metadata={REFERENCE_KEY: json.dumps(record, sort_keys=True)},
    )

    def encode(arr: np.ndarray, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        return buf.getvalue()

    (folder / "data").mkdir(parents=True)
    per_shard = 1000
    for shard, start in enumerate(range(0, rows, per_shard)):
        batch = []
        for i in range(start, min(start + per_shard, rows)):
            photo = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            noised = photo.copy()
            noised[16:48, 16:48] = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            batch.append(
                {
                    "sample_id": str(i),
                    "images": [{"bytes": encode(photo, "JPEG"), "path": None}],
                    "question": f"What is in picture {i}?",
                    "chosen_text": "A small square of colour.",
                    "rejected_text": "A large dog on a sofa.",
                    "rejected_image": {"bytes": encode(noised, "PNG"), "path": None},
                    "bucket": ("easy", "medium", "hard")[i % 3],
                    "ref_logp_chosen": -50.0,
                    "ref_logp_rejected": -60.0,
                    "ref_logp_chosen_noised": -50.5,
                }
            )
        pq.write_table(
            pa.Table.from_pylist(batch, schema=schema), folder / "data" / f"train-{shard:05d}-of-99999.parquet"
        )
    return folder


def watch(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]))
        time.sleep(0.05)


def measure(code: str) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(proc.pid, peaks, stop))
    thread.start()
    started = time.perf_counter()
    _, err = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(err.decode()[-3000:])
    return {
        "anon_mb": peaks.get("RssAnon", 0) / 1024,
        "rss_mb": peaks.get("VmHWM", 0) / 1024,
        "seconds": time.perf_counter() - started,
    }


TRAIN = """
import sys; sys.path.insert(0, {tests!r})
from pathlib import Path
from mfpo.train.command import train_folder
from mfpo.train.config import TrainConfig
cfg = TrainConfig.model_validate({{"model": {{"model": {model!r}}}, "finetune": "lora",
    "lora": {{"r": 4, "alpha": 8, "dropout": 0.0}}, "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "logging_steps": 1000, "save_steps": 100000,
    "learning_rate": 1e-4}})
train_folder(cfg, Path({dataset!r}), Path({out!r}))
"""
MATERIALISE = """
import pyarrow.parquet as pq
from pathlib import Path
rows = [r for f in sorted(Path({dataset!r}).glob("data/*.parquet")) for r in pq.read_table(f).to_pylist()]
print(len(rows))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 20000])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_memory-tiny-cpu.json"))
    args = parser.parse_args()
    from tiny_models import save_tiny_llava

    results: dict[str, dict[str, dict[str, float]]] = {"train": {}, "read every row": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_llava(root / "tiny-llava")
        for n in args.sizes:
            dataset = make_dataset(root / f"data-{n}", n, model)
            results["train"][str(n)] = measure(
                TRAIN.format(tests=str(REPO / "tests"), model=str(model), dataset=str(dataset), out=str(root / f"t{n}"))
            )
            results["read every row"][str(n)] = measure(MATERIALISE.format(dataset=str(dataset)))
            print(n, "rows:", json.dumps({k: v[str(n)] for k, v in results.items()}), flush=True)
    small, large = (str(n) for n in args.sizes)
    for what, by_size in results.items():
        a, b = by_size[small], by_size[large]
        print(
            f"{what:15s} peak anon {a['anon_mb']:.0f} -> {b['anon_mb']:.0f} MB (x{b['anon_mb'] / a['anon_mb']:.2f}), "
            f"peak RSS {a['rss_mb']:.0f} -> {b['rss_mb']:.0f} MB (x{b['rss_mb'] / a['rss_mb']:.2f})"
        )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
