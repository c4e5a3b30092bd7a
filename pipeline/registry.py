"""Stages, run hooks and configuration sections registered by name.

Built-in stages live in the `stages` package; third-party packages add theirs through the
`mfpo_pipeline.stages` entry-point group. Run hooks make end-of-run products (the dataset card and its
pictures) once every stage is done; the built-in ones live in `mfpo.publish.hooks`, others come through
the `mfpo_pipeline.run_hooks` group. Configuration sections (`train:`, `push:`, `eval:`) are the
application's models of the config's other top-level keys: each registers with `config_section`, and the
engine's config validates whatever is registered. The engine imports none of them by name in code: it loads
them here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal

from pipeline.errors import ConfigError
from pipeline.stage import Stage

_REGISTRY: dict[str, type[Stage]] = {}
# name -> hook(config, output_dir, statuses): called at the end of `run`, under its lock and log.
_RUN_HOOKS: dict[str, Callable[..., Any]] = {}

_BUILTIN_MODULES = ("stages", "mfpo.publish.hooks", "mfpo.train.config", "mfpo.publish.config", "mfpo.eval.config")
_loaded = False


@dataclass(frozen=True)
class ConfigSection:
    """A top-level config key's model. `when_absent`: `none` (the key is optional: `train:`) or `defaults`
    (validated from `{}`: `push:`, `eval:`); `problems`: more checks of a valid value, as config problems."""

    model: type[Any]
    when_absent: Literal["none", "defaults"] = "defaults"
    problems: Callable[[Any], list[str]] | None = None


_SECTIONS: dict[str, ConfigSection] = {}


def config_section(
    name: str, when_absent: Literal["none", "defaults"] = "defaults", problems: Callable[[Any], list[str]] | None = None
) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: the pydantic model of the config's top-level key `name` (one of `train`, `push`, `eval`)."""

    def add(cls: type[Any]) -> type[Any]:
        _SECTIONS[name] = ConfigSection(cls, when_absent, problems)
        return cls

    return add


def config_sections() -> dict[str, ConfigSection]:
    _load()
    return dict(_SECTIONS)


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available under `cls.name`."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"stage name {cls.name!r} registered twice ({existing} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


def run_hook(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: call `fn(config, output_dir, statuses)` at the end of every `run`."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        _RUN_HOOKS[name] = fn
        return fn

    return add


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for group in ("mfpo_pipeline.stages", "mfpo_pipeline.run_hooks"):
        for ep in entry_points(group=group):
            ep.load()
    _loaded = True


def run_hooks() -> dict[str, Callable[..., Any]]:
    _load()
    return dict(_RUN_HOOKS)


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
