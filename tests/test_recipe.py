"""The shipped recipe, `pipeline.yaml`, as a user runs it: unchanged, against a Hub that serves a tiny random-weight
model of the right architecture under every model repo id the recipe names and a small `openbmb/RLHF-V-Dataset` in
the real RLHF-V schema (tests/hub_server.py, the real huggingface_hub / datasets / transformers clients).

Overrides only for the row limit and the CPUs. At 50 rows: run, status, train, eval, preview, push, and
`load_dataset` of the pushed repo in a fresh cache; at 1, 3, 12 and 18 rows: run, then `load_dataset` of the folder
and of the pushed repo. A check fails when the recipe names a repo id this test does not serve, so a change to a
default model cannot leave the recipe untested."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, SAMPLE_JSONL
from hub_server import HubServer
from PIL import Image, ImageOps
from tiny_models import save_tiny_grounding_dino, save_tiny_inpaint_pipeline, save_tiny_llava, save_tiny_sam

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

RECIPE = REPO / "pipeline.yaml"
MODELS = {  # repo id in the recipe -> the tiny model of its architecture served under it
    "IDEA-Research/grounding-dino-base": save_tiny_grounding_dino,
    "facebook/sam-vit-huge": save_tiny_sam,
    "stable-diffusion-v1-5/stable-diffusion-inpainting": save_tiny_inpaint_pipeline,
    "llava-hf/llava-1.5-7b-hf": save_tiny_llava,
}
DATASETS = {"openbmb/RLHF-V-Dataset"}
SOURCE_ROWS = 56
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def recipe_repo_ids(node: Any, key: str = "") -> set[str]:
    """Every value of the recipe that names a Hub repo: a `model` key's id (a `model:` section's `model`, the
    LLM endpoints' model names have no organisation), a Hub `source` or `questions`."""
    found: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            found |= recipe_repo_ids(v, k)
    elif isinstance(node, list):
        for v in node:
            found |= recipe_repo_ids(v, key)
    elif isinstance(node, str) and key in ("model", "source", "questions") and REPO_ID.match(node):
        local = (REPO / node).exists() or node.startswith(("outputs/", "examples/", "."))
        found |= set() if local else {node}
    return found


def _rlhfv_parquet(path: Path) -> None:
    """SOURCE_ROWS rows in RLHF-V's schema (`ds_name`, `image` as a datasets Image, `text` = JSON of question,
    chosen and rejected, `origin_dataset`, `origin_split`, `idx`, `image_path`): the bundled sample's rows, then
    its rows again with mirrored pictures (new pictures, as several RLHF-V questions share one)."""
    import datasets

    rows = [json.loads(line) for line in SAMPLE_JSONL.read_text().splitlines() if line.strip()]
    records = []
    for i in range(SOURCE_ROWS):
        row = rows[i % len(rows)]
        img = Image.open(SAMPLE_JSONL.parent / row["image"]).convert("RGB")
        if i >= len(rows):
            img = ImageOps.mirror(img)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        records.append(
            {
                "ds_name": "mfpo-sample",
                "image": {"bytes": buf.getvalue(), "path": None},
                "text": row["text"],
                "origin_dataset": row["origin_dataset"],
                "origin_split": row["origin_split"],
                "idx": i,
                "image_path": f"{i}.jpg",
            }
        )
    features = datasets.Features(
        {
            "ds_name": datasets.Value("string"),
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "origin_dataset": datasets.Value("string"),
            "origin_split": datasets.Value("string"),
            "idx": datasets.Value("int64"),
            "image_path": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_list(records, features=features).to_parquet(str(path))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """The Hub stand-in with every model and the dataset uploaded: (server, client environment, root folder)."""
    root = tmp_path_factory.mktemp("recipe")
    folders = {}
    for repo_id, save in MODELS.items():
        folders[repo_id] = ("model", save(root / "models" / repo_id.replace("/", "--")), "")
    data = root / "dataset" / "data"
    data.mkdir(parents=True)
    _rlhfv_parquet(data / "train-00000-of-00001.parquet")
    folders["openbmb/RLHF-V-Dataset"] = ("dataset", root / "dataset", "")
    with HubServer(root / "hub") as server:
        server.upload(folders, root / "hf-uploader")
        # The user's machine: online to the (stand-in) Hub, its own cache, a token that may push.
        yield server, server.client_env(root / "hf-home", token="hf_writer"), root


def _pipeline(
    args: list[str], env: dict[str, str], cwd: Path, rows: int, check: bool = True
) -> subprocess.CompletedProcess:
    overrides = ["--set", f"stages.ingest.limit={rows}", "--set", "run.ray.num_cpus=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", args[0], str(RECIPE), *args[1:], *overrides],
        cwd=cwd,
        env={**env, "RAY_DISABLE_USAGE_STATS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _load(target: str, env: dict[str, str], hf_home: Path) -> dict[str, int]:
    """`load_dataset(target)` in a fresh process and cache: rows per split."""
    script = "import json, sys; from datasets import load_dataset; ds = load_dataset(sys.argv[1]); "
    script += "print(json.dumps({name: len(split) for name, split in ds.items()}))"
    proc = subprocess.run(
        [sys.executable, "-c", script, target],
        env={**env, "HF_HOME": str(hf_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_repo_the_recipe_names_is_served():
    named = recipe_repo_ids(yaml.safe_load(RECIPE.read_text()))
    assert named, "no repo id found in pipeline.yaml: the check itself is broken"
    unserved = named - set(MODELS) - DATASETS
    assert not unserved, f"pipeline.yaml names {sorted(unserved)}: serve a tiny model of that architecture here"


def test_the_shipped_recipe_end_to_end(hub, tmp_path):
    _, env, _ = hub
    rows = 50
    out = tmp_path / "outputs" / "rlhf-v-mfpo"  # the recipe's own output folder, under the working directory
    _pipeline(["run"], env, tmp_path, rows)
    status = json.loads(_pipeline(["status", "--json"], env, tmp_path, rows).stdout)
    assert [s["state"] for s in status["stages"]] == ["done"] * 8
    kept = status["stages"][-1]["rows_kept"]
    assert kept > 0
    local = _load(str(out / "dataset"), env, tmp_path / "hf-load-local")
    assert set(local) == {"train", "test"} and sum(local.values()) == kept

    _pipeline(["train"], env, tmp_path, rows)
    assert (out / "train" / "final" / "adapter_config.json").is_file()
    _pipeline(["eval"], env, tmp_path, rows)
    results = json.loads((out / "eval" / "final" / "results.json").read_text())
    assert results["split"] == "test" and results["rows"] == local["test"]
    _pipeline(["preview"], env, tmp_path, rows)
    assert (out / "preview" / "index.html").is_file()

    push = _pipeline(["push", "--repo-id", "org/rlhf-v-mfpo"], env, tmp_path, rows)
    assert "dataset:" in push.stdout
    assert _load("org/rlhf-v-mfpo", env, tmp_path / "hf-load-pushed") == local


@pytest.mark.parametrize("rows", [1, 3, 12, 18])
def test_the_recipe_at_small_row_counts_loads_locally_and_from_the_hub(hub, tmp_path, rows):
    """A 5% test split of a few rows has no row: it is left out, and both loads give the splits that have rows."""
    _, env, _ = hub
    _pipeline(["run"], env, tmp_path, rows)
    out = tmp_path / "outputs" / "rlhf-v-mfpo"
    local = _load(str(out / "dataset"), env, tmp_path / "hf-load-local")
    assert "train" in local and sum(local.values()) == rows  # the sample's rows all survive the recipe
    _pipeline(["push", "--repo-id", f"org/recipe-{rows}"], env, tmp_path, rows)
    assert _load(f"org/recipe-{rows}", env, tmp_path / "hf-load-pushed") == local
