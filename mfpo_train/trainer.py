"""MFPO training on transformers' Trainer: a collator that builds the three sequences of each row, a
Trainer whose loss is MFPO on one concatenated forward, and the easy-to-hard curriculum around it.

Checkpointing, resume, schedulers, mixed precision and multi-GPU (DDP, DeepSpeed ZeRO, FSDP through
`accelerate launch -m pipeline train CONFIG`) come from transformers / accelerate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from transformers import Trainer, TrainingArguments

from mfpo_train.config import TrainConfig
from mfpo_train.loss import LossWeights, mfpo_loss
from pipeline.errors import PipelineError
from pipeline.images import decode_rgb
from stages.common import select_dtype
from stages.vlm import answer_logps, answer_spans, build_prompt, collate, load_vlm, with_answer

log = logging.getLogger("mfpo")
REF_COLUMNS = ("ref_logp_chosen", "ref_logp_rejected", "ref_logp_chosen_noised")


def read_rows(dataset_dir: Path) -> list[dict[str, Any]]:
    files = sorted((dataset_dir / "data").glob("*.parquet"))
    if not files:
        raise PipelineError(f"no dataset shards under {dataset_dir}/data: run the pipeline first")
    columns = [
        "sample_id",
        "images",
        "question",
        "chosen_text",
        "rejected_text",
        "rejected_image",
        "bucket",
        *REF_COLUMNS,
    ]
    schema = pq.read_schema(files[0])
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise PipelineError(f"the dataset lacks {', '.join(missing)}: add the score and bucket stages before write")
    return [r for f in files for r in pq.read_table(f, columns=columns).to_pylist()]


class RowsDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


@dataclass
class MFPOCollator:
    """Rows -> one batch of 3B sequences: (y_w | m) x B, then (y_l | m) x B, then (y_w | m') x B."""

    processor: Any
    system_prompt: str | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        chosen, rejected, noised, has_image, reference = [], [], [], [], []
        for r in rows:
            clean = decode_rgb(r["images"][0])
            dispreferred = decode_rgb(r["rejected_image"]) if r["rejected_image"] is not None else clean
            prompt = build_prompt(self.processor, clean, r["question"], self.system_prompt)  # shared by two answers
            noised_prompt = build_prompt(self.processor, dispreferred, r["question"], self.system_prompt)
            chosen.append(with_answer(self.processor, prompt, r["chosen_text"]))
            rejected.append(with_answer(self.processor, prompt, r["rejected_text"]))
            noised.append(with_answer(self.processor, noised_prompt, r["chosen_text"]))
            has_image.append(r["rejected_image"] is not None and r["ref_logp_chosen_noised"] is not None)
            reference.append([r["ref_logp_chosen"], r["ref_logp_rejected"], r["ref_logp_chosen_noised"] or 0.0])
        examples = chosen + rejected + noised
        tok = self.processor.tokenizer
        batch = collate(
            examples, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, "cpu", torch.float32
        )
        batch["answer_spans"] = answer_spans(examples)
        batch["reference"] = torch.tensor(reference, dtype=torch.float64)
        batch["has_image"] = torch.tensor(has_image)
        return batch


class MFPOTrainer(Trainer):
    """A Trainer whose loss is MFPO; the three policy passes of a batch run as one forward."""

    def __init__(self, *args: Any, weights: LossWeights, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights = weights
        self._metrics: dict[str, list[float]] = {}

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        spans = inputs.pop("answer_spans")
        reference = inputs.pop("reference")
        has_image = inputs.pop("has_image")
        outputs = model(**inputs)
        logps = answer_logps(outputs.logits, inputs["input_ids"], spans)[0]
        policy = logps.view(3, -1).T  # (B, 3): chosen | m, rejected | m, chosen | m'
        loss, metrics = mfpo_loss(policy, reference, has_image, self.weights)
        for k, v in metrics.items():
            self._metrics.setdefault(k, []).append(float(v))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics:
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items()}}
            self._metrics = {}
        super().log(logs, start_time)


def build_policy(cfg: TrainConfig) -> tuple[Any, Any]:
    # Trainer places the model and casts activations (bf16 autocast); weights load in fp32 on CPU.
    cuda = torch.cuda.is_available()
    dtype = select_dtype(torch.device("cuda"), cfg.model.precision) if cuda else torch.float32
    model, processor = load_vlm(cfg.model, "cpu", dtype)
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            bias="none",
        )
        model = get_peft_model(model, lora)
    elif cfg.freeze_vision_tower:
        for name, param in model.named_parameters():
            if "vision_tower" in name or "vision_model" in name or name.startswith("visual."):
                param.requires_grad_(False)
    return model, processor


def training_arguments(cfg: TrainConfig, out: Path, seed: int, epochs: float) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    bf16 = cuda and cfg.model.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=cuda and not bf16 and cfg.model.precision != "fp32",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable tensor takes part in each MFPO forward
        report_to=cfg.report_to or "none",
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )


def curriculum_stages(cfg: TrainConfig, rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    known = {r["bucket"] for r in rows}
    unknown = known - set(cfg.curriculum.order)
    if unknown:
        raise PipelineError(
            f"train.curriculum.order: buckets {sorted(unknown)} of the dataset are not in the order "
            f"{cfg.curriculum.order}"
        )
    if cfg.curriculum.all_at_once:
        return [("all", rows)]
    return [(b, [r for r in rows if r["bucket"] == b]) for b in cfg.curriculum.order]


def refresh_reference(model: Any, processor: Any, rows: list[dict[str, Any]], cfg: TrainConfig) -> None:
    """Recompute the rows' reference log-probs with the current policy (the option between stages)."""
    collator = MFPOCollator(processor, cfg.system_prompt)
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(rows), cfg.per_device_train_batch_size):
            chunk = rows[start : start + cfg.per_device_train_batch_size]
            batch = collator(chunk)
            spans = batch.pop("answer_spans")
            batch.pop("reference")
            has_image = batch.pop("has_image")
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = answer_logps(model(**batch).logits, batch["input_ids"], spans)[0].view(3, -1).T.double()
            for r, lp, keep in zip(chunk, logps.cpu().tolist(), has_image.tolist(), strict=True):
                r["ref_logp_chosen"], r["ref_logp_rejected"] = lp[0], lp[1]
                r["ref_logp_chosen_noised"] = lp[2] if keep else None
    model.train()


def train(cfg: TrainConfig, dataset_dir: Path, out: Path, seed: int, resume: bool = False) -> dict[str, Any]:
    """Run the curriculum; returns a summary (per stage: rows, steps, last metrics)."""
    from transformers import set_seed

    rows = read_rows(dataset_dir)
    stages = curriculum_stages(cfg, rows)
    set_seed(seed)  # the adapters' random initialisation too: the same seed gives the same run
    model, processor = build_policy(cfg)
    collator = MFPOCollator(processor, cfg.system_prompt)
    weights = LossWeights(cfg.loss.beta, cfg.loss.eta, cfg.loss.w_text, cfg.loss.w_image, cfg.loss.w_margin)
    summary: dict[str, Any] = {"stages": []}
    for k, (bucket, subset) in enumerate(stages):
        stage_dir = out / f"stage-{k}-{bucket}"
        done = stage_dir / "stage.json"
        if resume and done.exists():
            _load_weights(model, stage_dir / "final", cfg)
            summary["stages"].append(json.loads(done.read_text()))
            log.info("train: stage %d (%s) already done", k, bucket)
            continue
        if not subset:
            log.warning("train: bucket %s has no rows; skipped", bucket)
            continue
        if cfg.curriculum.refresh_reference and k > 0:
            refresh_reference(model, processor, subset, cfg)
        args = training_arguments(cfg, stage_dir, seed, cfg.curriculum.epochs_per_stage)
        trainer = MFPOTrainer(
            model=model, args=args, train_dataset=RowsDataset(subset), data_collator=collator, weights=weights
        )
        checkpoint = _last_checkpoint(stage_dir) if resume else None
        log.info(
            "train: stage %d (%s), %d rows%s",
            k,
            bucket,
            len(subset),
            f", resuming from {checkpoint.name}" if checkpoint else "",
        )
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        trainer.save_model(str(stage_dir / "final"))  # (rank 0 only, under DDP)
        lead = trainer.is_world_process_zero()
        if lead:
            processor.save_pretrained(stage_dir / "final")
        history = [h for h in trainer.state.log_history if "loss/text" in h]
        record = {
            "stage": k,
            "bucket": bucket,
            "rows": len(subset),
            "sample_ids": [r["sample_id"] for r in subset],
            "steps": trainer.state.global_step,
            "world_size": trainer.args.world_size,
            "train_loss": result.training_loss,
            "last_metrics": history[-1] if history else {},
        }
        if lead:
            done.write_text(json.dumps(record, indent=2) + "\n")
        summary["stages"].append(record)
    if is_lead():
        final = out / "final"
        _unwrap(model).save_pretrained(final)
        processor.save_pretrained(final)
    return summary


def is_lead() -> bool:
    """Whether this process writes shared files: always outside distributed training, else rank 0."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _last_checkpoint(stage_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not stage_dir.is_dir():
        return None
    last = get_last_checkpoint(str(stage_dir))
    return Path(last) if last else None


def _load_weights(model: Any, folder: Path, cfg: TrainConfig) -> None:
    """Put a finished stage's weights back into the model (resume after that stage)."""
    from safetensors.torch import load_file

    if cfg.finetune == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    else:
        state: dict[str, Any] = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        model.load_state_dict(state, strict=False)


def read_stage_records(out: Path) -> dict[str, Any]:
    """The summary of a finished run, from the stage records rank 0 wrote."""
    return {"stages": [json.loads(p.read_text()) for p in sorted(out.glob("stage-*/stage.json"))]}
