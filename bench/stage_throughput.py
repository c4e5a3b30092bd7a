"""Images/s per data-path stage through the pipeline, against a naive per-image loop on the same models.

    python bench/stage_throughput.py --size tiny --rows 64            # CPU-sized random-weight models
    python bench/stage_throughput.py --size real --rows 256 --gpu     # Grounding DINO (tiny) + SAM ViT-H shapes

`--size real` builds random-weight models with the published architectures (Grounding DINO tiny: Swin-T +
BERT-base text encoder, 800-px processor; SAM ViT-H: 1280 wide, 32 layers, 1024-px processor), saves them
with their processors and loads them through the stages' own `from_pretrained` code, like a Hub checkpoint.
Weights are random, so boxes and masks are meaningless; the work per image is the real one.

Pipeline time is wall time of `python -m pipeline run --only STAGE` for each stage in turn (Ray actors
start, models load, shards are read and written, all included). The naive loop builds each stage once,
then calls it on one image at a time in this process (model loading excluded, no sharding, no writing):
what a quick script around the same models does. Results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the offline model builders the tests use
SAMPLE = REPO / "examples" / "data" / "rlhfv_sample" / "train.jsonl"
STAGES = ["ingest", "keywords", "ground", "segment", "perturb", "write"]


def build_models(root: Path, size: str) -> dict[str, Path]:
    import tiny_models

    if size == "tiny":
        return {
            "ground": tiny_models.save_tiny_grounding_dino(root / "gdino"),
            "segment": tiny_models.save_tiny_sam(root / "sam"),
        }
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    vocab = tiny_models._bert_vocab()
    gdino = GroundingDinoForObjectDetection(GroundingDinoConfig(text_config=BertConfig()))  # Swin-T + BERT-base
    gdino.save_pretrained(root / "gdino")
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(), tokenizer=BertTokenizer(vocab=vocab, do_lower_case=True)
    ).save_pretrained(root / "gdino")
    vit_h = SamVisionConfig(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]
    )
    SamModel(SamConfig(vision_config=vit_h)).save_pretrained(root / "sam")
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(root / "sam")
    return {"ground": root / "gdino", "segment": root / "sam"}


def write_source(root: Path, rows: int) -> Path:
    base = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    lines = []
    for i in range(rows):
        row = dict(base[i % len(base)])
        row["idx"] = i
        lines.append(json.dumps(row))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_configs(models: dict[str, Path], gpu: bool, batch: int) -> dict[str, dict]:
    gpus = 0.5 if gpu else 0.0
    return {
        "ingest": {"source": "", "image_root": str(SAMPLE.parent), "resources": {"batch_size": batch}},
        "keywords": {"resources": {"batch_size": 64}},
        "ground": {
            "model": {"model": str(models["ground"])},
            "box_threshold": 0.0,
            "text_threshold": 0.0,
            "max_boxes": 3,
            "resources": {"gpus": gpus, "batch_size": batch, "cpus": 1},
        },
        "segment": {
            "model": {"model": str(models["segment"])},
            "resources": {"gpus": gpus, "batch_size": batch, "cpus": 1},
        },
        "perturb": {"resources": {"batch_size": batch}},
        "write": {"resources": {"batch_size": batch}},
    }


def run_pipeline(root: Path, source: Path, stages: dict, executor: str, shard_size: int) -> dict[str, float]:
    from pipeline.config import load_config
    from pipeline.runner import Runner

    stages = json.loads(json.dumps(stages))
    stages["ingest"]["source"] = str(source)
    cfg_path = root / "bench.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run": {
                    "name": "bench",
                    "output_dir": str(root / "out"),
                    "executor": executor,
                    "shard_size": shard_size,
                    "progress": False,
                },
                "stages": stages,
            },
            sort_keys=False,
        )
    )
    times = {}
    for name in STAGES:
        runner = Runner(load_config(cfg_path))
        start = time.perf_counter()
        runner.run(only=name)
        times[name] = time.perf_counter() - start
    return times


def naive_loop(root: Path, stages: dict) -> dict[str, float]:
    """Each stage built once, then fed one image at a time (same code, batch 1)."""
    from stage_runner import build_stage

    out = root / "out"
    tables = {
        name: pq.ParquetDataset(sorted(str(p) for p in (out / name).glob("shard-*.parquet"))).read()
        for name in STAGES[:-1]
    }
    ingest = tables["ingest"]
    inputs = {
        "ground": ingest.select(["sample_id", "image", "meta"]).append_column(
            "key_phrases", tables["keywords"].column("key_phrases")
        ),
        "segment": ingest.select(["sample_id", "image"]).append_column("boxes", tables["ground"].column("boxes")),
        "perturb": ingest.select(["sample_id", "image", "question"])
        .append_column("mask", tables["segment"].column("mask"))
        .append_column("key_phrases", tables["keywords"].column("key_phrases")),
    }
    times = {}
    for name, table in inputs.items():
        cfg = {k: v for k, v in stages[name].items() if k != "resources"}
        cfg["resources"] = {**stages[name].get("resources", {}), "batch_size": 1}
        stage = build_stage(name, cfg)
        start = time.perf_counter()
        for i in range(table.num_rows):
            stage.process_batch(table.slice(i, 1))
        times[name] = time.perf_counter() - start
        del stage
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--executor", choices=["ray", "local"], default="ray")
    ap.add_argument("--gpu", action="store_true", help="give the model stages 0.5 GPU per actor")
    args = ap.parse_args()

    import torch

    root = Path(tempfile.mkdtemp(prefix="mfpo-bench-"))
    try:
        models = build_models(root / "models", args.size)
        source = write_source(root, args.rows)
        stages = stage_configs(models, args.gpu, args.batch)
        pipe = run_pipeline(root, source, stages, args.executor, args.shard_size)
        naive = naive_loop(root, stages)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    print(f"{args.rows} images, {args.size} models, {args.executor} executor, batch {args.batch}, device: {device}")
    print(f"{'stage':<10}{'pipeline img/s':>16}{'naive img/s':>14}{'ratio':>8}")
    result = {
        "rows": args.rows,
        "size": args.size,
        "executor": args.executor,
        "batch": args.batch,
        "device": device,
        "stages": {},
    }
    for name in STAGES:
        p = args.rows / pipe[name]
        entry = {"pipeline_images_per_s": round(p, 2)}
        line = f"{name:<10}{p:>16.1f}"
        if name in naive:
            n = args.rows / naive[name]
            entry |= {"naive_images_per_s": round(n, 2), "ratio": round(p / n, 2)}
            line += f"{n:>14.1f}{p / n:>8.2f}"
        result["stages"][name] = entry
        print(line)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    (out / f"stage_throughput-{args.size}-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
