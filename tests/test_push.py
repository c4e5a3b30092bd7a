"""`python -m pipeline push` with the real huggingface_hub client against a local Hub API server
(tests/hub_server.py): what lands on the Hub loads back as the same dataset; faults are retried;
interrupted pushes resume without sending a file twice; an unchanged dataset makes no commit; a bad
token is one line and is never written anywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import hub_server
import pyarrow.parquet as pq
import pytest
from helpers import REPO, cli, dataset_rows
from hub_server import HubServer

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

FAST = ["--set", "push.retry_wait=0.01"]


@pytest.fixture(scope="module")
def run(published: tuple[Path, Path]) -> tuple[Path, Path]:
    return published


@pytest.fixture
def hub(tmp_path: Path):
    with HubServer(tmp_path / "hub") as server:
        yield server


def push(hub: HubServer, config: Path, tmp_path: Path, *args: str, token: str | None = "hf_writer"):
    env = hub.client_env(tmp_path / "hf-home", token=token)
    return cli("push", str(config), *args, env=env)


def local_files(out: Path) -> dict[str, bytes]:
    root = out / "dataset"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lfs_puts(hub: HubServer) -> Counter:
    return Counter(hub.lfs_uploads)


def test_push_then_load_dataset_gives_the_same_rows(run, hub, tmp_path):
    config, out = run
    proc = push(hub, config, tmp_path, "--repo-id", "org/mfpo")
    assert proc.returncode == 0, proc.stderr
    assert f"dataset: {hub.url}/datasets/org/mfpo" in proc.stdout
    assert 'load_dataset("org/mfpo", split="train")' in proc.stdout
    remote = hub.files("org/mfpo")
    local = local_files(out)
    assert {p for p in remote if p != ".gitattributes"} == set(local)
    for path, data in local.items():
        if path != "README.md":  # the card pushed names the repo in its usage lines
            assert remote[path] == data, path
    assert 'load_dataset("org/mfpo", split="train")' in remote["README.md"].decode()

    # A fresh machine: nothing cached, no token, the real `datasets` loader.
    script = (
        "import json, hashlib, numpy as np\n"
        "from datasets import load_dataset, Image, List\n"
        "ds = load_dataset('org/mfpo', split='train')\n"
        "assert isinstance(ds.features['images'], List) and isinstance(ds.features['images'].feature, Image)\n"
        "assert isinstance(ds.features['rejected_image'], Image)\n"
        "rows = [{'sample_id': r['sample_id'], 'prompt': r['prompt'], 'chosen': r['chosen'], 'rejected': r['rejected'],"
        " 'image': hashlib.sha256(np.asarray(r['images'][0]).tobytes()).hexdigest(),"
        " 'm_prime': hashlib.sha256(np.asarray(r['rejected_image']).tobytes()).hexdigest()} for r in ds]\n"
        "print(json.dumps(rows))\n"
    )
    env = hub.client_env(tmp_path / "fresh-home")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    import hashlib

    import numpy as np

    expected = [
        {
            "sample_id": r["sample_id"],
            "prompt": r["prompt"],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "image": hashlib.sha256(np.asarray(r["images"][0]).tobytes()).hexdigest(),
            "m_prime": hashlib.sha256(np.asarray(r["rejected_image"]).tobytes()).hexdigest(),
        }
        for r in dataset_rows(out)
    ]
    assert loaded == expected
    assert loaded[0]["prompt"][0]["role"] == "user" and loaded[0]["prompt"][0]["content"][0]["type"] == "image"


def test_unchanged_push_makes_no_commit_and_removed_files_are_deleted(run, hub, tmp_path):
    config, _ = run
    assert push(hub, config, tmp_path, "--repo-id", "org/again").returncode == 0
    commits = len(hub.commits("org/again"))
    puts = len(hub.lfs_uploads)
    proc = push(hub, config, tmp_path, "--repo-id", "org/again")
    assert proc.returncode == 0 and "no new commit" in proc.stdout
    assert len(hub.commits("org/again")) == commits and len(hub.lfs_uploads) == puts

    # A shard the dataset no longer has (e.g. after a re-run with another shard size) goes on the next push.
    stale = pq.read_table(sorted((run[1] / "dataset" / "data").glob("*.parquet"))[0])
    extra = tmp_path / "extra.parquet"
    pq.write_table(stale, extra)
    upload = (
        "from huggingface_hub import HfApi\n"
        f"HfApi().upload_file(path_or_fileobj={str(extra)!r}, path_in_repo='data/train-00007-of-00008.parquet',"
        " repo_id='org/again', repo_type='dataset')\n"
    )
    env = hub.client_env(tmp_path / "hf-home", token="hf_writer")
    subprocess.run([sys.executable, "-c", upload], env=env, check=True, capture_output=True, timeout=120)
    dry = push(hub, config, tmp_path, "--repo-id", "org/again", "--dry-run")
    assert dry.returncode == 0 and "data/train-00007-of-00008.parquet" in dry.stdout and "delete" in dry.stdout
    proc = push(hub, config, tmp_path, "--repo-id", "org/again")
    assert proc.returncode == 0 and "1 to delete" in proc.stdout
    assert "data/train-00007-of-00008.parquet" not in hub.files("org/again")


def test_server_errors_are_retried(run, hub, tmp_path):
    config, out = run
    hub.inject("PUT", r"^/lfs-storage/", status=500, times=1)  # one LFS upload fails once
    hub.inject("POST", r"/commit/main$", status=503, times=1)  # and the commit too
    hub.inject("POST", r"^/api/repos/create$", status=429, times=1)
    proc = push(hub, config, tmp_path, "--repo-id", "org/flaky", *FAST)
    assert proc.returncode == 0, proc.stderr
    statuses = [s for m, p, s in hub.log if (m, p) == ("POST", "/api/datasets/org/flaky/commit/main")]
    assert statuses == [503, 200]
    assert any(s == 500 for m, p, s in hub.log if m == "PUT")
    assert (
        hub.files("org/flaky")["data/train-00000-of-00003.parquet"]
        == local_files(out)["data/train-00000-of-00003.parquet"]
    )


def test_failed_commit_gives_one_line_and_the_rerun_sends_nothing_twice(run, hub, tmp_path):
    config, out = run
    hub.inject("POST", r"/commit/main$", status=503, times=10)
    proc = push(hub, config, tmp_path, "--repo-id", "org/resume", "--set", "push.retries=1", *FAST)
    assert proc.returncode == 1
    assert "push: commit failed (HTTP 503: Injected fault 503); retry 1 of 1" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    line = errors[0]
    assert line.startswith("error: push to org/resume failed: HTTP 503: Injected fault 503; ")
    assert "0 of 10 file(s) committed, 10 more uploaded but not committed" in line
    assert "run the same push again to resume" in line and "Traceback" not in proc.stderr
    uploaded = lfs_puts(hub)
    hub.clear_faults()
    assert push(hub, config, tmp_path, "--repo-id", "org/resume").returncode == 0
    assert lfs_puts(hub) == uploaded  # every LFS object had arrived before the failed commit
    assert {p for p in hub.files("org/resume") if p != ".gitattributes"} == set(local_files(out))


def test_killed_multi_commit_push_resumes_with_what_is_missing(run, hub, tmp_path):
    config, out = run
    args = ["--repo-id", "org/big", "--set", "push.max_files_per_commit=4"]
    hub.inject("POST", r"/preupload/main$", status=None, delay=0.4, times=1000)  # a slow link
    env = hub.client_env(tmp_path / "hf-home", token="hf_writer")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "push", str(config), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and _commit_count(hub, "org/big") < 2:
        time.sleep(0.05)
    proc.kill()  # SIGKILL after the first data commit, while the second batch uploads
    proc.communicate()
    first = hub.commits("org/big")
    assert len(first) == 2 and "(part 1 of 3)" in first[1]["message"] and len(first[1]["paths"]) == 4
    before = lfs_puts(hub)
    hub.clear_faults()
    proc = cli("push", str(config), *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "uploading 6 file(s)" in proc.stdout and "in 2 commit(s); 4 unchanged" in proc.stdout
    after = lfs_puts(hub)
    assert max(after.values()) == 1 and set(before) <= set(after)  # nothing sent twice
    assert {p for p in hub.files("org/big") if p != ".gitattributes"} == set(local_files(out))
    commits = hub.commits("org/big")
    assert [c["message"][-len("(part 1 of 2)") :] for c in commits[2:]] == ["(part 1 of 2)", "(part 2 of 2)"]
    assert "README.md" in commits[-1]["paths"]  # the card comes last, once the data is there


def _commit_count(hub: HubServer, repo_id: str) -> int:
    try:
        return len(hub.commits(repo_id))
    except hub_server.HubError:  # not created yet
        return 0


def test_bad_token_is_one_line_and_never_written_anywhere(run, hub, tmp_path):
    config, out = run
    secret = "hf_FAKEsecretTOKEN0123456789"
    proc = push(hub, config, tmp_path, "--repo-id", "org/secret", token=secret)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[0] == (
        "error: not authorised to write org/secret: set HF_TOKEN or run hf auth login (HTTP 401)"
    )
    everything = proc.stdout + proc.stderr + json.dumps(hub.log)
    everything += "".join(
        p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet"
    )
    everything += "".join(p.read_text(errors="replace") for p in (tmp_path / "hf-home").rglob("*") if p.is_file())
    assert secret not in everything
    # A token variable named in the config but not set: one line naming it.
    proc = push(hub, config, tmp_path, "--repo-id", "org/secret", "--set", "push.token_env=MY_HUB_TOKEN")
    assert proc.returncode == 1 and "push.token_env names MY_HUB_TOKEN, which is not set" in proc.stderr


def test_refuses_a_stale_or_broken_dataset_unless_allowed(run, hub, tmp_path):
    config, out = run
    stale = push(hub, config, tmp_path, "--repo-id", "org/stale", "--set", "stages.perturb.noise.timestep=300")
    assert stale.returncode == 2 and stale.stderr.count("\n") == 1
    assert "refused: stage perturb is stale (stages.perturb.noise.timestep: 500 -> 300)" in stale.stderr
    assert "would redo perturb, write" in stale.stderr and "--allow-stale" in stale.stderr
    assert not any(m == "POST" for m, _, _ in hub.log)  # nothing was created

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = sorted((broken / "dataset" / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    column = table.column("mask_area").to_pylist()
    column[0] = column[0] + 0.25  # a row whose mask_area no longer matches its mask
    import pyarrow as pa

    table = table.set_column(
        table.schema.get_field_index("mask_area"), table.schema.field("mask_area"), pa.array(column)
    )
    pq.write_table(table, shard)
    args = ["--repo-id", "org/broken", "--set", f"run.output_dir={broken}"]
    proc = push(hub, config, tmp_path, *args)
    assert proc.returncode == 2 and "fails its contract check (1 problem(s); first: " in proc.stderr
    assert "mask_area" in proc.stderr
    proc = push(hub, config, tmp_path, *args, "--allow-stale")
    assert proc.returncode == 0, proc.stderr


def test_branch_pull_request_private_and_dry_run(run, hub, tmp_path):
    config, _ = run
    # The installed command, as the README shows it.
    script = Path(sys.executable).parent / "mfpo-pipeline"
    env = hub.client_env(tmp_path / "hf-home", token="hf_writer")
    dry = subprocess.run(
        [str(script), "push", str(config), "--repo-id", "org/branches", "--dry-run"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 0 and "would upload 10 file(s)" in dry.stdout and "nothing was changed" in dry.stdout
    assert not any(m in ("POST", "PUT") for m, _, _ in hub.log)
    proc = push(hub, config, tmp_path, "--repo-id", "org/branches", "--revision", "dev", "--private", "-m", "first")
    assert proc.returncode == 0, proc.stderr
    assert 'revision="dev"' in proc.stdout and "/tree/dev" in proc.stdout
    assert "README.md" in hub.files("org/branches", revision="dev")
    assert set(hub.files("org/branches", revision="main")) == {".gitattributes"}
    with pytest.raises(urllib.error.HTTPError) as anonymous:  # private: hidden from a request without a token
        urllib.request.urlopen(f"{hub.url}/api/datasets/org/branches")
    assert anonymous.value.code == 404
    assert hub.commits("org/branches")[-1]["message"] == "first"
    proc = push(hub, config, tmp_path, "--repo-id", "org/branches", "--create-pr")
    assert proc.returncode == 0, proc.stderr
    assert "pull request: " in proc.stdout and "/discussions/1" in proc.stdout
    assert "README.md" in hub.files("org/branches", revision="refs/pr/1")


def test_train_push_to_hub_uploads_the_final_model(trained, hub, tmp_path):
    """train.push_to_hub (a TrainingArguments option) pushes the final model folder, card included."""
    out, _ = trained
    env = hub.client_env(tmp_path / "hf-home", token="hf_writer")
    proc = cli(
        "train",
        str(out.parent / "cfg.yaml"),
        "--set",
        f"train.output_dir={tmp_path / 't'}",
        "--set",
        "train.push_to_hub=true",
        "--set",
        "train.hub_model_id=org/mfpo-model",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    files = hub.files("org/mfpo-model", repo_type="model")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files)
    assert files["adapter_model.safetensors"] == (tmp_path / "t" / "final" / "adapter_model.safetensors").read_bytes()
    assert "train: model pushed: " in proc.stderr


def test_the_card_counts_where_key_objects_came_from_and_how_many_got_a_box(run):
    """The card's key-object section: rows whose top key phrase got a box, and the sources of the top phrases,
    as the dataset's own `key_phrases`, `key_phrase_sources` and `unboxed_phrases` columns give them."""
    _, out = run
    rows = dataset_rows(out)
    with_top = [r for r in rows if r["key_phrases"]]
    assert with_top and all(set(r["unboxed_phrases"]) <= set(r["key_phrases"]) for r in rows)
    grounded = sum(r["key_phrases"][0] not in r["unboxed_phrases"] for r in with_top)
    card = (out / "dataset" / "README.md").read_text()
    assert "### Key objects" in card
    counts = f"{len(with_top)} of {len(rows)} rows have a key phrase; the top one got a box in\n{grounded} of them"
    assert counts in card
    sources = Counter(r["key_phrase_sources"][0] for r in with_top)
    for name, count in sources.items():
        assert f"| {name} | {count} |" in card
