"""Training samples/s: the MFPO trainer against TRL's DPOTrainer (plain DPO) on the same model, batch,
steps and hardware, measured in one run.

    python bench/train_throughput.py                     # tiny random-weight LLaVA, CPU
    python bench/train_throughput.py --size 7b --lora    # LLaVA-1.5-7B shapes, random weights, on a GPU

MFPO runs three policy sequences per row (chosen / rejected on the clean image, chosen on the
dispreferred image) in one forward and reads the reference log-probs the score stage stored; DPO runs
two policy sequences and, with TRL's default reference handling, two reference sequences per row. Both
train with the same optimizer settings; the first step (compilation, allocation) is not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
SAMPLE = REPO / "examples" / "data" / "rlhfv_sample" / "train.jsonl"


class StepTimer:
    """A TrainerCallback that records the wall time of every optimizer step after the first."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step > 1:
                    timer.times.append(time.perf_counter() - timer.start)

        self.start = 0.0
        self.times: list[float] = []
        self.callback = _Callback()


def model_dir(root: Path, size: str) -> Path:
    import tiny_models

    if size == "tiny":
        return tiny_models.save_tiny_llava(root / "model")
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    base = tiny_models.save_tiny_llava(root / "model")  # its processor and tokenizer, reused
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.patch_size = 14
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=LlamaConfig(
            vocab_size=len(processor.tokenizer),
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            max_position_embeddings=4096,
        ),
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model"


def rows(model: Path, n: int) -> list[dict]:
    """MFPO rows with reference log-probs from the score stage's own code."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image
    from stage_runner import run_stage

    from pipeline.images import encode_png

    src = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    table = []
    for i in range(n):
        s = src[i % len(src)]
        text = json.loads(s["text"])
        data = (SAMPLE.parent / s["image"]).read_bytes()
        arr = np.asarray(Image.open(SAMPLE.parent / s["image"]).convert("RGB")).copy()
        arr[: arr.shape[0] // 2] = 255 - arr[: arr.shape[0] // 2]
        table.append(
            {
                "sample_id": str(i),
                "image": {"bytes": data, "path": None},
                "question": text["question"],
                "chosen": text["chosen"],
                "rejected": text["rejected"],
                "rejected_image": {"bytes": encode_png(Image.fromarray(arr)), "path": None},
            }
        )
    scored = run_stage(
        "score", {"model": {"model": str(model)}, "resources": {"batch_size": 4}}, pa.Table.from_pylist(table)
    ).table.to_pylist()
    return [
        {**t, "images": [t["image"]], "chosen_text": t["chosen"], "rejected_text": t["rejected"], **sc}
        for t, sc in zip(table, scored, strict=True)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from mfpo_train.config import TrainConfig
    from mfpo_train.loss import LossWeights
    from mfpo_train.trainer import MFPOCollator, MFPOTrainer, RowsDataset, build_policy, training_arguments

    cuda = torch.cuda.is_available()
    root = Path(tempfile.mkdtemp(prefix="mfpo-train-bench-"))
    path = model_dir(root, args.size)
    data = rows(path, args.batch * (args.steps + 1))
    common = {
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-5,
        "max_steps": args.steps + 1,
        "logging_steps": 1000,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not cuda,
        "bf16": cuda,
        "seed": 0,
        "remove_unused_columns": False,
        "gradient_checkpointing": args.size != "tiny",
    }

    # MFPO
    cfg = TrainConfig.model_validate(
        {
            "model": {"model": str(path)},
            "finetune": "lora" if args.lora else "full",
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": args.size != "tiny",
        }
    )
    policy, processor = build_policy(cfg)
    targs = training_arguments(cfg, root / "mfpo", 0, 1.0)
    targs.max_steps, targs.save_strategy, targs.logging_steps = args.steps + 1, "no", 1000
    mfpo_timer = StepTimer()
    MFPOTrainer(
        model=policy,
        args=targs,
        train_dataset=RowsDataset(data),
        data_collator=MFPOCollator(processor),
        weights=LossWeights(),
        callbacks=[mfpo_timer.callback],
    ).train()
    del policy
    if cuda:
        mfpo_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    # TRL DPO on the same rows, model, batch and steps
    from PIL import Image

    def as_trl(r: dict) -> dict:
        import io

        return {
            "images": [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}],
        }

    trl_data = datasets.Dataset.from_list([as_trl(r) for r in data])
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=cfg.lora.target_modules)
    dpo_timer = StepTimer()
    DPOTrainer(
        model=model,
        args=DPOConfig(output_dir=str(root / "dpo"), beta=0.1, max_length=None, **common),
        train_dataset=trl_data,
        processing_class=AutoProcessor.from_pretrained(path),
        peft_config=peft_config,
        callbacks=[dpo_timer.callback],
    ).train()
    dpo_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    mfpo_sps = args.batch / (sum(mfpo_timer.times) / len(mfpo_timer.times))
    dpo_sps = args.batch / (sum(dpo_timer.times) / len(dpo_timer.times))
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(
        f"{args.size} model, batch {args.batch}, {args.steps} timed steps, {'LoRA' if args.lora else 'full'}, {device}"
    )
    print(f"MFPO (3 policy sequences / row, stored reference): {mfpo_sps:.2f} samples/s")
    print(f"TRL DPO (2 policy + 2 reference sequences / row):  {dpo_sps:.2f} samples/s")
    print(f"ratio MFPO / DPO: {mfpo_sps / dpo_sps:.2f}")
    result = {
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "lora": args.lora,
        "device": device,
        "mfpo_samples_per_s": round(mfpo_sps, 3),
        "dpo_samples_per_s": round(dpo_sps, 3),
        "ratio": round(mfpo_sps / dpo_sps, 3),
    }
    if cuda:
        result |= {"mfpo_peak_gib": round(mfpo_peak, 2), "dpo_peak_gib": round(dpo_peak, 2)}
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_throughput-{args.size}-{'gpu' if cuda else 'cpu'}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
