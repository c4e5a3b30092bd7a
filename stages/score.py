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

from mfpo.models import ModelConfig, loading, select_dtype
from mfpo.text import UnencodableText
from mfpo.vlm import (
    REFERENCE_KEY,
    Example,
    answer_scores,
    build_prompt,
    collate,
    load_vlm,
    reference_record,
    with_answer,
)
from pipeline.errors import first_line
from pipeline.images import decode_rgb
from pipeline.registry import register
from pipeline.stage import BatchResult, Rejection, Stage, StageConfig
from stages.common import select_device


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

    def _encode(self, row: dict[str, Any]) -> list[Example | None]:
        """The row's sequences: chosen and rejected on the clean image, chosen on the dispreferred one (None when
        the row has none). One prompt (image + question) serves both answers on the clean image."""
        system = self.config.system_prompt
        clean = build_prompt(self.processor, decode_rgb(row["image"]), row["question"], system)
        noised = None
        if row["rejected_image"] is not None:
            prompt = build_prompt(self.processor, decode_rgb(row["rejected_image"]), row["question"], system)
            noised = with_answer(self.processor, prompt, row["chosen"])
        return [
            with_answer(self.processor, clean, row["chosen"]),
            with_answer(self.processor, clean, row["rejected"]),
            noised,
        ]

    def _score_each(self, examples: list[Example]) -> list[tuple[float, float, float] | str]:
        """(logp, entropy_mean, entropy_sum) of each sequence, or why the model could not score it. Scored as one
        batch; when that fails, one by one, so a sequence the model refuses costs only its own row."""
        try:
            scores = self._score(examples)
        except (RuntimeError, ValueError, IndexError) as err:
            if _out_of_memory(err):
                raise  # the machine's limit, not the row's: the stage fails and is retried
            if len(examples) > 1:
                return [result for e in examples for result in self._score_each([e])]
            return [f"score: the model cannot score this row ({type(err).__name__}: {first_line(err)})"]
        return list(
            zip(scores["logp"].tolist(), scores["entropy_mean"].tolist(), scores["entropy_sum"].tolist(), strict=True)
        )

    def process_batch(self, table: pa.Table) -> BatchResult:
        rows = table.to_pylist()
        rejected: dict[int, Rejection] = {}
        encoded: dict[int, list[Example | None]] = {}
        for i, row in enumerate(rows):
            try:
                encoded[i] = self._encode(row)
            except UnencodableText as err:
                rejected[i] = Rejection(row["sample_id"], f"score: cannot encode the row ({err})", _brief(row))
        # Three forwards, as many sequences each as rows: chosen, rejected (clean image), chosen on m'.
        results: dict[int, list[tuple[float, float, float] | str | None]] = {i: [None] * 3 for i in encoded}
        for kind in range(3):
            todo = [i for i, seqs in encoded.items() if seqs[kind] is not None]
            if todo:
                for i, result in zip(todo, self._score_each([encoded[i][kind] for i in todo]), strict=True):
                    results[i][kind] = result
        out = []
        for i, (chosen, rejected_answer, noised) in results.items():
            problem = next((r for r in (chosen, rejected_answer, noised) if isinstance(r, str)), None)
            if problem is not None:
                rejected[i] = Rejection(rows[i]["sample_id"], problem, _brief(rows[i]))
                continue
            assert isinstance(chosen, tuple) and isinstance(rejected_answer, tuple)
            logp, entropy_mean, entropy_sum = chosen
            if self.config.difficulty == "nll":
                difficulty = -logp
            else:
                difficulty = entropy_mean if self.config.aggregate == "mean" else entropy_sum
            out.append(
                {
                    "sample_id": rows[i]["sample_id"],
                    "difficulty": difficulty,
                    "ref_logp_chosen": logp,
                    "ref_logp_rejected": rejected_answer[0],
                    "ref_logp_chosen_noised": noised[0] if isinstance(noised, tuple) else None,
                }
            )
        schema = self.output_schema(table.schema)
        return BatchResult(pa.Table.from_pylist(out, schema=schema), [rejected[i] for i in sorted(rejected)])


def _out_of_memory(err: BaseException) -> bool:
    """Out of memory is the machine's limit, not the row's fault: the stage fails (and is retried) instead."""
    return "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError"


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    """The texts of a quarantined row (its images are in the ingest output)."""
    return {k: row[k] for k in ("question", "chosen", "rejected") if k in row}
