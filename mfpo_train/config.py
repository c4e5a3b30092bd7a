"""The `train:` section of a pipeline config. Pydantic only: no torch import here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.stage import StrictModel
from stages.common import ModelConfig


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
        description="0: train in this process (or under accelerate launch); "
        "N: N data-parallel workers through Ray Train, on any node of the cluster.",
    )
    use_gpu: bool = Field(True, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0)


class TrainConfig(StrictModel):
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(model="llava-hf/llava-1.5-7b-hf"),
        description="The policy's starting checkpoint: the score stage's reference model.",
    )
    dataset_dir: str | None = Field(None, description="Default: <run output_dir>/dataset.")
    output_dir: str | None = Field(None, description="Default: <run output_dir>/train.")
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze_vision_tower: bool = Field(True, description="Full fine-tune: keep the vision encoder frozen.")
    loss: LossSettings = Field(default_factory=LossSettings)
    curriculum: CurriculumSettings = Field(default_factory=CurriculumSettings)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    gradient_checkpointing: bool = True
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    system_prompt: str | None = None
    ray: RayTrainSettings = Field(default_factory=RayTrainSettings)

    @model_validator(mode="after")
    def _lora_needs_targets(self) -> TrainConfig:
        if self.finetune == "lora" and not self.lora.target_modules:
            raise ValueError("finetune: lora needs lora.target_modules")
        return self
