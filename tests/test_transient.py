"""Transient errors: an LLM endpoint answering 503 is retried with backoff; a row still failing is quarantined as
`transient: ...` and tried again on the next run (with what later stages made of its shard), unlike a
permanently bad row; the endpoint is reached even with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import chat_endpoint, cli, dataset_rows, quarantine, tree, write_config, write_source

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


class _Endpoint:
    """An OpenAI-compatible chat endpoint: replies a JSON list of objects; 503 for picture 3 while `failing`;
    for picture 5 a reply with no list (a permanent, per-row failure)."""

    def __init__(self) -> None:
        self.failing = True
        self.prompts: list[str] = []

    def answer(self, body: dict, headers: object) -> str | int:
        prompt = body["messages"][0]["content"]
        self.prompts.append(prompt)
        if "picture 3?" in prompt and self.failing:
            return 503
        return "no objects here" if "picture 5?" in prompt else '["disc"]'


@pytest.fixture
def endpoint():
    ep = _Endpoint()
    with chat_endpoint(ep.answer) as url:
        ep.url = url
        yield ep


def _config(path: Path, source: Path, out: Path, url: str) -> Path:
    stages = {
        "ingest": {"source": str(source)},
        "keywords": {"backend": "llm", "llm": {"base_url": url, "model": "m", "retries": 2, "retry_wait_s": 0.01}},
        "write": {},
    }
    return write_config(path, source, out, shard_size=2, stages=stages)


def test_transient_rows_are_retried_on_the_next_run(tmp_path: Path, endpoint: _Endpoint):
    source = write_source(tmp_path / "src", 8, size=(32, 24))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    cfg = _config(tmp_path / "cfg.yaml", source, out, endpoint.url)
    first = cli("run", str(cfg), env=env)
    assert first.returncode == 0, first.stderr
    reasons = quarantine(out, "keywords")
    assert reasons["3"][0].startswith(f"transient: keywords endpoint {endpoint.url}/chat/completions: HTTP 503 after 3")
    assert reasons["5"][0].startswith("keywords: model reply has no JSON list")
    assert sum("picture 3?" in p for p in endpoint.prompts) == 3  # the first try and 2 retries
    assert sorted(r["sample_id"] for r in dataset_rows(out)) == ["0", "1", "2", "4", "6", "7"]

    endpoint.failing = False
    endpoint.prompts.clear()
    second = cli("run", str(cfg), env=env)
    assert second.returncode == 0, second.stderr
    assert "1 shard(s) had rows fail on transient errors; running them again" in second.stderr
    # Only the shard holding the transient row is asked again; the permanently bad row is not.
    assert sorted(p.split("picture ")[1][:1] for p in endpoint.prompts if "picture " in p) == ["2", "3"]
    assert "3" not in quarantine(out, "keywords") and "5" in quarantine(out, "keywords")
    assert sorted(r["sample_id"] for r in dataset_rows(out)) == ["0", "1", "2", "3", "4", "6", "7"]

    # The same bytes as a run that never saw the outage.
    clean = tmp_path / "clean"
    cli("run", str(_config(tmp_path / "clean.yaml", source, clean, endpoint.url)), env=env, check=True)
    skip = ("run.log", ".lock", "summary.json")
    assert tree(out / "dataset" / "data", exclude=skip) == tree(clean / "dataset" / "data", exclude=skip)
    assert tree(out / "keywords", exclude=skip) == tree(clean / "keywords", exclude=skip)
