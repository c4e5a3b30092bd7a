"""Stages registered by name. Built-in stages live in the `stages` package; third-party packages can
add theirs through the `mfpo_pipeline.stages` entry-point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from pipeline.errors import ConfigError
from pipeline.stage import Stage

_REGISTRY: dict[str, type[Stage]] = {}
_loaded = False


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available under `cls.name`."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"stage name {cls.name!r} registered twice ({existing} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    importlib.import_module("stages")
    for ep in entry_points(group="mfpo_pipeline.stages"):
        ep.load()
    _loaded = True


def available_stages() -> dict[str, type[Stage]]:
    _load()
    return dict(_REGISTRY)


def get_stage(name: str) -> type[Stage]:
    stages = available_stages()
    if name not in stages:
        from difflib import get_close_matches

        hint = get_close_matches(name, stages, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"stages.{name}: unknown stage{suggestion} (available: {', '.join(sorted(stages))})")
    return stages[name]
