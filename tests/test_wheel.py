"""What `pip install mfpo-pipeline` gives: the project built as a wheel and installed into a fresh virtual
environment that cannot see this checkout. The command starts, every bundled template and data file is found
through `importlib.resources`, and the offline recipe's stages (ingest to write, the dataset card included) run
on two rows from a folder outside the source tree.

The fresh environment gets the test environment's third-party packages through a `.pth` line (installing torch
and Ray again would take minutes and gigabytes); the project itself comes only from the wheel: the editable
install's import hook in that folder is not run (a `.pth` path line adds a folder, not its hooks), PYTHONPATH is
cleared and the commands run outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SAMPLE_JSONL
from tiny_models import save_tiny_llava

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

PACKAGES = ("pipeline", "stages", "mfpo", "prompts")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(the fresh environment's python, a working folder outside the checkout, the wheel's data files)."""
    root = tmp_path_factory.mktemp("wheel")
    # A copy of the tracked files only: the wheel is what the project's own files build, nothing left over.
    src = root / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    wheels = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        cwd=src,
        check=True,
        capture_output=True,
    )
    [wheel] = wheels.glob("mfpo_pipeline-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    with zipfile.ZipFile(wheel) as zf:
        data = [n for n in zf.namelist() if n.split("/")[0] in PACKAGES and not n.endswith((".py", "py.typed"))]
    work = root / "work"
    work.mkdir()
    return python, work, data


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "RAY_DISABLE_USAGE_STATS": "1", "HOME": str(work), "MFPO_CACHE": str(work / "cache")}


def test_the_command_starts_from_the_wheel(installed):
    python, work, _ = installed
    proc = subprocess.run(
        [python.parent / "mfpo-pipeline", "--help"], cwd=work, env=_env(work), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "run" in proc.stdout and "train" in proc.stdout and "push" in proc.stdout


def test_every_bundled_template_and_data_file_is_found(installed):
    python, work, data = installed
    assert "prompts/keywords.txt" in data and "prompts/judge.txt" in data
    assert any(n.endswith(".j2") for n in data) and any(n.endswith(".json") for n in data)
    script = f"""
import json, sys
from importlib import resources
from pathlib import Path
import pipeline, prompts
from stages.llm import load_template
from stages.keywords import LEXICON_PATH
from mfpo.publish.card import _TEMPLATE as DATASET_CARD
from mfpo.train.card import _TEMPLATE as MODEL_CARD
here = Path(pipeline.__file__).resolve()
assert str(here).startswith(str(Path(sys.prefix).resolve())), here  # the wheel's copy, not the checkout
for name in {data!r}:
    package, rel = name.split("/", 1)
    assert resources.files(package).joinpath(rel).read_bytes(), name
for t in ("keywords.txt", "judge.txt"):
    assert "{{question}}" in load_template(t, "stages.keywords.llm.prompt")
assert json.loads(LEXICON_PATH.read_text()) and DATASET_CARD.is_file() and MODEL_CARD.is_file()
print("ok", len({data!r}))
"""
    proc = subprocess.run([python, "-c", script], cwd=work, env=_env(work), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr


def test_the_offline_recipe_runs_on_two_rows_from_the_wheel(installed):
    python, work, _ = installed
    source = work / "data"
    (source / "images").mkdir(parents=True)
    rows = [json.loads(line) for line in SAMPLE_JSONL.read_text().splitlines()[:2]]
    for row in rows:
        shutil.copy(SAMPLE_JSONL.parent / row["image"], source / row["image"])
    (source / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    recipe["run"].update(executor="local", output_dir=str(work / "out"), progress=False)
    recipe["stages"]["ingest"]["source"] = str(source / "train.jsonl")
    recipe["stages"]["score"]["model"]["model"] = str(save_tiny_llava(work / "tiny-llava"))
    recipe.pop("train"), recipe.pop("eval", None)
    cfg = work / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))  # stage order is the config order
    proc = subprocess.run(
        [python.parent / "mfpo-pipeline", "run", str(cfg)], cwd=work, env=_env(work), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (work / "out" / "dataset" / "data").glob("*.parquet"))
    assert files and all("-00000-of-00001" in f for f in files)
    assert (work / "out" / "dataset" / "README.md").is_file()
