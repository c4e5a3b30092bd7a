"""The strict base of every config model, the one piece of the engine's vocabulary the method shares: unknown
keys are errors (the config loader reports them with a did-you-mean)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors (reported with a did-you-mean)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
