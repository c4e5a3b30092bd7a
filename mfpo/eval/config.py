"""The `eval:` section of a pipeline config (every key has a default; the section may be left out)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mfpo.eval.generate import GenerateSettings
from mfpo.noise import NoiseConfig
from pipeline.registry import config_section
from pipeline.strict import StrictModel

PopeSetting = Literal["random", "popular", "adversarial"]


class ProbeSettings(StrictModel):
    noise: NoiseConfig = Field(
        default_factory=NoiseConfig, description="Noise put in the key region and in a random region of its area."
    )


class PopeSettings(StrictModel):
    settings: list[PopeSetting] = Field(default_factory=lambda: ["random", "popular", "adversarial"])
    per_row: int = Field(3, ge=1, description="Positive questions per image (and as many negatives).")


@config_section("eval")
class EvalConfig(StrictModel):
    split: str = Field("test", description="Dataset split to evaluate on (write.splits makes one).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N rows of the split.")
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    pope: PopeSettings = Field(default_factory=PopeSettings)
    generate: GenerateSettings = Field(
        default_factory=GenerateSettings, description="Answers to an external benchmark's questions (and a judge)."
    )
