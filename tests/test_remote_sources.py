"""Sources that are not on the local disk: a JSONL with image files beside it and a folder of Parquet files in
an S3 bucket, and a JSONL in a Hub dataset repo (`hf://datasets/...`), ingest to the same bytes as the same
files on disk; relative image paths resolve beside the source and may not leave its folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cluster import _client, s3_server
from helpers import REPO, cli, tree
from hub_server import HubServer

SAMPLE = REPO / "examples" / "data" / "rlhfv_sample"
BUCKET = "sources"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample, plus a row whose image path leaves the folder and one whose image is missing."""
    folder = tmp_path_factory.mktemp("src") / "rlhfv_sample"
    shutil.copytree(SAMPLE, folder, ignore=shutil.ignore_patterns("*.py", "README.md"))
    first = json.loads((SAMPLE / "train.jsonl").read_text().splitlines()[0])
    extra = [{**first, "idx": 1000, "image": "../outside.jpg"}, {**first, "idx": 1001, "image": "images/gone.jpg"}]
    with (folder / "train.jsonl").open("a") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in extra)
    shutil.copy(folder / "images" / "astronaut.jpg", folder.parent / "outside.jpg")  # exists, but outside
    return folder


def _upload(env: dict[str, str], folder: Path, prefix: str) -> None:
    client = _client(env)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())
    outside = folder.parent / "outside.jpg"
    if outside.exists():
        client.put_object(Bucket=BUCKET, Key=f"{prefix.rsplit('/', 1)[0]}/outside.jpg", Body=outside.read_bytes())


def _ingest(out: Path, source: str, env: dict[str, str] | None = None, fmt: str = "rlhf-v") -> dict[str, bytes]:
    sets = [f"run.output_dir={out}", f"stages.ingest.source={source}", f"stages.ingest.format={fmt}"]
    proc = cli(
        "run", "examples/quickstart.yaml", "--only", "ingest", "--set", "run.executor=local",
        *[arg for s in sets for arg in ("--set", s)], env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {k: v for k, v in tree(out).items() if k.startswith(("ingest/shard-", "quarantine/ingest/"))}


def _reasons(files: dict[str, bytes]) -> list[str]:
    import io

    import pyarrow.parquet as pq

    return sorted(
        r
        for k, v in files.items()
        if k.startswith("quarantine/")
        for r in pq.read_table(io.BytesIO(v))["reason"].to_pylist()
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, source: Path) -> dict[str, bytes]:
    return _ingest(tmp_path_factory.mktemp("local") / "out", str(source / "train.jsonl"))


def test_jsonl_and_images_in_a_bucket_ingest_like_local_files(s3, source, local, tmp_path):
    assert _reasons(local) == [
        "image: file not found: images/gone.jpg",
        "image: path '../outside.jpg' is outside the image folder",
    ]
    _upload(s3, source, "data/rlhfv_sample")
    remote = _ingest(tmp_path / "out", f"s3://{BUCKET}/data/rlhfv_sample/train.jsonl", env={**_env(), **s3})
    assert remote == local


def test_parquet_folder_in_a_bucket_ingests_like_the_local_folder(s3, local, tmp_path):
    shards = tmp_path / "parquet"
    shards.mkdir()
    for name, data in local.items():
        if name.startswith("ingest/shard-"):
            (shards / Path(name).name).write_bytes(data)  # ingest's own output is a `flat` table
    on_disk = _ingest(tmp_path / "from-disk", str(shards), fmt="flat")
    assert any(k.startswith("ingest/shard-") for k in on_disk)
    _upload(s3, shards, "tables/parquet")
    remote = _ingest(tmp_path / "from-s3", f"s3://{BUCKET}/tables/parquet", env={**_env(), **s3}, fmt="flat")
    assert remote == on_disk


@pytest.mark.slow
def test_missing_object_is_one_line(s3, tmp_path):
    sets = ["--set", f"run.output_dir={tmp_path / 'out'}", "--set", f"stages.ingest.source=s3://{BUCKET}/nope/x.jsonl"]
    proc = cli("run", "examples/quickstart.yaml", "--only", "ingest", "--set", "run.executor=local", *sets,
               env={**_env(), **s3})  # fmt: skip
    assert proc.returncode != 0
    assert f"\nerror: stages.ingest.source: not found: s3://{BUCKET}/nope/x.jsonl\n" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_jsonl_in_a_hub_dataset_repo(source, local, tmp_path):
    with HubServer(tmp_path / "hub") as hub:
        env = hub.client_env(tmp_path / "hf-home", token="hf_writer", base=_env())
        hub.upload({"hub-user/prefs": ("dataset", source, "rlhfv_sample")}, tmp_path / "hf-home", base=_env())
        remote = _ingest(tmp_path / "out", "hf://datasets/hub-user/prefs/rlhfv_sample/train.jsonl", env=env)
    assert remote == local  # `../outside.jpg` is refused before anything is read, as on disk


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
