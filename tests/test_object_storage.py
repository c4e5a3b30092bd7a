"""Runs whose output lives in object storage, on a Ray cluster of two nodes without a shared disk: the offline
recipe on `s3://` gives the bytes of a local run, resumes after its driver is killed, and the run lock is a
lease that refuses a second run and is taken over once its holder is gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import cluster_env, ray_cluster, s3_keys, s3_objects, s3_server
from helpers import CHECKPOINTED, CROSS_PROCESS_ATOL, cli, run_and_kill, tree
from tiny_models import save_tiny_llava

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

BUCKET = "mfpo"
# The shards and records a run commits: what must be byte-identical wherever the run wrote them.
COMPARED = (".parquet", ".json")
SKIPPED = ("summary.json", "dataset/README.md", "dataset/mfpo/")


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, model: Path) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "out"
    cli("run", "examples/quickstart.yaml", *_sets(out, model, executor="local"), check=True)
    return _committed(tree(out))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: dict[str, str]):
    root = tmp_path_factory.mktemp("ray")
    with ray_cluster(root, s3, nodes=2, cpus_per_node=1) as address:
        yield address, {**os.environ, **cluster_env(s3, root), "MFPO_CACHE": str(root / "driver-cache")}


def _sets(out: str | Path, model: Path, executor: str = "ray", address: str | None = None) -> list[str]:
    sets = [f"run.output_dir={out}", f"stages.score.model.model={model}", f"run.executor={executor}"]
    if address:
        sets.append(f"run.ray.address={address}")
    return [arg for s in sets for arg in ("--set", s)]


def _committed(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.endswith(COMPARED) and not k.startswith(SKIPPED) and k != ".lock"}


@pytest.mark.ray
def test_s3_output_on_two_nodes_resumes_after_a_kill_to_the_bytes_of_a_local_run(
    cluster, s3, model: Path, local_run: dict[str, bytes]
):
    """One run on the two-node cluster, its driver SIGKILLed after ten commits and resumed: the committed
    shards and records equal a local run's, the card and the log are in the bucket, the lease is gone, and
    no credential was written anywhere."""
    address, env = cluster
    args = ["run", "examples/quickstart.yaml", *_sets(f"s3://{BUCKET}/killed", model, address=address)]
    run_and_kill(args, lambda: sum("/_commits/" in k for k in s3_keys(s3, BUCKET, "killed")), 10, env, poll_s=0.05)
    before = s3_objects(s3, BUCKET, "killed")
    assert ".lock" in before and "dataset/README.md" not in before, "killed in the middle of the run"
    resumed = cli("run", "examples/quickstart.yaml", *args[2:], env=env)
    assert resumed.returncode == 0, resumed.stderr
    objects = s3_objects(s3, BUCKET, "killed")
    assert _committed(objects) == local_run
    assert "dataset/README.md" in objects and "run.log" in objects  # the card and the log went to the bucket
    assert ".lock" not in objects  # the lease is released
    status = cli("status", "examples/quickstart.yaml", "--json", *_sets(f"s3://{BUCKET}/killed", model), env=env)
    assert {s["state"] for s in json.loads(status.stdout)["stages"]} == {"done"}
    secret = s3["AWS_SECRET_ACCESS_KEY"]
    assert all(secret.encode() not in data for data in objects.values()), "a credential was written to the bucket"


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(s3, tmp_path: Path, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    from pipeline.errors import PipelineError
    from pipeline.storage import RunLayout, Store

    store = Store(f"s3://{BUCKET}/leased")
    layout = RunLayout(store)
    live = {"owner": "x", "what": "run", "host": "node-7", "pid": 1, "expires_at": time.time() + 600}
    store.write_json(".lock", live)
    refused = r"another run \(host node-7, pid 1\) is using s3://mfpo/leased"
    with pytest.raises(PipelineError, match=refused), layout.lock():
        pass
    with pytest.raises(PipelineError, match="another run"), layout.lock("push", shared=True):  # a reader too
        pass
    # Expired, or held by a process of this machine that no longer exists: taken over.
    for dead in (
        {**live, "expires_at": time.time() - 1},
        {**live, "host": socket.gethostname(), "pid": _dead_pid()},
    ):
        store.write_json(".lock", dead)
        with layout.lock():
            held = store.read_json(".lock")
            assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
            second = RunLayout(Store(f"s3://{BUCKET}/leased"))
            with pytest.raises(PipelineError, match="another run"), second.lock():  # and it is exclusive
                pass
        assert not store.exists(".lock")


def test_conditional_writes_are_atomic(s3, monkeypatch):
    """The two primitives the lease stands on: create-if-absent and replace-if-unchanged."""
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    from pipeline.storage import Store

    store = Store(f"s3://{BUCKET}/cas")
    assert store.create_exclusive("x", b"1")
    assert not store.create_exclusive("x", b"2")
    version = store.version("x")
    assert store.replace_if("x", b"3", version)
    assert not store.replace_if("x", b"4", version)  # someone else's write in between: refused
    assert store.read_bytes("x") == b"3"


def test_training_into_s3_resumes_on_another_machine_after_a_kill(trained, checkpointed, s3, tmp_path):
    """`train.output_dir: s3://...`: checkpoints and stage records reach the bucket as they are written, commit
    markers last; a training SIGKILLed after two checkpoints resumes from the bucket alone (a new, empty local
    mirror: another machine) and ends with the weights of an uninterrupted local training."""
    import torch
    from safetensors.torch import load_file

    cfg = str(trained[0].parent / "cfg.yaml")
    target = ["--set", f"train.output_dir=s3://{BUCKET}/trained", *CHECKPOINTED]
    env = {**os.environ, **s3, "MFPO_CACHE": str(tmp_path / "machine-1")}
    run_and_kill(
        ["train", cfg, *target],
        lambda: sum(k.endswith("/.committed") for k in s3_keys(s3, BUCKET, "trained")),
        2,
        env,
        0.05,
    )
    before = s3_objects(s3, BUCKET, "trained")
    assert "final/adapter_model.safetensors" not in before, "killed before the end"
    for marker in (k for k in before if k.endswith("/.committed")):  # what is marked is whole
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= {
            k.rsplit("/", 1)[1] for k in before if k.startswith(marker.rsplit("/", 1)[0] + "/")
        }
    env["MFPO_CACHE"] = str(tmp_path / "machine-2")
    proc = cli("train", cfg, "--resume", *target, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-" in proc.stderr or "already done" in proc.stderr
    after = s3_objects(s3, BUCKET, "trained")
    assert "train.log" in after and ".lock" not in after and not any("_cache" in k for k in after)
    straight = load_file(str(checkpointed / "final" / "adapter_model.safetensors"))
    (tmp_path / "remote.safetensors").write_bytes(after["final/adapter_model.safetensors"])
    remote = load_file(str(tmp_path / "remote.safetensors"))
    for k in straight:
        torch.testing.assert_close(straight[k], remote[k], rtol=0, atol=CROSS_PROCESS_ATOL)
    status = cli("status", cfg, "--json", *target, env={**env, "MFPO_CACHE": str(tmp_path / "machine-3")})
    assert {s["state"] for s in json.loads(status.stdout)["train"]} == {"done"}
    # `eval --stages` on a third machine: the stages come from the bucket, the results and the card go back.
    quick = ["--set", "eval.limit=3", "--set", "eval.pope.per_row=1", "--split", "train", "--stages"]
    cli("eval", cfg, *target, *quick, env={**env, "MFPO_CACHE": str(tmp_path / "machine-4")}, check=True)
    evaluated = s3_objects(s3, BUCKET, "trained")
    assert list(json.loads(evaluated["eval/results.json"])) == [
        "reference",
        "stage-0-easy",
        "stage-1-medium",
        "stage-2-hard",
    ]
    assert b"## Evaluation: before and after" in evaluated["final/README.md"] and "final/eval_stages.png" in evaluated
    refused = cli("train", cfg, "--resume", *target, "--set", "train.ray.num_workers=2", env=env)
    assert refused.returncode == 2 and "refused: train.ray.num_workers: Ray Train workers" in refused.stderr


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
