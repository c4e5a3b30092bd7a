"""The model card saved next to a trained model (huggingface_hub's ModelCard): base model, dataset,
curriculum metrics and the training configuration."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

_TEMPLATE = Path(str(resources.files("mfpo.train") / "templates" / "model_card.md.j2"))  # package data


def write_model_card(
    folder: Path,
    cfg: Any,
    dataset_dir: Path,
    summary: dict[str, Any],
    evaluation: tuple[str, str, str] | None = None,
) -> None:
    """`evaluation`: (Markdown table, split, plot file beside the card) from `eval --stages`, which rewrites the
    card with it; a card written by training has none until its stages are evaluated."""
    from huggingface_hub import ModelCard, ModelCardData

    from mfpo.train.config import policy_model_config
    from mfpo.train.data import read_reference

    train = cfg.train
    base_model = policy_model_config(train, read_reference(dataset_dir)).model
    dataset_repo = cfg.push.repo_id if cfg.push is not None else None
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft" if train.finetune == "lora" else "transformers",
        tags=["mfpo", "dpo", "multimodal", "vision-language", "hallucination"],
        pipeline_tag="image-text-to-text",
        datasets=[dataset_repo] if dataset_repo else None,
    )
    nan = float("nan")
    stages = [
        {
            **s,
            "text_acc": s.get("last_metrics", {}).get("accuracy/text", nan),
            "image_acc": s.get("last_metrics", {}).get("accuracy/image", nan),
        }
        for s in summary["stages"]
    ]
    card = ModelCard.from_template(
        card_data,
        base_model=base_model,
        template_path=str(_TEMPLATE),
        run_name=cfg.run.name,
        dataset_repo=dataset_repo,
        dataset_name=dataset_dir.name,
        rows=sum(s["rows"] for s in summary["stages"]),
        finetune=train.finetune,
        stages=stages,
        config_yaml=yaml.safe_dump(json.loads(train.model_dump_json()), sort_keys=False).strip(),
        evaluation=evaluation,
    )
    folder.mkdir(parents=True, exist_ok=True)
    card.save(folder / "README.md")
