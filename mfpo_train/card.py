"""The model card saved next to a trained model: base model, dataset, configuration, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def write_model_card(folder: Path, cfg: Any, dataset_dir: Path, summary: dict[str, Any]) -> None:
    train = cfg.train
    front = {
        "base_model": train.model.model,
        "library_name": "peft" if train.finetune == "lora" else "transformers",
        "tags": ["mfpo", "dpo", "multimodal", "hallucination"],
        "pipeline_tag": "image-text-to-text",
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.run.name}: MFPO fine-tune of {train.model.model}",
        "",
        "Trained with mfpo-pipeline's MFPO trainer (Modality-Fair Preference Optimization, arXiv 2410.15334): "
        "text preference, image preference (clean over region-perturbed image) and a reward anchor, over an "
        "easy-to-hard curriculum.",
        "",
        f"- dataset: `{dataset_dir.name}` ({sum(s['rows'] for s in summary['stages'])} rows)",
        f"- fine-tune: {train.finetune}",
        "",
        "## Curriculum",
        "",
        "| stage | bucket | rows | steps | train loss | text acc. | image acc. |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary["stages"]:
        m = s.get("last_metrics", {})
        lines.append(
            f"| {s['stage']} | {s['bucket']} | {s['rows']} | {s['steps']} | {s['train_loss']:.4f} | "
            f"{m.get('accuracy/text', float('nan')):.3f} | {m.get('accuracy/image', float('nan')):.3f} |"
        )
    lines += [
        "",
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump(json.loads(train.model_dump_json()), sort_keys=False).strip(),
        "```",
        "",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
