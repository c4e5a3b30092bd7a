"""Step-0 gap between the trainer's policy log-probs and the reference log-probs the score stage stored.

    python bench/reference_gap.py            # tiny random-weight LLaVA on the bundled sample, CPU

At step 0 a LoRA policy is its base model (lora_B starts at zero), so with the same model, prompt and
numeric regime |log pi(y|x) - log pi_ref(y|x)| should be ~0 for every answer; anything else is a bias
MFPO's rewards start with. Measured per answer (sums over answer tokens), max and mean over the rows:

- fp32 / fp32: score and trainer both fp32 weights (the CPU default);
- bf16 / bf16: both bf16 weights, no autocast (the trainer's regime for `precision: auto` on CUDA, here
  on the CPU as a stand-in for the GPU);
- bf16 / fp32+autocast: the score stage in bf16, the trainer in fp32 weights under bf16 autocast (what
  the trainer did before it shared the score stage's regime).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def scored(tmp: Path, model: Path, precision: str) -> Path:
    import yaml
    from helpers import scored_stages

    stages = scored_stages(model, rows=12)
    stages["score"]["model"]["precision"] = precision
    out = tmp / f"out-{precision}"
    cfg = {
        "run": {"name": "gap", "output_dir": str(out), "executor": "local", "shard_size": 4, "progress": False},
        "stages": stages,
    }
    path = tmp / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path)], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return out / "dataset"


def gaps(dataset: Path, model: Path, precision: str, autocast: bool) -> list[float]:
    import pyarrow.parquet as pq
    import torch

    from mfpo.train.config import TrainConfig
    from mfpo.train.data import MFPOCollator
    from mfpo.train.trainer import build_policy
    from mfpo.vlm import answer_logps

    cfg = TrainConfig.model_validate({"model": {"model": str(model), "precision": precision}})
    policy, processor, dtype = build_policy(cfg, cfg.model)
    if autocast:
        policy = policy.float()
        dtype = torch.float32
    policy.eval()
    rows = [r for f in sorted((dataset / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    collator = MFPOCollator(processor, None, dtype)
    out: list[float] = []
    for start in range(0, len(rows), 4):  # the trainer's batches: 3 sequences per row, one forward
        chunk = rows[start : start + 4]
        batch = collator(chunk)
        spans, reference = batch.pop("answer_spans"), batch.pop("reference")
        batch.pop("has_image")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps = answer_logps(policy(**batch).logits, batch["input_ids"], spans)[0].view(3, -1).T.double()
        out += (logps - reference).abs().flatten().tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reference_gap-tiny-cpu.json"))
    args = parser.parse_args()
    from tiny_models import save_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = save_tiny_llava(tmp_path / "tiny-llava")
        fp32, bf16 = scored(tmp_path, model, "fp32"), scored(tmp_path, model, "bf16")
        results = {}
        for name, dataset, precision, autocast in (
            ("fp32 / fp32", fp32, "fp32", False),
            ("bf16 / bf16", bf16, "bf16", False),
            ("bf16 / fp32+autocast", bf16, "bf16", True),
        ):
            values = gaps(dataset, model, precision, autocast)
            results[name] = {"answers": len(values), "max": max(values), "mean": sum(values) / len(values)}
            print(
                f"{name:24s} max |policy - ref| {max(values):.2e} nats, mean {sum(values) / len(values):.2e} "
                f"over {len(values)} answers"
            )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
