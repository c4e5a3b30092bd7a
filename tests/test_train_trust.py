"""Training a user can trust: a resumed run never reuses stages of another configuration or another dataset,
a stale dataset or a policy that is not the dataset's reference model is refused, two trainings do not
share a folder, a half-written checkpoint is ignored, the learning-rate schedule spans the curriculum, and
every TrainingArguments option is accepted and checked."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import CHECKPOINTED, CROSS_PROCESS_ATOL, REPO, TRAIN, cli
from safetensors.torch import load_file
from tiny_models import save_tiny_llava

from pipeline.storage import RunLayout

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`


def _cfg(trained: tuple[Path, Path]) -> Path:
    return trained[0].parent / "cfg.yaml"


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("stage-*/stage.json"))]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "final" / "adapter_model.safetensors"))


def test_resume_redoes_what_a_config_change_touches_and_nothing_else(trained, tmp_path):
    cfg = _cfg(trained)
    target = ["--set", f"train.output_dir={tmp_path / 't'}"]
    cli("train", str(cfg), *target, check=True)
    before = _records(tmp_path / "t")
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "t").glob("stage-*/stage.json"))]

    # An option that changes no weights (how often to log) keeps every stage.
    proc = cli("train", str(cfg), *target, "--resume", "--set", "train.logging_steps=5", check=True)
    assert proc.stderr.count("already done") == 3
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "t").glob("stage-*/stage.json"))] == mtimes

    # A plain train over a used folder refuses, naming what to do.
    same = cli("train", str(cfg), *target)
    assert same.returncode == 2 and "already holds 3 stage(s) of this configuration" in same.stderr
    changed = ["--set", "train.loss.eta=0.5"]
    other = cli("train", str(cfg), *target, *changed)
    assert other.returncode == 2 and "holds stages of another configuration" in other.stderr
    assert "train.loss" in other.stderr and "--force" in other.stderr

    # --resume after a change that alters the weights redoes every stage it reaches.
    proc = cli("train", str(cfg), *target, "--resume", *changed, check=True)
    assert "redoing stage-0-easy (train.loss:" in proc.stderr
    after = _records(tmp_path / "t")
    assert [r["fingerprint"] for r in after] != [r["fingerprint"] for r in before]
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(after, before, strict=True))
    assert "eta: 0.5" in (tmp_path / "t" / "final" / "README.md").read_text()  # the card tells the new run

    status = json.loads(cli("status", str(cfg), "--json", *target, check=True).stdout)["train"]
    assert [s["state"] for s in status] == ["stale"] * 3 and "train.loss" in status[0]["why"]
    status = json.loads(cli("status", str(cfg), "--json", *target, *changed, check=True).stdout)["train"]
    assert [(s["state"], s["rows"]) for s in status] == [("done", 3), ("done", 3), ("done", 3)]
    assert cli("train", str(cfg), *target, "--force", check=True).returncode == 0


def test_a_changed_dataset_redoes_the_curriculum(trained, tmp_path):
    from mfpo.train.command import train_folder
    from mfpo.train.config import TrainConfig

    out, _ = trained
    data = tmp_path / "dataset"
    shutil.copytree(out / "dataset", data)
    cfg = TrainConfig.model_validate({**TRAIN, "model": {"model": str(out.parent / "tiny-llava")}})
    train_folder(cfg, data, tmp_path / "t")
    first = _records(tmp_path / "t")
    # The same dataset: --resume reuses everything.
    train_folder(cfg, data, tmp_path / "t", resume=True)
    assert _records(tmp_path / "t") == first
    # One reference log-prob changed on disk: every stage is redone.
    shard = sorted((data / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    values = table.column("ref_logp_chosen").to_pylist()
    values[0] -= 1.0
    index = table.schema.get_field_index("ref_logp_chosen")
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(values)), shard)
    train_folder(cfg, data, tmp_path / "t", resume=True)
    assert all(a["fingerprint"] != b["fingerprint"] for a, b in zip(_records(tmp_path / "t"), first, strict=True))


def test_a_dataset_stale_for_the_config_is_refused(trained, tmp_path):
    cfg = _cfg(trained)
    proc = cli(
        "train", str(cfg), "--set", f"train.output_dir={tmp_path / 't'}", "--set", "stages.perturb.noise.timestep=300"
    )
    assert proc.returncode == 2
    # What changed, and what a run would redo: the advice names the stages instead of just "run it first".
    assert proc.stderr.strip() == (
        "refused: the dataset is not ready for this config: stage perturb is stale "
        "(stages.perturb.noise.timestep: 500 -> 300), and so is every stage after it: if the dataset was made with "
        "--set overrides, give the same ones here; `python -m pipeline run CONFIG` would redo perturb, score, "
        "bucket, write"
    )
    assert not (tmp_path / "t" / "stage-0-easy").exists()


def test_concurrent_train_run_and_train_are_refused(trained, tmp_path):
    cfg = _cfg(trained)
    target = tmp_path / "t"
    with RunLayout(target).lock("train"):  # a training in progress on that folder
        proc = cli("train", str(cfg), "--set", f"train.output_dir={target}")
    assert proc.returncode == 1 and "another run, push, train or eval is using" in proc.stderr
    out, _ = trained
    with RunLayout(out).lock("train", shared=True):  # a training reading the dataset
        proc = cli("run", str(cfg))
        assert proc.returncode == 1 and "another run, push, train or eval is using" in proc.stderr


def test_an_incomplete_checkpoint_is_ignored_on_resume(trained, checkpointed, tmp_path):
    """A kill while the Trainer writes checkpoint-N leaves a partial folder: --resume uses the last complete
    checkpoint and ends with the weights of an uninterrupted run."""
    cfg = _cfg(trained)
    common = CHECKPOINTED
    target = tmp_path / "cut"
    cli("train", str(cfg), "--set", f"train.output_dir={target}", *common, check=True)
    # Undo the end of the last stage as a kill during its last checkpoint would have left it.
    stage = target / "stage-2-hard"
    for p in (stage / "stage.json", stage / "final", target / "final"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    last = max(stage.glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    (last / ".committed").unlink()
    (last / "optimizer.pt").unlink()  # half written
    (stage / "checkpoint-99").mkdir()  # created, nothing in it yet
    proc = cli("train", str(cfg), "--resume", "--set", f"train.output_dir={target}", *common, check=True)
    assert f"ignoring incomplete stage-2-hard/{last.name}" in proc.stderr
    assert "resuming from checkpoint-" in proc.stderr
    a, b = _adapter(checkpointed), _adapter(target)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=CROSS_PROCESS_ATOL)


def test_a_policy_that_is_not_the_reference_is_refused(trained, tmp_path):
    cfg = _cfg(trained)
    target = ["--set", f"train.output_dir={tmp_path / 't'}"]
    other = save_tiny_llava(tmp_path / "other-llava", seed=1)
    for args, field in (
        (["--set", f"train.model.model={other}"], "weights 'sha256:"),
        (["--set", "train.system_prompt=Answer briefly."], "system_prompt None (reference) != 'Answer briefly.'"),
        (["--set", "train.model.precision=bf16"], "dtype 'float32' (reference) != 'bfloat16' (policy)"),
    ):
        proc = cli("train", str(cfg), *target, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("refused: the policy's starting point does not")
        assert field in proc.stderr and "train.reference_check: warn" in proc.stderr
    assert not (tmp_path / "t" / "stage-0-easy").exists()
    proc = cli(
        "train",
        str(cfg),
        *target,
        "--set",
        "train.system_prompt=Answer briefly.",
        "--set",
        "train.reference_check=warn",
        check=True,
    )
    assert "does not match the dataset's reference model" in proc.stderr


def test_train_model_defaults_to_the_reference_model(trained, tmp_path):
    import yaml

    raw = yaml.safe_load(_cfg(trained).read_text())
    del raw["train"]["model"]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    cli("train", str(cfg), "--set", f"train.output_dir={tmp_path / 't'}", check=True)
    card = (tmp_path / "t" / "final" / "README.md").read_text()
    assert f"base_model: {trained[0].parent / 'tiny-llava'}" in card


def test_step_zero_rewards_are_zero(trained):
    """At step 0 the policy is the reference (LoRA's B starts at zero) in the score stage's regime: every reward
    beta * (log pi - log pi_ref) of the first logged step is ~0."""
    log = (trained[1] / "train.log").read_text()
    first = next(line for line in log.splitlines() if "train stage-0-easy step 1/" in line)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/chosen_noised"):
        value = float(re.search(rf"{re.escape(key)}=(\S+)", first).group(1))
        assert abs(value) < 0.1 * 1e-3, (key, value)  # beta 0.1 x 1e-3 nats


def test_train_log_has_every_metric_of_every_step(trained):
    log = (trained[1] / "train.log").read_text()
    steps = [line for line in log.splitlines() if re.search(r"train stage-\d-\w+ step \d+/\d+: loss=", line)]
    assert len(steps) == 3  # one step per bucket, logging_steps 1
    for key in (
        "loss/text",
        "loss/image",
        "loss/margin",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/chosen_noised",
        "margins/text",
        "margins/image",
        "accuracy/text",
        "accuracy/image",
        "learning_rate",
        "grad_norm",
    ):
        assert all(f"{key}=" in line for line in steps), key


def test_one_schedule_across_the_curriculum_or_one_per_stage(trained, tmp_path):
    from mfpo.train.command import train_folder
    from mfpo.train.config import TrainConfig

    out, _ = trained
    base = {
        **TRAIN,
        "model": {"model": str(out.parent / "tiny-llava")},
        "warmup_ratio": 0.5,
        "lr_scheduler_type": "linear",
        "curriculum": {"epochs_per_stage": 2},
    }
    curriculum = train_folder(TrainConfig.model_validate(base), out / "dataset", tmp_path / "c")
    stage = train_folder(TrainConfig.model_validate({**base, "schedule": "stage"}), out / "dataset", tmp_path / "s")
    lrs = [r["learning_rates"] for r in curriculum["stages"]]
    flat = [lr for stage_lrs in lrs for lr in stage_lrs]
    total = sum(r["steps"] for r in curriculum["stages"])
    warmup = -(-total // 2)
    # One linear schedule over all the curriculum's steps: warm-up once, never back to 0 at a stage boundary.
    expected = [1e-3 * (k / warmup if k < warmup else (total - k) / (total - warmup)) for k in range(total)]
    assert len(flat) == total and flat == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert all(stage_lrs[0] > 0 for stage_lrs in lrs[1:])
    assert (tmp_path / "c" / "stage-0-easy" / "optimizer.pt").exists()  # carried into the next stage
    assert all(r["learning_rates"][0] == 0 for r in stage["stages"])  # schedule: stage restarts the warm-up


def test_training_arguments_pass_through_and_are_checked(trained, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    cfg = _cfg(trained)
    proc = cli("status", str(cfg), "--set", "train.optimm=sgd")  # one through the CLI: exit 2, the key named
    assert proc.returncode == 2 and "train.optimm: unknown key; did you mean 'optim'?" in proc.stderr, proc.stderr
    for key, value, expected in (
        ("num_train_epochs", "3", "train.num_train_epochs: set by the trainer; use train.curriculum.epochs_per_stage"),
        ("weight_decay", "heavy", "train.weight_decay: Input should be a valid number"),
        ("learning_rat", "0.1", "did you mean 'learning_rate'?"),
    ):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(cfg, [f"train.{key}={value}"])
    target = tmp_path / "t"
    extra = [
        "--set",
        "train.optim=sgd",
        "--set",
        "train.weight_decay=0.01",
        "--set",
        "train.max_steps=1",
        "--set",
        "train.save_steps=1",
        "--set",
        "train.save_total_limit=1",
        "--set",
        "train.curriculum.epochs_per_stage=3",
    ]
    cli("train", str(cfg), "--set", f"train.output_dir={target}", *extra, check=True)
    assert [r["steps"] for r in _records(target)] == [1, 1, 1]  # max_steps caps each curriculum stage
    assert all(len(list(p.glob("checkpoint-*"))) == 1 for p in target.glob("stage-*"))
    state = torch.load(target / "stage-0-easy" / "optimizer.pt", weights_only=True)
    assert state["param_groups"][0]["weight_decay"] == 0.01 and "momentum" in state["param_groups"][0]  # SGD
    proc = cli("train", str(cfg), "--set", f"train.output_dir={tmp_path / 'e'}", "--set", "train.eval_strategy=steps")
    assert proc.returncode == 2 and "train.eval_strategy needs a held-out split" in proc.stderr


@pytest.mark.ray
def test_ray_train_matches_torchrun_and_needs_no_flags(trained, tmp_path):
    """train.ray.num_workers=2 as the README shows it (use_gpu auto, a relative model path) on a CPU machine:
    the same final weights as two DDP processes under torchrun (same seed, same global batch). The torchrun
    run logs to TensorBoard: one event file per curriculum stage, from rank 0 only."""
    import subprocess
    import sys

    import yaml

    raw = yaml.safe_load(_cfg(trained).read_text())
    raw["train"]["model"]["model"] = os.path.relpath(raw["train"]["model"]["model"], REPO)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            "train",
            str(cfg),
            "--set",
            f"train.output_dir={tmp_path / 'ddp'}",
            "--set",
            "train.report_to=[tensorboard]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("model saved to") == 1  # rank 0 alone prints
    assert "FutureWarning" not in ddp.stderr and "UserWarning" not in ddp.stderr, ddp.stderr[-2000:]
    assert all(r["world_size"] == 2 for r in _records(tmp_path / "ddp"))
    assert len(list((tmp_path / "ddp").glob("stage-*/runs/*/events.out.tfevents.*"))) == 3
    proc = cli(
        "train",
        str(cfg),
        "--set",
        f"train.output_dir={tmp_path / 'ray'}",
        "--set",
        "train.ray.num_workers=2",
        "--set",
        "train.ray.cpus_per_worker=0.5",
        check=True,
    )
    assert "stage 2 (hard): 3 rows" in proc.stdout
    a, b = _adapter(tmp_path / "ddp"), _adapter(tmp_path / "ray")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    gpu = cli(
        "train",
        str(cfg),
        "--set",
        f"train.output_dir={tmp_path / 'gpu'}",
        "--set",
        "train.ray.num_workers=2",
        "--set",
        "train.ray.use_gpu=true",
    )
    assert gpu.returncode == 1
    assert "train.ray.num_workers=2 needs 2 GPU (the cluster has 0)" in gpu.stderr and "Traceback" not in gpu.stderr
