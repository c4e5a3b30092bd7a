"""score: one pass of the reference model over each row: difficulty and the reference log-probs.

The reference model is the policy's starting checkpoint (any `AutoModelForImageTextToText` with its
processor: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / 2.5-VL, Idefics3). Per row, on the answer tokens only:

- `difficulty`: entropy of the model's next-token distribution over the chosen answer given
  (question, clean image), full vocabulary, `aggregate: mean` (default) or `sum` per answer; or
  `difficulty: nll`, the chosen answer's negative log-likelihood.
- `ref_logp_chosen` = log pi_ref(y_w | t, m), `ref_logp_rejected` = log pi_ref(y_l | t, m),
  `ref_logp_chosen_noised` = log pi_ref(y_w | t, m') (sums over answer tokens; null where the row has
  no dispreferred image), so training never holds a second model.

The shards' Parquet schema metadata (`mfpo.reference`) records what these log-probs were computed with:
the model and its resolved revision or weights hash, dtype, chat-template hash and system prompt; the write
stage carries it into the dataset and the trainer refuses a policy that would not reproduce them.

The `bucket` stage then ranks the difficulties into the curriculum's easy / medium / hard buckets.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from pipeline.images import decode_rgb
from pipeline.registry import register
from pipeline.stage import BatchResult, Stage, StageConfig
from stages.common import ModelConfig, loading, select_device, select_dtype
from stages.vlm import (
    REFERENCE_KEY,
    answer_scores,
    build_prompt,
    collate,
    load_vlm,
    reference_record,
    with_answer,
)


class ScoreConfig(StageConfig):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(model="llava-hf/llava-1.5-7b-hf"))
    difficulty: Literal["entropy", "nll"] = Field("entropy", description="What difficulty measures.")
    aggregate: Literal["mean", "sum"] = Field("mean", description="Entropy per answer token averaged or summed.")
    system_prompt: str | None = Field(None, description="System turn before the question, if the model wants one.")


@register
class Score(Stage):
    name: ClassVar[str] = "score"
    version: ClassVar[int] = 2  # 2: records its reference model in the shards' metadata
    Config = ScoreConfig
    inputs: ClassVar[tuple[str, ...]] = ("image", "question", "chosen", "rejected", "rejected_image")
    outputs: ClassVar[tuple[str, ...]] = (
        "difficulty",
        "ref_logp_chosen",
        "ref_logp_rejected",
        "ref_logp_chosen_noised",
    )
    config: ScoreConfig

    @property
    def loads_model(self) -> bool:
        return True

    def check(self) -> list[str]:
        return self.config.model.missing_local("stages.score.model.model")

    def setup(self) -> None:
        self.device = select_device(self.resources, self.name)
        self.dtype = select_dtype(self.device, self.config.model.precision)
        with loading(self.config.model.model, "stages.score.model.model"):
            self.model, self.processor = load_vlm(self.config.model, self.device, self.dtype)
        self.model.eval()
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.reference = reference_record(self.config.model, self.processor, self.dtype, self.config.system_prompt)

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        reference = getattr(self, "reference", None)  # known once setup() has loaded the model
        return pa.schema(
            [
                ("sample_id", pa.string()),
                ("difficulty", pa.float64()),
                ("ref_logp_chosen", pa.float64()),
                ("ref_logp_rejected", pa.float64()),
                ("ref_logp_chosen_noised", pa.float64()),
            ],
            metadata={REFERENCE_KEY: json.dumps(reference, sort_keys=True)} if reference else None,
        )

    def _score(self, examples: list[Any]) -> dict[str, Any]:
        import torch

        with torch.inference_mode():
            return answer_scores(self.model, examples, collate(examples, self.pad_id, self.device, self.dtype))

    def process_batch(self, table: pa.Table) -> BatchResult:
        rows = table.to_pylist()
        system = self.config.system_prompt
        # One prompt (image + question) per row serves both answers on the clean image.
        clean = [build_prompt(self.processor, decode_rgb(r["image"]), r["question"], system) for r in rows]
        chosen = self._score([with_answer(self.processor, p, r["chosen"]) for p, r in zip(clean, rows, strict=True)])
        rejected = self._score(
            [with_answer(self.processor, p, r["rejected"]) for p, r in zip(clean, rows, strict=True)]
        )
        noisy_idx = [i for i, r in enumerate(rows) if r["rejected_image"] is not None]
        noised: dict[int, float] = {}
        if noisy_idx:
            scores = self._score(
                [
                    with_answer(
                        self.processor,
                        build_prompt(
                            self.processor, decode_rgb(rows[i]["rejected_image"]), rows[i]["question"], system
                        ),
                        rows[i]["chosen"],
                    )
                    for i in noisy_idx
                ]
            )
            noised = dict(zip(noisy_idx, scores["logp"].tolist(), strict=True))
        if self.config.difficulty == "nll":
            difficulty = (-chosen["logp"]).tolist()
        else:
            difficulty = chosen["entropy_mean" if self.config.aggregate == "mean" else "entropy_sum"].tolist()
        out = [
            {
                "sample_id": r["sample_id"],
                "difficulty": difficulty[i],
                "ref_logp_chosen": float(chosen["logp"][i]),
                "ref_logp_rejected": float(rejected["logp"][i]),
                "ref_logp_chosen_noised": noised.get(i),
            }
            for i, r in enumerate(rows)
        ]
        return BatchResult(pa.Table.from_pylist(out, schema=self.output_schema(table.schema)))
