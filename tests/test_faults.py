"""Faults on a cluster: a worker process killed mid-shard is retried and the bytes do not change; what would fail
on every worker is refused before Ray starts; errors from inside Ray reach the user as one line naming the
real cause; logs that are not a terminal carry no ANSI codes."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, SAMPLE_JSONL, cli, grabcut_stages, scored_stages, tree, write_config

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

# The weight-free data path on the bundled sample; GrabCut makes each shard take long enough to be caught.
STAGES = grabcut_stages(SAMPLE_JSONL)


def _actors_running_a_shard() -> list[int]:
    """PIDs of Ray actor processes executing a shard right now (Ray titles them ray::_ShardActor.run)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if "ray::_ShardActor.run" in line]


@pytest.mark.ray
def test_actor_killed_mid_shard_is_retried_with_identical_bytes(tmp_path: Path):
    reference = tmp_path / "reference"
    cli("run", str(write_config(tmp_path / "ref.yaml", SAMPLE_JSONL, reference, shard_size=2, stages=STAGES)))

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, out, executor="ray", shard_size=2, stages=STAGES)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(cfg)],
        cwd=REPO,
        env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed: list[int] = []
    deadline = time.monotonic() + 300
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        # Once segment has started: a GrabCut shard is the slow one, so the kill lands inside process_batch.
        if (out / "segment" / "_stage.json").exists():
            for pid in _actors_running_a_shard()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed, "no actor was caught running a shard"
    assert proc.returncode == 0, stderr
    assert tree(out, exclude=("run.log", ".lock", "summary.json")) == tree(
        reference, exclude=("run.log", ".lock", "summary.json")
    )
    assert "\x1b[" not in stdout + stderr, "ANSI escape codes in a log that is not a terminal"


def test_missing_model_directory_is_refused_before_ray_starts(tmp_path: Path):
    missing = "outputs/models/no-such-model"
    stages = scored_stages(Path(missing))
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", executor="ray", stages=stages)
    proc = cli("run", str(cfg))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("run test ->")]
    assert lines[0] == (
        f"error: stages.score.model.model: model directory {missing} does not exist (the offline recipe's models "
        "are built by `make demo`)"
    ), proc.stderr
    assert len(lines) <= 2  # the error, and where the details are
    assert "starting Ray" not in (tmp_path / "out" / "run.log").read_text()


def test_uncached_hub_model_offline_is_refused_before_ray_starts(tmp_path: Path):
    stages = scored_stages(Path("no-org/no-model"))
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", executor="ray", stages=stages)
    proc = cli("run", str(cfg), env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1
    assert (
        "error: stages.score.model.model: no-org/no-model is not in the local Hub cache and HF_HUB_OFFLINE=1 "
        "forbids downloading it" in proc.stderr
    ), proc.stderr
    assert "starting Ray" not in (tmp_path / "out" / "run.log").read_text()


def test_model_that_fails_to_load_in_a_worker_is_one_line_naming_it(tmp_path: Path):
    """A model directory that exists but does not load fails inside the Ray workers' setup(): the user gets one
    line with the config key, the model and the real error, not Ray's "the actor died ... repr=<...>"."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava", "text_config": ')  # torn file
    cfg = write_config(
        tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out", executor="ray", stages=scored_stages(broken)
    )
    proc = cli("run", str(cfg))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: stage score: stages.score.model.model: cannot load '{broken}': "), errors[0]
    assert "actor died" not in proc.stderr and "repr=" not in proc.stderr and "\x1b[" not in proc.stderr
    after = proc.stderr[proc.stderr.index("error:") :].strip().splitlines()
    assert len(after) == 2 and after[1].startswith("(details in "), proc.stderr  # the error, then where to look


def test_unwritable_output_directory_names_the_key_and_the_path(tmp_path: Path):
    target = "/sys/mfpo-pipeline-test/out"  # not writable by anyone, root included (EPERM)
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, Path(target))
    proc = cli("run", str(cfg))
    assert proc.returncode == 1
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith(f"error: run.output_dir: cannot create {target}") or first.startswith(
        "error: run.output_dir: cannot create /sys/mfpo-pipeline-test"
    ), proc.stderr
    assert "Errno" not in first


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_missing_filesystem_package_is_one_line_with_the_install_command(tmp_path: Path):
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out")
    for command in ("run", "status"):
        proc = cli(command, str(cfg), "--set", "run.output_dir=gs://bucket/run")
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            "error: gs://bucket/run: gs:// storage needs a package that is not installed: "
            "pip install 'mfpo-pipeline[gcs]'"
        ), proc.stderr


def test_object_store_without_credentials_is_one_line(tmp_path: Path):
    cfg = write_config(tmp_path / "cfg.yaml", SAMPLE_JSONL, tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/none")
    for command in ("run", "status"):
        proc = cli(command, str(cfg), "--set", "run.output_dir=s3://bucket/run", env=env)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [
            "error: s3://bucket/run: NoCredentialsError: Unable to locate credentials"
        ], proc.stderr
