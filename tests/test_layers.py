"""The floors of the code are enforced: `lint-imports` (run by `make lint`) keeps the contracts in
pyproject.toml, and an import that goes up a floor breaks it, naming the contract and the import. The fast tier
(`make test-fast`) holds no test that runs the command or starts Ray."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = ("pipeline", "stages", "mfpo")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the packages under `root` come first
    lint = Path(sys.executable).with_name("lint-imports")
    command = [str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    return root


def test_the_tree_keeps_every_contract(tmp_path):
    proc = _lint_imports(_copy(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def _lint_with(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess[str]:
    """lint-imports on a copy of the tree where `module` (a path under the root) has one more import line."""
    root = _copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n\n{line}  # noqa: E402\n")
    return _lint_imports(root)


def test_an_upward_import_breaks_the_lint(tmp_path):
    proc = _lint_with(tmp_path, "pipeline/runner.py", "from mfpo.train.trainer import train")
    assert proc.returncode != 0
    assert "the engine imports no stage, no method and no application package BROKEN" in proc.stdout
    assert "pipeline.runner -> mfpo.train.trainer" in proc.stdout


def test_the_method_importing_a_stage_breaks_the_lint(tmp_path):
    proc = _lint_with(tmp_path, "mfpo/vlm.py", "from stages.common import meta_field")
    assert proc.returncode != 0
    assert "the method imports neither the engine nor the stages nor an application BROKEN" in proc.stdout
    assert "mfpo.vlm -> stages.common" in proc.stdout


def test_the_old_import_paths_work_and_the_moved_one_says_where_to():
    """Stages written against `stages.common` keep working; `stages.vlm` (moved to `mfpo.vlm`) works and warns."""
    import mfpo.masks
    import mfpo.models
    import mfpo.vlm
    import stages.common

    assert stages.common.encode_mask is mfpo.masks.encode_mask
    assert stages.common.ModelConfig is mfpo.models.ModelConfig
    sys.modules.pop("stages.vlm", None)
    with pytest.warns(DeprecationWarning, match=r"stages\.vlm moved to mfpo\.vlm"):
        import stages.vlm
    assert stages.vlm.answer_logps is mfpo.vlm.answer_logps and stages.vlm.build_prompt is mfpo.vlm.build_prompt


@pytest.mark.slow  # runs make and a pytest collection in subprocesses
def test_the_fast_tier_leaves_out_the_command_ray_and_slow_tests():
    """`make test-fast` selects the tests not marked slow, and none of them runs the command in a subprocess or
    starts Ray: a new test that does is caught here until it is marked."""
    dry = subprocess.run(["make", "-n", "test-fast"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    pytest_line = next(line for line in dry.stdout.splitlines() if "-m pytest" in line)
    assert '-m "not slow"' in pytest_line
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    proc = subprocess.run(collect, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    selected = {line.split("[")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert len(selected) >= 50  # test functions (185 tests with their parameters, measured)
    offending = []
    for nodeid in sorted(selected):
        path, name = nodeid.split("::")
        source = (REPO / path).read_text()
        function = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
        body = ast.get_source_segment(source, function) or ""
        if re.search(r"\bcli\(|run_and_kill|subprocess\.|executor=\"ray\"|\"executor\": \"ray\"|ray\.init", body):
            offending.append(nodeid)
    assert offending == [], "mark these @pytest.mark.slow: " + ", ".join(offending)
