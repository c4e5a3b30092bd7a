"""Training samples/s: the MFPO trainer (prefix sharing on and off) against TRL's DPOTrainer (plain DPO) on the
same model, rows, batch, optimizer settings and hardware, measured in one process, interleaved.

    python bench/train_throughput.py                      # tiny random-weight LLaVA, 576 image tokens, CPU
    python bench/train_throughput.py --lora               # the same with LoRA adapters (policy and DPO alike)
    python bench/train_throughput.py --prefix-sharing on  # MFPO with prefix sharing only (and DPO)
    python bench/train_throughput.py --size 7b --lora     # LLaVA-1.5-7B shapes, random weights, on a GPU

The tiny model has LLaVA-1.5's prefix shape: a CLIP vision tower at 336 px with 14 px patches, so every image is
24 x 24 = 576 image tokens, with tiny hidden sizes (vision 32, language model 64, two layers each) so it runs on
a CPU. Its tokenizer is byte-level (one token per byte), so questions and answers are ~4x as many tokens as
LLaVA's own tokenizer would make of them: the shared prefix is a smaller part of each sequence than in LLaVA-1.5.

Per row, MFPO runs three policy sequences (chosen and rejected on the clean image, chosen on the dispreferred
image) and reads the reference log-probs the score stage stored; with prefix sharing (the trainer's default)
the image+prompt prefix runs once per image (two per row) and the three answers continue its KV cache, without
it all three full sequences run in one forward. DPO runs two policy sequences and, with TRL's default reference
handling, two reference sequences per row (no gradient). Full fine-tuning keeps the vision tower frozen in both
(MFPO's `freeze_vision_tower` default); LoRA puts the same adapters on both.

Each method's Trainer is built once; then `--rounds` rounds each train it for 1 + `--steps` steps, in a rotating
order, so that load from other processes on the machine falls on all of them alike. The first step of every
round (allocation, warm-up) is not timed. `step` times are the Trainer's optimizer steps (forward, backward,
optimizer; data loading excluded, as TRL tokenizes and processes the images of its whole dataset before
training while MFPO's collator decodes and processes each batch's images); `end to end` is the time between
consecutive step ends (data loading included); `per CPU-s` divides by the CPU time the process spent in the
step, which other processes on a shared machine do not inflate (with `--threads 1` it equals the wall time of
an idle machine). samples/s is batch / median time; the ratios are from the same run. Results go to
bench/results/train_throughput-<size>[-lora]-<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "examples" / "data" / "rlhfv_sample" / "train.jsonl"


class StepTimer:
    """A TrainerCallback recording each optimizer step after the first of every `train()` call: its own time
    (begin to end), the CPU time this process spent on it, and the time since the previous step ended (data
    loading included)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer.start = time.perf_counter()
                timer.cpu_start = time.process_time()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                now = time.perf_counter()
                if state.global_step > 1:
                    timer.steps.append(now - timer.start)
                    timer.cpu.append(time.process_time() - timer.cpu_start)
                    timer.ends.append(now - timer.last_end)
                timer.last_end = now

        self.start = self.last_end = self.cpu_start = 0.0
        self.steps: list[float] = []
        self.cpu: list[float] = []
        self.ends: list[float] = []
        self.callback = _Callback()


def model_dir(root: Path, size: str) -> Path:
    """A random-weight LLaVA with LLaVA-1.5's vision input (336 px, 14 px patches: 576 image tokens), tiny or
    at 7B shapes, saved with its processor (the tiny LLaVA's byte-level tokenizer and chat template)."""
    import tiny_models

    tiny = tiny_models.save_tiny_llava(root / "tiny", image_size=336, patch_size=14)
    if size == "tiny":
        return tiny
    import torch
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny)  # the tiny model's processor and tokenizer, at 7B shapes
    tokenizer = processor.tokenizer
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
            vocab_size=len(tokenizer),
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            max_position_embeddings=4096,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model"


def rows(n: int) -> list[dict[str, Any]]:
    """MFPO rows from the bundled RLHF-V sample: the dispreferred image is the clean one with its top half
    inverted (a stand-in for region noise: any other image costs the same)."""
    import numpy as np
    from PIL import Image

    from pipeline.images import encode_png

    src = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    out = []
    for i in range(n):
        s = src[i % len(src)]
        text = json.loads(s["text"])
        data = (SAMPLE.parent / s["image"]).read_bytes()
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
        arr[: arr.shape[0] // 2] = 255 - arr[: arr.shape[0] // 2]
        out.append(
            {
                "sample_id": str(i),
                "images": [{"bytes": data, "path": None}],
                "question": text["question"],
                "chosen_text": text["chosen"],
                "rejected_text": text["rejected"],
                "rejected_image": {"bytes": encode_png(Image.fromarray(arr)), "path": None},
                "bucket": "easy",
            }
        )
    return out


def with_reference(model: Any, collator: Any, data: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference log-probs the score stage would store (the policy at step 0 is the reference), added to
    `data`; returns token counts of the sequences."""
    import torch

    from mfpo.vlm import answer_logps

    prompts, answers = [], []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), 4):
            chunk = data[start : start + 4]
            batch = collator(
                [{**r, "ref_logp_chosen": 0.0, "ref_logp_rejected": 0.0, "ref_logp_chosen_noised": 0.0} for r in chunk]
            )
            spans = batch.pop("answer_spans")
            for k in ("reference", "has_image"):
                batch.pop(k)
            logps = answer_logps(model(**batch).logits, batch["input_ids"], spans)[0].view(3, -1).T.tolist()
            for r, (chosen, rejected, noised) in zip(chunk, logps, strict=True):
                r.update(ref_logp_chosen=chosen, ref_logp_rejected=rejected, ref_logp_chosen_noised=noised)
            prompts += spans[:, 0].tolist()
            answers += (spans[:, 1] - spans[:, 0]).tolist()
    model.train()
    return {"prompt_tokens_mean": statistics.mean(prompts), "answer_tokens_mean": statistics.mean(answers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per method and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument(
        "--prefix-sharing",
        choices=["both", "on", "off"],
        default="both",
        help="MFPO with train.prefix_sharing true, false, or both (default)",
    )
    args = ap.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from mfpo.loss import LossWeights
    from mfpo.train.config import TrainConfig
    from mfpo.train.data import MFPOCollator, RowsDataset
    from mfpo.train.trainer import MFPOTrainer, build_policy, training_arguments

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU, fewer threads than cores contend less with others
    cuda = torch.cuda.is_available()
    root = Path(tempfile.mkdtemp(prefix="mfpo-train-bench-"))
    path = model_dir(root, args.size)
    steps = 1 + args.steps
    data = rows(args.batch * steps)
    checkpointing = args.size != "tiny"

    # MFPO: the trainer's own policy, collator, arguments and Trainer; one policy for both variants.
    cfg = TrainConfig.model_validate(
        {
            "model": {"model": str(path)},
            "finetune": "lora" if args.lora else "full",
            "lora": {"dropout": 0.0},
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": checkpointing,
            "learning_rate": 1e-5,
            "warmup_ratio": 0.0,
        }
    )
    assert cfg.model is not None
    policy, processor, dtype = build_policy(cfg, cfg.model)
    collator = MFPOCollator(processor, None, dtype)
    tokens = with_reference(policy, collator, data)
    table = datasets.Dataset.from_list(data).with_format("arrow")
    timers: dict[str, StepTimer] = {}
    trainers: dict[str, Any] = {}
    variants = {"on": True, "off": False}
    for name in ["on", "off"] if args.prefix_sharing == "both" else [args.prefix_sharing]:
        targs = training_arguments(cfg, root / f"mfpo-{name}", 0, 1.0, False)
        targs.max_steps, targs.save_strategy, targs.logging_steps = steps, "no", 1000
        timers[f"mfpo_{name}"] = StepTimer()
        trainers[f"mfpo_{name}"] = MFPOTrainer(
            model=policy,
            args=targs,
            train_dataset=RowsDataset(table, list(range(len(data)))),
            data_collator=collator,
            weights=LossWeights(),
            prefix_sharing=variants[name],
            callbacks=[timers[f"mfpo_{name}"].callback],
        )

    # TRL DPO on the same rows (clean image, chosen / rejected), model, batch, optimizer settings.
    from PIL import Image

    def as_trl(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "images": [Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB")],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen_text"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected_text"]}]}],
        }

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        lora = cfg.lora
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.target_modules, bias="none"
        )
    else:
        for name, param in model.named_parameters():  # as MFPO's freeze_vision_tower
            if "vision_tower" in name:
                param.requires_grad_(False)
    timers["dpo"] = StepTimer()
    trainers["dpo"] = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(root / "dpo"),
            beta=0.1,
            max_length=None,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            learning_rate=1e-5,
            max_steps=steps,
            logging_steps=1000,
            save_strategy="no",
            report_to="none",
            use_cpu=not cuda,
            bf16=False,  # both in the weights' dtype, no autocast (MFPO's regime)
            seed=0,
            remove_unused_columns=False,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            disable_tqdm=True,
        ),
        train_dataset=datasets.Dataset.from_list([as_trl(r) for r in data]),
        processing_class=AutoProcessor.from_pretrained(path),
        peft_config=peft_config,
        callbacks=[timers["dpo"].callback],
    )

    names = list(trainers)
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            trainers[name].train()
            recent = statistics.median(timers[name].steps[-args.steps :])
            print(f"round {r + 1}/{args.rounds} {name}: median step {recent:.3f} s", flush=True)

    def sps(times: list[float]) -> float:
        return args.batch / statistics.median(times)

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    result: dict[str, Any] = {
        "size": args.size,
        "machine": platform.platform(),
        "image_tokens": 576,
        **{k: round(v, 1) for k, v in tokens.items()},
        "batch": args.batch,
        "timed_steps_per_method": args.steps * args.rounds,
        "rounds": args.rounds,
        "lora": args.lora,
        "device": device,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average before and after the timed rounds: > cpus means other processes took CPU time
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
    }
    print(
        f"{args.size} model (576 image tokens, prompt {tokens['prompt_tokens_mean']:.0f} / answer "
        f"{tokens['answer_tokens_mean']:.0f} tokens on average), batch {args.batch}, {args.steps} x {args.rounds} "
        f"timed steps each, {'LoRA' if args.lora else 'full'}, {device}"
    )
    labels = {
        "mfpo_on": "MFPO, prefix sharing (2 prefixes + 3 answers / row)",
        "mfpo_off": "MFPO, concatenated (3 full sequences / row)",
        "dpo": "TRL DPO (2 policy + 2 reference sequences / row)",
    }
    kinds = {"": "steps", "_cpu": "cpu", "_end_to_end": "ends"}  # key suffix -> StepTimer list
    for name in names:
        for suffix, times in kinds.items():
            result[f"{name}_samples_per_s{suffix}"] = round(sps(getattr(timers[name], times)), 3)
        step, cpu, e2e = (result[f"{name}_samples_per_s{suffix}"] for suffix in kinds)
        print(f"{labels[name]:<54} {step:7.2f} samples/s  {cpu:7.2f} per CPU-s  {e2e:7.2f} end to end")
    pairs = [(f"{n}_vs_dpo", n, "dpo") for n in names if n != "dpo"]
    if "mfpo_on" in trainers and "mfpo_off" in trainers:
        pairs.append(("sharing_on_vs_off", "mfpo_on", "mfpo_off"))
    for label, a, b in pairs:
        for suffix in kinds:
            ratio = result[f"{a}_samples_per_s{suffix}"] / result[f"{b}_samples_per_s{suffix}"]
            result[f"ratio_{label}{suffix}"] = round(ratio, 3)
        step, cpu, e2e = (result[f"ratio_{label}{suffix}"] for suffix in kinds)
        print(f"ratio {a} / {b}: {step:.2f} (step wall time), {cpu:.2f} (step CPU time), {e2e:.2f} (end to end)")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = f"train_throughput-{args.size}{'-lora' if args.lora else ''}-{'gpu' if cuda else 'cpu'}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote bench/results/{name}")


if __name__ == "__main__":
    main()
