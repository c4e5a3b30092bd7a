"""Pipeline configuration: YAML (safe_load) + `--set key.path=value` overrides, validated by pydantic.

Every error names the full key path; an unknown key gets a did-you-mean; a bad value lists what is
allowed. All errors are reported at once, before any work starts. YAML anchors that would expand to more
than `MAX_YAML_NODES` nodes (an alias bomb, "billion laughs") or refer to themselves are refused from the
parsed node graph, before any Python object is built.
"""

from __future__ import annotations

import re
import reprlib
import types
import typing
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline.errors import ConfigError
from pipeline.registry import config_sections, get_stage
from pipeline.stage import StageConfig
from pipeline.strict import StrictModel

MAX_YAML_NODES = 100_000  # a real config has a few hundred; anchors expanding past this are an alias bomb
_SHOWN = reprlib.Repr()  # "got ..." in messages: bounded, whatever size the bad value has
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 3, 8, 8, 200, 200


class RayConfig(StrictModel):
    address: str | None = Field(
        None, description="Cluster to join (ray://host:10001 or host:6379); unset: RAY_ADDRESS or embedded."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local cluster.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the embedded local cluster.")
    max_retries: int = Field(
        3, ge=0, description="Times a shard is run again when its worker process dies (killed, out of memory)."
    )


class RunConfig(StrictModel):
    name: str = Field("mfpo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str | None = Field(
        None, description="Local folder or URI (s3://bucket/prefix, gs://...). Default: outputs/<run.name>."
    )
    seed: int = 0
    shard_size: int | Literal["auto"] = Field(
        "auto",
        description="Rows per shard (the unit of work, commit and resume), or auto: chosen from the row count and "
        "the cluster's CPUs when the rows are first planned, and kept in ingest/_stage.json for every resume.",
    )
    fuse_stages: bool = Field(
        True,
        description="Run consecutive stages with the same resources (no GPU, at most one model) in one worker pass "
        "per shard; each still commits its own shard. false: one stage per pass.",
    )
    executor: Literal["local", "ray"] = "ray"
    ray: RayConfig = Field(default_factory=RayConfig)
    progress: bool = True

    @field_validator("shard_size", mode="before")
    @classmethod
    def _rows_or_auto(cls, value: Any) -> int | str:
        # One message for both forms (pydantic would report the int and the "auto" branch separately).
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100_000):
            return value
        raise ValueError("must be a number of rows from 1 to 100000, or auto")


class _RawPipelineConfig(StrictModel):
    run: RunConfig = Field(default_factory=RunConfig)
    stages: dict[str, dict[str, Any] | None]
    train: dict[str, Any] | None = None
    push: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None


@dataclass
class PipelineConfig:
    """A validated configuration: run settings and the ordered stage configs."""

    run: RunConfig
    stages: dict[str, StageConfig]  # in execution order
    source_path: Path | None = None
    train: Any = None  # mfpo.train.config.TrainConfig when the config has a `train:` section
    push: Any = None  # mfpo.publish.config.PushConfig (defaults when the config has no `push:` section)
    eval: Any = None  # mfpo.eval.config.EvalConfig (defaults when the config has no `eval:` section)

    @property
    def output_location(self) -> str:
        """Where the run's files live: a local folder or an object-store URI (s3://bucket/prefix, gs://...)."""
        return self.run.output_dir or f"outputs/{self.run.name}"

    @property
    def output_dir(self) -> Path:
        """A local folder for the run's files: the output folder itself, or for an object store its local
        mirror (see `pipeline.storage.Store.local_view`)."""
        from pipeline.storage import local_folder

        return local_folder(self.output_location)

    def to_dict(self) -> dict[str, Any]:
        """What determines the results (for cards and summaries): no paths, no scheduling settings."""
        run = self.run.model_dump(mode="json", exclude={"output_dir", "ray", "executor", "progress", "fuse_stages"})
        # Stage resources are left out like the executor: they change speed, never results (nor fingerprints).
        stages = {n: c.model_dump(mode="json", exclude={"resources"}) for n, c in self.stages.items()}
        return {"run": run, "stages": stages}

    def resolved(self) -> dict[str, Any]:
        """Every section with its defaults filled in, minus what only says where and how fast this machine ran
        it (output folders, executor, cluster). Secrets are never in a config: `*_env` keys name variables."""
        out = self.to_dict()
        if self.train is not None:
            out["train"] = self.train.model_dump(mode="json", exclude={"output_dir", "dataset_dir"})
        if self.push is not None:
            out["push"] = self.push.model_dump(mode="json")
        if self.eval is not None:
            out["eval"] = self.eval.model_dump(mode="json")
        return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"), str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with `run` and `stages`")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = parse_config(raw, origin=str(path))
    cfg.source_path = path
    return cfg


def safe_yaml(text: str, origin: str) -> Any:
    """yaml.safe_load, but the node graph is measured first: PyYAML shares aliased nodes, and whatever walks
    the built objects (validation, error messages) pays for every expansion."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{origin}: the YAML nests too deeply") from None
        if node is None:
            return None
        size = _expanded_size(node, origin)
        if size > MAX_YAML_NODES:
            raise ConfigError(
                f"{origin}: YAML anchors/aliases expand to more than {MAX_YAML_NODES:,} nodes (an alias bomb?); "
                "refusing to load it"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node, origin: str) -> int:
    """Nodes in the document once every alias is expanded, in time linear in the *unexpanded* graph (sizes of
    shared nodes are memoised); an alias inside its own anchor is refused. Iterative: depth cannot overflow."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children(node)), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in children(node):
            if id(child) in open_nodes:
                raise ConfigError(f"{origin}: a YAML alias refers to its own anchor (a recursive document)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`stages.perturb.timestep=300`: the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key.strip()):
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set stages.ingest.limit=100")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
        node = child
    try:
        node[parts[-1]] = safe_yaml(value, f"--set {key.strip()}")
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from err


def parse_config(raw: dict[str, Any], origin: str = "config") -> PipelineConfig:
    problems: list[str] = []
    try:
        top = _RawPipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(origin, _messages(err, _RawPipelineConfig, ()))) from None
    if not top.stages:
        raise ConfigError(f"{origin}: `stages` is empty; list at least `ingest` and `write`")
    stages: dict[str, StageConfig] = {}
    for name, body in top.stages.items():
        try:
            stage_cls = get_stage(name)
        except ConfigError as err:
            problems.append(str(err))
            continue
        try:
            stages[name] = stage_cls.Config.model_validate(body or {})
        except ValidationError as err:
            problems.extend(_messages(err, stage_cls.Config, ("stages", name)))
    if not problems:
        problems.extend(_check_order(stages))
    sections: dict[str, Any] = {}
    registered = config_sections()  # train, push, eval: the application registers their models
    for key in (k for k in _RawPipelineConfig.model_fields if k in registered):
        section, body = registered[key], getattr(top, key)
        if body is None and section.when_absent == "none":
            continue
        try:
            sections[key] = section.model.model_validate(body or {})
        except ValidationError as err:
            problems.extend(_messages(err, section.model, (key,)))
            continue
        if section.problems is not None:
            problems.extend(section.problems(sections[key]))
    if problems:
        raise ConfigError(_format(origin, problems))
    return PipelineConfig(run=top.run, stages=stages, **sections)


def _check_order(stages: dict[str, StageConfig]) -> list[str]:
    """Every stage's input columns must be produced by an earlier stage; the first must be a source."""
    problems: list[str] = []
    produced: set[str] = set()
    for i, name in enumerate(stages):
        cls = get_stage(name)
        if i == 0 and not cls.is_source:
            problems.append(f"stages: the first stage must read a source (e.g. ingest), not {name!r}")
        if i > 0 and cls.is_source:
            problems.append(f"stages.{name}: a source stage must come first")
        if isinstance(cls.inputs, tuple):
            missing = [c for c in (*cls.inputs, *cls.global_inputs) if c not in produced]
            if missing:
                problems.append(
                    f"stages.{name}: needs column(s) {', '.join(missing)} that no earlier stage produces; "
                    "reorder `stages` or add the stage that makes them"
                )
        produced.update(cls.outputs)
    return problems


def _format(origin: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{origin}: {problems[0]}"
    return f"{origin}: {len(problems)} problems:\n  " + "\n  ".join(problems)


def _messages(err: ValidationError, model: type[BaseModel], prefix: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for e in err.errors():
        loc = prefix + tuple(str(p) for p in e["loc"])
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, [p for p in e["loc"][:-1] if isinstance(p, str)])
            allowed = sorted(parent.model_fields) if parent else []
            hint = get_close_matches(str(e["loc"][-1]), allowed, n=1, cutoff=0.6)
            msg = "unknown key"
            msg += f"; did you mean {hint[0]!r}?" if hint else f" (allowed: {', '.join(allowed)})"
            out.append(f"{key}: {msg}")
        elif e["type"] == "missing":
            parent = _model_at(model, [p for p in e["loc"][:-1] if isinstance(p, str)])
            info = parent.model_fields.get(str(e["loc"][-1])) if parent else None
            hint = f" ({info.description})" if info is not None and info.description else ""
            out.append(f"{key}: required key is missing{hint}")
        else:
            out.append(f"{key}: {e['msg']} (got {_SHOWN.repr(e.get('input'))})")
    return out


def _model_at(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in path:
        if current is None or part not in current.model_fields:
            return None
        current = _first_model(current.model_fields[part].annotation)
    return current


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _first_model(arg)
            if found is not None:
                return found
    return None
