"""Peak memory of the score stage on a 2,000- and a 20,000-character answer, and of the former full-logits scoring.

    .venv/bin/python bench/score_memory.py                      # 2000 and 20000 characters, tiny LLaVA, CPU
    .venv/bin/python bench/score_memory.py --chars 1000 10000
    .venv/bin/python bench/score_memory.py --vocab 32064 --batches 1   # LLaVA-1.5's vocabulary size, one row

A tiny random-weight LLaVA (`tests/tiny_models.save_tiny_llava`, built offline; vocabulary 260, one token per
byte, so a 20,000-character answer is 20,000 tokens; `--vocab` widens its embeddings and head to a real model's
vocabulary) scores, through the score stage's own `process_batch` (fp32, CPU, one torch thread):

- one row: its chosen answer `--chars` characters long, a short rejected answer, a dispreferred image, so
  three forwards of one sequence each;
- three rows in one batch (`--batches 3`), the first as above and two with short answers: the stage's usual
  case, where the long sequence is padded together with short ones.

Each in a fresh process, for the current scoring (`mfpo.vlm.answer_scores`: the decoder, then the head over
`ANSWER_CHUNK` answer positions at a time, a right-padded batch without its attention mask) and for the former
one (the model's full forward, `log_softmax` over the whole answer span; put back in that process in place of
`answer_scores`). Per run: peak RSS (`ru_maxrss`: the kernel's high-water mark, nothing missed between
samples), and scoring's share, the peak less the RSS just before `process_batch` (the interpreter, torch and
the model take about 1.1 GB of the peak). Prints both, the ratios 20k / 2k (target <= 2.0) and the largest
difference between the two scorings' outputs; writes bench/results/score_memory-tiny-cpu.json (with `--vocab`:
score_memory-tiny-v<vocab>-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loop_vs_pipeline import REPO, SAMPLE, save_result

SENTENCE = "A tabby cat sleeps on a red mat beside a wooden chair, under a window. "
SCENARIOS = {1: "one row", 3: "three rows"}


def former_answer_scores(model: Any, examples: list[Any], batch: dict[str, Any]) -> dict[str, Any]:
    """`answer_scores` before the chunked head: full [B, L, V] logits, float32 log-softmax over each answer span."""
    import torch

    from mfpo.vlm import answer_spans

    logits, input_ids = model(**batch).logits, batch["input_ids"]
    logps, entropies = [], []
    for i, (start, end) in enumerate(answer_spans(examples).tolist()):
        lp = torch.log_softmax(logits[i, start - 1 : end - 1].float(), dim=-1)
        logps.append(lp.gather(-1, input_ids[i, start:end, None]).sum())
        entropies.append(-(lp.exp() * lp).sum(-1))
    return {
        "logp": torch.stack(logps).detach().double().cpu().numpy(),
        "entropy_mean": torch.stack([e.mean() for e in entropies]).detach().double().cpu().numpy(),
        "entropy_sum": torch.stack([e.sum() for e in entropies]).detach().double().cpu().numpy(),
    }


def child(model: str, chars: int, rows: int, scoring: str) -> None:
    """One measurement, in this (fresh) process: prints a JSON line."""
    import resource
    import time

    import pyarrow as pa
    import torch
    from stage_runner import build_stage

    import stages.score

    if scoring == "former":
        stages.score.answer_scores = former_answer_scores
    torch.set_num_threads(1)
    photos = sorted((SAMPLE / "images").glob("*.jpg"))
    image, other = ({"bytes": f.read_bytes(), "path": None} for f in photos[:2])
    long_answer = (SENTENCE * (chars // len(SENTENCE) + 1))[:chars]
    table = pa.table(
        {
            "sample_id": [f"r{i}" for i in range(rows)],
            "image": [image] * rows,
            "question": ["Describe the picture in detail."] * rows,
            "chosen": [long_answer] + ["A cat on a mat."] * (rows - 1),
            "rejected": ["A dog on a sofa."] * rows,
            "rejected_image": [other] * rows,  # any other picture: m' only needs to differ
        }
    )
    stage = build_stage("score", {"model": {"model": model, "precision": "fp32"}, "resources": {"cpus": 1}})
    before = _rss_mib()
    started = time.perf_counter()
    result = stage.process_batch(table)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert not result.rejected, result.rejected
    cols = ("difficulty", "ref_logp_chosen", "ref_logp_rejected", "ref_logp_chosen_noised")
    out = {"peak_mib": peak, "before_mib": before, "scoring_mib": peak - before, "wall_s": wall}
    out["scores"] = {c: result.table.column(c).to_pylist() for c in cols}
    print(json.dumps(out))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def widen(model: Path, vocab: int) -> None:
    """The saved model with its embeddings and output head resized to `vocab` rows (the tokenizer still uses
    the first 260): the head's cost then is a real model's, the rest stays tiny."""
    from transformers import AutoModelForImageTextToText

    net = AutoModelForImageTextToText.from_pretrained(model)
    net.resize_token_embeddings(vocab, mean_resizing=False)
    net.save_pretrained(model, safe_serialization=True)


def measure(model: Path, chars: int, rows: int, scoring: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(model), str(chars), str(rows), scoring]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, nargs=2, default=[2000, 20000], help="the two answer lengths")
    parser.add_argument("--vocab", type=int, help="vocabulary size of the model (default: its tokenizer's, 260)")
    parser.add_argument("--batches", type=int, nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS))
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "CHARS", "ROWS", "SCORING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, chars, rows, scoring = args.child
        child(model, int(chars), int(rows), scoring)
        return
    from tiny_models import save_tiny_llava

    small, large = args.chars
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_llava(Path(tmp) / "tiny-llava")
        if args.vocab:
            widen(model, args.vocab)
        for rows in args.batches:
            scenario = SCENARIOS[rows]
            for scoring in ("chunked", "former"):
                key = f"{scenario}, {scoring}"
                runs[key] = {}
                for chars in args.chars:
                    r = runs[key][str(chars)] = measure(model, chars, rows, scoring)
                    print(
                        f"{key}, {chars} characters: peak RSS {r['peak_mib']:.0f} MiB, scoring's share "
                        f"{r['scoring_mib']:.0f} MiB, {r['wall_s']:.1f} s",
                        flush=True,
                    )
    summary: dict[str, dict[str, float]] = {}
    for key, by_chars in runs.items():
        a, b = by_chars[str(small)], by_chars[str(large)]
        summary[key] = {
            "peak_ratio": b["peak_mib"] / a["peak_mib"],
            "scoring_ratio": b["scoring_mib"] / a["scoring_mib"],
        }
    for scenario in (SCENARIOS[rows] for rows in args.batches):
        new, old = runs[f"{scenario}, chunked"], runs[f"{scenario}, former"]
        diff = max(
            abs(x - y)
            for chars in map(str, args.chars)
            for col, values in new[chars]["scores"].items()
            for x, y in zip(values, old[chars]["scores"][col], strict=True)
            if x is not None
        )
        summary[f"{scenario}, chunked"]["max_abs_diff_vs_former"] = diff
    print()
    for key, s in summary.items():
        target = " (target <= 2.0)" if "chunked" in key else ""
        same = f", outputs within {s['max_abs_diff_vs_former']:.1e} of the former" if "chunked" in key else ""
        print(
            f"{key}: {large} / {small} characters peak RSS {s['peak_ratio']:.2f}x{target}, "
            f"scoring's share {s['scoring_ratio']:.2f}x{same}"
        )
    name = f"score_memory-tiny-v{args.vocab}-cpu" if args.vocab else "score_memory-tiny-cpu"
    save_result(name, {"chars": args.chars, "vocab": args.vocab or 260, "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
