"""The `train:` section of a pipeline config. Pydantic only: transformers is imported only to check keys
that are passed through to `TrainingArguments`."""

from __future__ import annotations

import dataclasses
import typing
from difflib import get_close_matches
from typing import Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from mfpo.models import ModelConfig
from mfpo.train.records import TrainRefused
from pipeline.registry import config_section
from pipeline.strict import StrictModel


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        description="Module names, or a regex over full module names, that get adapters; by default the "
        "language model's attention projections (not the vision tower's).",
    )


class LossSettings(StrictModel):
    beta: float = Field(0.1, gt=0, description="Reward scale, as in DPO.")
    eta: float = Field(0.0, description="Anchor the chosen reward must stay above (L_margin).")
    w_text: float = Field(1.0, ge=0)
    w_image: float = Field(1.0, ge=0)
    w_margin: float = Field(1.0, ge=0)


class CurriculumSettings(StrictModel):
    order: list[str] = Field(
        default_factory=lambda: ["easy", "medium", "hard"],
        min_length=1,
        description="Buckets trained in this order, each continuing from the last.",
    )
    epochs_per_stage: float = Field(1.0, gt=0)
    all_at_once: bool = Field(False, description="One stage over every bucket (the paper's ablation).")
    refresh_reference: bool = Field(
        False,
        description="Recompute reference log-probs of the next bucket with the current policy before training it.",
    )


class RayTrainSettings(StrictModel):
    num_workers: int = Field(
        0,
        ge=0,
        description="0: train in this process (or under accelerate launch / torchrun); "
        "N: N data-parallel workers through Ray Train, on any node of the cluster.",
    )
    use_gpu: bool | Literal["auto"] = Field("auto", description="One GPU per worker; auto: when the cluster has them.")
    cpus_per_worker: float = Field(1.0, gt=0)
    start_timeout_s: float = Field(
        120.0, gt=0, description="Give up (one line) if the workers cannot be placed within this many seconds."
    )


# TrainingArguments the trainer sets itself, and the key that controls each instead.
MANAGED_ARGUMENTS = {
    "output_dir": "train.output_dir",
    "num_train_epochs": "train.curriculum.epochs_per_stage",
    "seed": "run.seed",
    "data_seed": "run.seed",
    "bf16": "train.model.precision",
    "fp16": "train.model.precision",
    "use_cpu": "the machine (CUDA when visible)",
    "remove_unused_columns": "the trainer (it needs every column)",
    "resume_from_checkpoint": "--resume",
    "gradient_checkpointing_kwargs": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing_kwargs": "train.gradient_checkpointing",
    "warmup_steps": "train.warmup_ratio",
    "do_train": "the trainer",
}
# Options that change how a run is watched or stored, never the weights it produces: left out of the
# curriculum stages' fingerprints, so changing them does not redo finished stages.
SPEED_ONLY = {
    "output_dir",
    "dataset_dir",
    "eval_after_each_stage",
    "logging_steps",
    "save_steps",
    "report_to",
    "ray",
    "gradient_checkpointing",
    "prefix_sharing",  # the same function as the concatenated forward, up to float rounding
    "reference_check",
    "push_to_hub",
    "run_name",
    "disable_tqdm",
    "per_device_eval_batch_size",
    "skip_memory_metrics",
}
SPEED_ONLY_PREFIXES = ("logging_", "save_", "eval_", "hub_", "dataloader_", "log_", "include_")


@config_section("train", when_absent="none", problems=lambda cfg: argument_problems(cfg))
class TrainConfig(StrictModel):
    # Any other key is passed to transformers.TrainingArguments (checked by `argument_problems`).
    model_config = ConfigDict(extra="allow", validate_default=True)

    model: ModelConfig | None = Field(
        None,
        description="The policy's starting checkpoint; default: the reference model the dataset was scored with.",
    )
    dataset_dir: str | None = Field(None, description="Default: <run output_dir>/dataset.")
    output_dir: str | None = Field(None, description="Default: <run output_dir>/train.")
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze_vision_tower: bool = Field(True, description="Full fine-tune: keep the vision encoder frozen.")
    loss: LossSettings = Field(default_factory=LossSettings)
    curriculum: CurriculumSettings = Field(default_factory=CurriculumSettings)
    schedule: Literal["curriculum", "stage"] = Field(
        "curriculum",
        description="curriculum: one learning-rate schedule and optimizer state across all stages (warm-up once); "
        "stage: both restart at every stage.",
    )
    reference_check: Literal["error", "warn"] = Field(
        "error",
        description="When the policy's starting point differs from the dataset's reference model: refuse, or warn.",
    )
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    gradient_checkpointing: bool = True
    prefix_sharing: bool | Literal["auto"] = Field(
        "auto",
        description="Run each image+prompt prefix once and score the answers on its KV cache (2 prefixes per row "
        "instead of 3; gradients reach the vision tower through the cache): the same log-probs and gradients as the "
        "concatenated forward up to float rounding, faster when the image prefix is long. auto: on where the model "
        "supports it (LLaVA-style models with plain 1-D positions; also under gradient_checkpointing), else the "
        "concatenated forward (Qwen2-VL's M-RoPE, per-token image markers, sliding-window layers); true: refuse "
        "such a model before training; false: always the concatenated forward.",
    )
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1)
    report_to: list[str] = Field(default_factory=list, description="tensorboard, wandb, ... (transformers names).")
    system_prompt: str | None = None
    ray: RayTrainSettings = Field(default_factory=RayTrainSettings)
    eval_after_each_stage: bool = Field(
        False, description="After training: `eval --stages` (the reference model and every stage) on eval.split."
    )

    @model_validator(mode="after")
    def _lora_needs_targets(self) -> TrainConfig:
        if self.finetune == "lora" and not self.lora.target_modules:
            raise ValueError("finetune: lora needs lora.target_modules")
        return self

    @property
    def extra_arguments(self) -> dict[str, Any]:
        """Keys of this section that go to TrainingArguments as they are."""
        return dict(self.model_extra or {})

    def weight_fields(self) -> dict[str, Any]:
        """Everything that changes the trained weights (for the stages' fingerprints)."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in sorted(data.items()) if k not in SPEED_ONLY and not k.startswith(SPEED_ONLY_PREFIXES)}


def argument_problems(cfg: TrainConfig) -> list[str]:
    """`train.<key>` problems of the keys passed through to TrainingArguments: unknown (with a did-you-mean
    over every accepted key), set by the trainer itself, or of the wrong type."""
    extras = cfg.extra_arguments
    if not extras:
        return []
    from transformers import TrainingArguments  # only when there is something to check (it imports torch)

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    hints = typing.get_type_hints(TrainingArguments)
    problems = []
    for key, value in extras.items():
        if key in MANAGED_ARGUMENTS:
            problems.append(f"train.{key}: set by the trainer; use {MANAGED_ARGUMENTS[key]}")
        elif key not in fields:
            allowed = sorted((fields - MANAGED_ARGUMENTS.keys()) | set(TrainConfig.model_fields))
            hint = get_close_matches(key, allowed, n=1, cutoff=0.6)
            problems.append(
                f"train.{key}: unknown key"
                + (f"; did you mean {hint[0]!r}?" if hint else " (not a TrainingArguments option)")
            )
        else:
            try:
                TypeAdapter(hints[key]).validate_python(value)
            except ValidationError as err:
                problems.append(f"train.{key}: {err.errors()[0]['msg']} (got {value!r})")
    return problems


def policy_model_config(cfg: TrainConfig, reference: dict[str, Any] | None) -> ModelConfig:
    """train.model, or the reference model the dataset was scored with."""
    if cfg.model is not None:
        return cfg.model
    if reference is None:
        raise TrainRefused(
            "train.model is not set and the dataset does not record its reference model: set train.model"
        )
    return ModelConfig(model=reference["model"], revision=reference.get("revision"))
