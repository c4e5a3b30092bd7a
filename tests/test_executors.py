"""The local and Ray executors write the same files, byte for byte, from the same config; so do fused passes
and one stage per pass, with shards streaming from one stage's Ray pool to the next."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from helpers import SAMPLE_JSONL, cli, encode, grabcut_stages, quarantine, rlhfv_line, tree, write_config, write_source
from PIL import Image

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

# The final dataset of a small run: one file, however many processing shards made it.
ONE_FILE = ["dataset/data/train-00000-of-00001.parquet"]


@pytest.mark.ray
def test_local_and_ray_give_identical_outputs(tmp_path: Path):
    src = write_source(tmp_path / "src", 23)
    (tmp_path / "src" / "images" / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "src" / "images" / "tiny.png").write_bytes(encode(Image.new("RGB", (2, 2)), "PNG"))
    with open(src, "a", encoding="utf-8") as fh:
        fh.write(rlhfv_line(100, "images/bad.jpg") + "\n" + rlhfv_line(101, "images/tiny.png") + "\n")
    outputs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        cfg = write_config(tmp_path / f"{executor}.yaml", src, out, executor=executor, shard_size=3)
        proc = cli("run", str(cfg), check=True)
        if executor == "ray":
            assert "Ray actor(s)" in proc.stderr  # it really ran on an actor pool
        outputs[executor] = tree(out)
    assert outputs["local"] == outputs["ray"]
    assert len([k for k in outputs["ray"] if k.startswith("write/train/shard-")]) == 9  # processing shards
    assert [k for k in outputs["ray"] if k.startswith("dataset/data/")] == ONE_FILE
    assert set(quarantine(tmp_path / "ray")) == {"100", "101"}


def _commit_times(log: str) -> dict[str, list[str]]:
    """Stage -> the times (as logged) at which its shards were committed, in order."""
    out: dict[str, list[str]] = {}
    for time_, stage in re.findall(r"^\S+ (\S+) DEBUG mfpo: stage (\w+): committed shard", log, re.M):
        out.setdefault(stage, []).append(time_)
    return out


@pytest.mark.ray
def test_fused_passes_and_streaming_stages_give_identical_outputs(tmp_path: Path):
    """The weight-free path (GrabCut, noise) three ways: in-process with every stage in one pass; on Ray with the
    default passes (one); on Ray with segment on resources of its own, so three passes on three pools, where
    shards must stream: perturb commits shards while segment is still working. Same bytes every time."""
    outputs, logs = {}, {}
    for name, executor, own_pool in (("local", "local", False), ("ray", "ray", False), ("stream", "ray", True)):
        stages = grabcut_stages(SAMPLE_JSONL)
        stages["ingest"]["limit"] = 12
        # A slow segment (several seconds on its one actor), so that streaming, not luck, decides whether perturb
        # commits before segment ends: perturb's worker needs a few seconds to start and import torch.
        stages["segment"]["grabcut"] = {"iterations": 20}
        for stage in stages.values():  # pools that fit side by side on the 2 CPUs of the test cluster
            stage["resources"] = {"workers": 1}
        if own_pool:
            stages["segment"]["resources"] = {"workers": 1, "cpus": 1}
        cfg = write_config(
            tmp_path / f"{name}.yaml", SAMPLE_JSONL, tmp_path / name, executor=executor, shard_size=2, stages=stages
        )
        cli("run", str(cfg), check=True)
        outputs[name] = tree(tmp_path / name)
        logs[name] = (tmp_path / name / "run.log").read_text()
    assert "passes: ingest+keywords+ground+segment+perturb+write" in logs["ray"]
    assert "passes: ingest+keywords+ground | segment | perturb+write" in logs["stream"]
    assert outputs["local"] == outputs["ray"] == outputs["stream"]
    assert len([k for k in outputs["local"] if k.startswith("write/train/shard-")]) == 6  # processing shards
    assert [k for k in outputs["local"] if k.startswith("dataset/data/")] == ONE_FILE
    times = _commit_times(logs["stream"])
    assert min(times["perturb"]) < max(times["segment"]), "perturb waited for every segment shard"
    again = cli("run", str(tmp_path / "ray.yaml"), check=True)  # nothing left to do: no Ray, no worker starts
    assert "starting Ray" not in again.stderr and "actor" not in again.stderr
    assert tree(tmp_path / "ray") == outputs["ray"]


@pytest.mark.ray
def test_a_pool_grows_when_its_upstream_pool_is_released(tmp_path: Path):
    """Segment's pool starts beside ingest's with what the cluster leaves it (one actor); once ingest's pass is
    done and its actors are released, segment takes the freed CPUs (a second actor) for the shards it has left.
    The output does not depend on how many actors did the work."""
    outputs, logs = {}, {}
    for executor in ("local", "ray"):
        stages = grabcut_stages(SAMPLE_JSONL)
        stages["ingest"]["limit"] = 12
        stages["segment"]["grabcut"] = {"iterations": 20}  # slow: shards are left when ingest's pass ends
        for name in ("ingest", "keywords", "ground"):
            stages[name]["resources"] = {"workers": 2, "cpus": 1}
        stages["segment"]["resources"] = {"cpus": 1}  # no fixed worker count: sized, then grown, by the cluster
        for name in ("perturb", "write"):
            stages[name]["resources"] = {"cpus": 0.5}
        cfg = write_config(
            tmp_path / f"{executor}.yaml",
            SAMPLE_JSONL,
            tmp_path / executor,
            executor=executor,
            shard_size=2,
            stages=stages,
            ray={"num_cpus": 4},
        )
        cli("run", str(cfg), check=True)
        outputs[executor] = tree(tmp_path / executor)
        logs[executor] = (tmp_path / executor / "run.log").read_text()
    log = logs["ray"]
    assert "passes: ingest+keywords+ground | segment | perturb+write" in log
    # 4 CPUs, 2 held by ingest's pool, 1 left for the driver: one segment actor; then ingest's 2 are freed.
    assert "stage segment: 1 Ray actor(s)" in log
    assert "stage segment: 1 more Ray actor(s)" in log
    assert outputs["local"] == outputs["ray"]
    assert len([k for k in outputs["ray"] if k.startswith("write/train/shard-")]) == 6  # processing shards
    assert [k for k in outputs["ray"] if k.startswith("dataset/data/")] == ONE_FILE


def test_a_pass_decodes_each_image_once(monkeypatch: pytest.MonkeyPatch):
    """Inside a worker pass (decode_once), the stages after ingest get ingest's pixels without decoding again;
    every caller gets its own writable copy; outside a pass every call decodes."""
    import numpy as np

    from pipeline import images

    data = encode(Image.new("RGB", (40, 30), (10, 200, 30)), "JPEG")
    opened = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    with images.decode_once():
        images.validate_image(data, images.ImageLimits())  # ingest
        first, second = images.decode_rgb(data), images.decode_rgb({"bytes": data, "path": None})  # two stages
    assert len(opened) == 1
    first[0, 0] = 0  # a stage that draws on its copy changes nobody else's
    assert first.flags.writeable and not np.array_equal(first, second)
    assert np.array_equal(second, np.asarray(real_open(io.BytesIO(data)).convert("RGB")))
    images.decode_rgb(data)
    assert len(opened) == 2
