"""Shared test helpers: small real images, source files, configs, running the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_JSONL = REPO / "examples" / "data" / "rlhfv_sample" / "train.jsonl"


# Two epochs per stage, a checkpoint at every step: trainings with checkpoints to cut at.
CHECKPOINTED = ["--set", "train.save_steps=1", "--set", "train.curriculum.epochs_per_stage=2"]
# Weights of two training processes are compared within this. On the CPU, two uninterrupted runs of the same
# command differ now and then (about one fresh process in 12, measured with the tiny LLaVA and CHECKPOINTED
# settings): one thread's half of an elementwise op (the rotary embedding's cos in the first forward) comes out
# up to 1.5e-4 off in that process, which the curriculum's Adam steps carry into the adapter as up to 5e-6. A
# resume that loses, repeats or mis-schedules a step, or resets the optimizer, moves weights by 1e-4 or more.
CROSS_PROCESS_ATOL = 1e-5


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth, deterministic RGB picture (gradients plus a disc), small enough for fast tests."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, size=3)
    arr = np.stack([(xx * 3 + base[0]) % 256, (yy * 4 + base[1]) % 256, ((xx + yy) * 2 + base[2]) % 256], -1)
    cy, cx, r = height // 2, width // 2, min(width, height) // 4
    arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, size=3)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb for any decoder."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def rlhfv_line(
    idx: Any,
    image: str,
    question: Any = "What is shown?",
    chosen: str = "A disc.",
    rejected: str = "A dog.",
    **extra: Any,
) -> str:
    text = {"question": question, "chosen": chosen, "rejected": rejected}
    if question is None:
        del text["question"]
    return json.dumps({"idx": idx, "image": image, "text": json.dumps(text), **extra})


def write_source(folder: Path, n: int, size: tuple[int, int] = (64, 48)) -> Path:
    """An RLHF-V JSONL with n good rows and their JPEG files; returns the JSONL path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        (folder / "images" / f"{i}.jpg").write_bytes(encode(photo(*size, seed=i), quality=90))
        lines.append(rlhfv_line(i, f"images/{i}.jpg", f"What colour is the disc in picture {i}?"))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_config(
    path: Path,
    source: Path | str,
    output_dir: Path,
    *,
    executor: str = "local",
    shard_size: int = 4,
    stages: dict[str, Any] | None = None,
    **run: Any,
) -> Path:
    cfg = {
        "run": {
            "name": "test",
            "output_dir": str(output_dir),
            "executor": executor,
            "shard_size": shard_size,
            "progress": False,
            **run,
        },
        "stages": stages or {"ingest": {"source": str(source)}, "write": {}},
    }
    if stages is None:
        cfg["stages"]["ingest"]["resources"] = {"batch_size": 3}
    if executor == "ray":
        cfg["run"].setdefault("ray", {"num_cpus": 2})
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def cli(
    *args: str, cwd: Path = REPO, check: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**(os.environ if env is None else env), "RAY_DISABLE_USAGE_STATS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_and_kill(
    args: list[str],
    progress: Callable[[], int],
    at_least: int,
    env: dict[str, str] | None = None,
    poll_s: float = 0.002,
) -> None:
    """Start `python -m pipeline ARGS` and SIGKILL it once `progress()` (e.g. commit records so far) reaches
    `at_least`; fails if the run finishes first."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env={**(os.environ if env is None else env), "RAY_DISABLE_USAGE_STATS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and progress() < at_least:
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(poll_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def tree(root: Path, exclude: tuple[str, ...] = ("run.log", ".lock")) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), for byte-for-byte comparisons."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


def dataset_rows(output_dir: Path) -> list[dict[str, Any]]:
    from datasets import load_dataset

    files = sorted(str(p) for p in (output_dir / "dataset" / "data").glob("*.parquet"))
    return list(load_dataset("parquet", data_files=files, split="train"))


def quarantine(output_dir: Path, stage: str = "ingest") -> dict[str, list[str]]:
    """sample_id -> the reasons it was quarantined for, at `stage`."""
    import pyarrow.parquet as pq

    out: dict[str, list[str]] = {}
    for f in sorted((output_dir / "quarantine" / stage).glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            out.setdefault(row["sample_id"], []).append(row["reason"])
    return out


def alpha_bar(t: int, n: int = 1000, beta_start: float = 1e-5, beta_end: float = 5e-3) -> float:
    """The design's noise schedule (sigmoid betas), written out independently of diffusers."""
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, n))) * (beta_end - beta_start) + beta_start
    return float(np.prod(1 - betas[: t + 1]))


def quantised_moments(mu: float, sigma: float) -> tuple[float, float]:
    """Mean and variance of clip(rint(255 * x), 0, 255) for x ~ N(mu, sigma^2): exact over the 256 levels."""

    def cdf(v: float) -> float:
        return 0.5 * (1 + math.erf((v - mu) / (sigma * math.sqrt(2))))

    edges = [-math.inf] + [(k + 0.5) / 255 for k in range(255)] + [math.inf]
    p = np.array([cdf(edges[k + 1]) - cdf(edges[k]) for k in range(256)])
    levels = np.arange(256)
    mean = float((p * levels).sum())
    return mean, float((p * (levels - mean) ** 2).sum())


def scored_stages(model: Path, rows: int = 9) -> dict[str, Any]:
    """The full data path on the bundled sample with weight-free backends and `model` as the reference VLM."""
    return {
        "ingest": {"source": str(SAMPLE_JSONL), "limit": rows},
        "keywords": {},
        "ground": {"backend": "annotations", "annotations": {"select": "all"}},
        "segment": {"backend": "box"},
        "perturb": {},
        "score": {"model": {"model": str(model)}, "resources": {"batch_size": 4}},
        "bucket": {},
        "write": {},
    }


def publishable_source(folder: Path, rows: int = 6) -> Path:
    """The first `rows` rows of the bundled sample (images copied into `folder`), plus a row whose image is
    corrupt (quarantined at ingest) and a row with nothing to ground (quarantined at perturb)."""
    import shutil

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for line in SAMPLE_JSONL.read_text(encoding="utf-8").splitlines()[:rows]:
        row = json.loads(line)
        shutil.copy(SAMPLE_JSONL.parent / row["image"], folder / row["image"])
        lines.append(json.dumps(row))
    good = json.loads(lines[0])
    (folder / "images" / "broken.jpg").write_bytes((folder / good["image"]).read_bytes()[:600])
    lines.append(json.dumps({**good, "idx": 900, "image": "images/broken.jpg"}))
    lines.append(json.dumps({**good, "idx": 901, "annotations": []}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def grabcut_stages(source: Path) -> dict[str, Any]:
    """The weight-free data path with GrabCut masks and the default noise: every stage runs real work."""
    return {
        "ingest": {"source": str(source), "format": "rlhf-v"},
        "keywords": {},
        "ground": {"backend": "annotations", "annotations": {"select": "all"}},
        "segment": {"backend": "grabcut"},
        "perturb": {},
        "write": {},
    }


def publishable_stages(source: Path) -> dict[str, Any]:
    """A weight-free data path to a full dataset with boxes, masks and m' (fast enough for every publish test)."""
    return {
        "ingest": {"source": str(source), "format": "rlhf-v"},
        "keywords": {},
        "ground": {"backend": "annotations", "annotations": {"select": "all"}},
        "segment": {"backend": "box"},
        "perturb": {"fallback": "quarantine"},
        # ~1.2 MB of rows: three data files, so publishing handles a split of several files
        "write": {"pretty_name": "publish test", "license": "cc-by-4.0", "max_shard_size": "500KB"},
    }


# Training settings of the tests: tiny LoRA, one step per bucket of the scored sample.
TRAIN: dict[str, Any] = {
    "finetune": "lora",
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},  # vision tower too
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "per_device_train_batch_size": 3,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_steps": 1000,
    "curriculum": {"epochs_per_stage": 1},
}


@contextlib.contextmanager
def chat_endpoint(answer: Callable[[dict[str, Any], Any], str | int]) -> Iterator[str]:
    """A local OpenAI-compatible chat-completions endpoint (an LLM service stands outside the project):
    `answer(request body, request headers)` gives the reply's text, or an HTTP status to fail with. Yields
    the base URL (`http://127.0.0.1:PORT/v1`)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = answer({**body, "_path": self.path}, self.headers)
            if isinstance(reply, int):
                self.send_response(reply)
                self.end_headers()
                return
            message = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
            data = json.dumps({"id": "x", "object": "chat.completion", "choices": [message]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
