"""Bad configs fail before any work, with a message that names the key (and a did-you-mean)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import REPO, cli, write_config, write_source

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


GOOD = {"run": {"name": "x"}, "stages": {"ingest": {"source": "data.jsonl"}, "write": {}}}


def _with(path: str, value) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("run.shard_sise", 5, "run.shard_sise: unknown key; did you mean 'shard_size'?"),
        ("stages.ingest.limt", 5, "stages.ingest.limt: unknown key; did you mean 'limit'?"),
        ("stages.ingest.image.max_pixel", 5, "stages.ingest.image.max_pixel: unknown key; did you mean 'max_pixels'?"),
        ("stages.write.spilt", "x", "stages.write.spilt: unknown key; did you mean 'split'?"),
        ("runn", {}, "runn: unknown key; did you mean 'run'?"),
        ("run.executor", "rya", "run.executor: Input should be 'local' or 'ray' (got 'rya')"),
        ("run.shard_size", "many", "run.shard_size: Value error, must be a number of rows from 1 to 100000, or auto"),
        ("run.shard_size", 0, "run.shard_size: Value error, must be a number of rows from 1 to 100000, or auto"),
        ("stages.ingest.limit", "ten", "stages.ingest.limit: Input should be a valid integer"),
        ("stages.ingest.format", "csv", "stages.ingest.format: Input should be 'auto', 'rlhf-v'"),
        ("stages.ingest.resources.workers", "lots", "stages.ingest.resources.workers"),
        ("stages.ingest.image.formats", ["JPEG", "HEIC"], "unknown image format(s) ['HEIC']"),
        ("push.repo", "org/x", "push.repo: unknown key; did you mean 'repo_id'?"),
        ("push.repo_id", "no-slash", "push.repo_id: String should match pattern"),
        ("push.retries", -1, "push.retries: Input should be greater than or equal to 0"),
    ],
)
def test_bad_value_names_the_key(key, value, expected):
    assert expected in _error(_with(key, value))


def test_missing_source_names_key_and_fix():
    raw = _with("stages.ingest", {})
    msg = _error(raw)
    assert "stages.ingest.source: required key is missing (Hub dataset id, or a .jsonl/.json/.parquet file" in msg


def test_unknown_stage_and_order():
    assert "stages.ingset: unknown stage; did you mean 'ingest'?" in _error(
        {"stages": {"ingset": {"source": "x"}, "write": {}}}
    )
    msg = _error({"stages": {"write": {}, "ingest": {"source": "x"}}})
    assert "the first stage must read a source" in msg and "stages.ingest: a source stage must come first" in msg


def test_all_problems_reported_at_once():
    raw = _with("run.seeed", 1)
    raw["stages"]["ingest"]["limt"] = 3
    msg = _error(raw)
    assert "run.seeed" in msg  # top-level errors come first; stage errors after they are fixed
    raw.pop("run")
    raw["stages"]["write"]["cardd"] = True
    msg = _error(raw)
    assert "2 problems" in msg and "stages.ingest.limt" in msg and "stages.write.cardd" in msg


def test_overrides(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(GOOD))
    loaded = load_config(cfg, ["stages.ingest.limit=300", "run.executor=local", "stages.ingest.shuffle=true"])
    assert loaded.stages["ingest"].limit == 300 and loaded.stages["ingest"].shuffle is True
    assert loaded.run.executor == "local"
    assert loaded.output_dir == Path("outputs/x")
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(cfg, ["stages.ingest.limit"])
    with pytest.raises(ConfigError, match=r"stages.ingest.limt: unknown key; did you mean 'limit'"):
        load_config(cfg, ["stages.ingest.limt=3"])


def test_yaml_is_loaded_safely(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: !!python/object/apply:os.system ['echo pwned']\nstages: {}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg)


@pytest.mark.slow
def test_cli_fails_before_any_work(tmp_path: Path):
    src = write_source(tmp_path / "src", 2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", src, out)
    proc = cli("run", str(cfg), "--set", "stages.ingest.limt=3")
    assert proc.returncode == 2
    assert "stages.ingest.limt: unknown key; did you mean 'limit'?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing was started

    proc = cli("run", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr


@pytest.mark.slow
def test_missing_source_file_is_one_line_error(tmp_path: Path):
    cfg = write_config(tmp_path / "cfg.yaml", "does/not/exist.jsonl", tmp_path / "out")
    proc = cli("run", str(cfg))
    assert proc.returncode == 1
    assert "error: stages.ingest.source: file not found: does/not/exist.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" in (tmp_path / "out" / "run.log").read_text()


def test_shipped_configs_validate():
    for name in ("pipeline.yaml", "examples/quickstart.yaml"):
        load_config(REPO / name)
    # pipeline.yaml documents every push key with its default.
    documented = load_config(REPO / "pipeline.yaml").push.model_dump()
    from mfpo.publish.config import PushConfig

    assert set(documented) == set(PushConfig.model_fields)
    # ... and every eval key, with its default.
    import yaml

    from mfpo.eval.config import EvalConfig

    written = yaml.safe_load((REPO / "pipeline.yaml").read_text())["eval"]
    assert set(written) == set(EvalConfig.model_fields)
    assert EvalConfig.model_validate(written) == EvalConfig()


@pytest.mark.slow
def test_eval_section_is_validated(tmp_path: Path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "src.jsonl", tmp_path / "out")
    proc = cli("eval", str(cfg), "--set", "eval.pope.settings=[hardest]")
    assert proc.returncode == 2 and "eval.pope.settings.0: Input should be 'random', 'popular' or 'adversarial'" in (
        proc.stderr
    ), proc.stderr


@pytest.mark.slow
def test_push_options_are_validated_before_any_work(tmp_path: Path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "src.jsonl", tmp_path / "out")
    proc = cli("push", str(cfg), "--repo-id", "not a repo")
    assert proc.returncode == 2 and "push.repo_id: String should match pattern" in proc.stderr
    proc = cli("push", str(cfg))
    assert proc.returncode == 2 and "push needs a repo id: pass --repo-id ORG/NAME or set push.repo_id" in proc.stderr
    proc = cli("push", str(cfg), "--repo-id", "org/name")
    assert proc.returncode == 2 and "refused: stage ingest is pending" in proc.stderr


@pytest.mark.slow
def test_help_everywhere():
    for args in (["--help"], ["run", "--help"], ["status", "--help"], ["preview", "--help"], ["push", "--help"]):
        proc = cli(*args)
        assert proc.returncode == 0 and "Usage" in proc.stdout
