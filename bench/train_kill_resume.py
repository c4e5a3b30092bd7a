"""Kill `python -m pipeline train` with SIGKILL at many points of the curriculum, resume with `--resume`,
and compare the final adapter with an uninterrupted run's (same seed).

    python bench/train_kill_resume.py        # tiny random-weight LLaVA, CPU, ~6 minutes

Each kill point is a state of the training folder, watched every millisecond; the process is killed the
moment it is seen (so "during checkpoint creation" means a checkpoint folder exists that the trainer has
not marked complete yet). Prints one line per point and the largest weight difference; exit 1 if any
resumed run differs by more than 1e-5 (on the CPU two uninterrupted runs differ by up to a few 1e-6 now and then:
tests/helpers.py, CROSS_PROCESS_ATOL; a lost, repeated or mis-scheduled step moves weights by 1e-4 or more).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _uncommitted(folder: Path) -> bool:
    return any(not (c / ".committed").exists() for c in folder.glob("checkpoint-*"))


def _committed(folder: Path, step: int) -> bool:
    return (folder / f"checkpoint-{step}" / ".committed").exists()


POINTS: list[tuple[str, Callable[[Path], bool]]] = [
    ("model loading (1.5 s after start)", lambda t: False),
    ("stage 0 started, before any checkpoint", lambda t: (t / "stage-0-easy" / "_started.json").exists()),
    ("stage 0, while writing checkpoint-1", lambda t: _uncommitted(t / "stage-0-easy")),
    ("stage 0 after checkpoint-3", lambda t: _committed(t / "stage-0-easy", 3)),
    (
        "stage 0 weights saved, record not yet",
        lambda t: (t / "stage-0-easy" / "final").exists() and not (t / "stage-0-easy" / "stage.json").exists(),
    ),
    ("stage 0 committed", lambda t: (t / "stage-0-easy" / "stage.json").exists()),
    ("stage 1 started", lambda t: (t / "stage-1-medium" / "_started.json").exists()),
    (
        "stage 1, while writing a checkpoint",
        lambda t: _committed(t / "stage-1-medium", 1) and _uncommitted(t / "stage-1-medium"),
    ),
    ("stage 1 optimizer state saved", lambda t: (t / "stage-1-medium" / "optimizer.pt").exists()),
    ("stage 2 after checkpoint-4", lambda t: _committed(t / "stage-2-hard", 4)),
    (
        "stage 2, while writing its last checkpoint",
        lambda t: _committed(t / "stage-2-hard", 5) and _uncommitted(t / "stage-2-hard"),
    ),
    ("final model being saved", lambda t: (t / "final").exists() and not (t / "final" / "README.md").exists()),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_kill_resume-tiny-cpu.json"))
    args = parser.parse_args()
    import yaml
    from helpers import TRAIN, cli, scored_stages
    from safetensors.torch import load_file
    from tiny_models import save_tiny_llava

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_llava(root / "tiny-llava")
        train = {
            **TRAIN,
            "model": {"model": str(model)},
            "per_device_train_batch_size": 2,
            "save_steps": 1,
            "warmup_ratio": 0.2,
            "curriculum": {"epochs_per_stage": 3},
        }
        cfg = root / "cfg.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "run": {
                        "name": "kill",
                        "output_dir": str(root / "out"),
                        "executor": "local",
                        "shard_size": 4,
                        "progress": False,
                    },
                    "stages": scored_stages(model, rows=12),
                    "train": train,
                },
                sort_keys=False,
            )
        )
        cli("run", str(cfg), check=True)
        cli("train", str(cfg), "--set", f"train.output_dir={root / 'straight'}", check=True)
        straight = load_file(str(root / "straight" / "final" / "adapter_model.safetensors"))
        env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
        for k, (name, seen) in enumerate(POINTS):
            target = root / f"kill-{k}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "train", str(cfg), "--set", f"train.output_dir={target}"],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started, caught = time.monotonic(), False
            while proc.poll() is None:
                if (k == 0 and time.monotonic() - started > 1.5) or (k > 0 and seen(target)):
                    proc.send_signal(signal.SIGKILL)
                    caught = True
                    break
                time.sleep(0.001)
            proc.wait()
            resumed = cli("train", str(cfg), "--resume", "--set", f"train.output_dir={target}")
            diff = float("nan")
            if resumed.returncode == 0:
                after = load_file(str(target / "final" / "adapter_model.safetensors"))
                diff = max(float((straight[t] - after[t]).abs().max()) for t in straight)
            results.append({"point": name, "killed": caught, "resume_rc": resumed.returncode, "max_abs_diff": diff})
            print(
                f"{k + 1:2d}. {name:45s} killed={caught!s:5s} resume rc={resumed.returncode} "
                f"max |w - w_straight| = {diff:.1e}",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    bad = [r for r in results if not (r["killed"] and r["resume_rc"] == 0 and r["max_abs_diff"] <= 1e-5)]
    print(f"{len(results) - len(bad)} of {len(results)} kill points resumed to the uninterrupted run's weights")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
