"""score + bucket: reference log-probs and entropies on a tiny random-weight LLaVA, checked against an
independent single-example computation; curriculum buckets are thirds by rank, stable across executors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from contract import _rgb, check
from helpers import SAMPLE_JSONL, cli, encode, scored_stages, tree, write_config
from PIL import Image
from stage_runner import run_stage
from tiny_models import save_tiny_llava, save_tiny_qwen2_vl

from stages.bucket import assign_buckets


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl")


def _rows() -> pa.Table:
    names = ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    images = [(SAMPLE_JSONL.parent / "images" / n).read_bytes() for n in names]
    noised = [encode(Image.fromarray(255 - _rgb({"bytes": b})), "PNG") for b in images]  # any other image
    return pa.table(
        {
            "sample_id": ["a", "b", "c"],
            "image": [{"bytes": b, "path": None} for b in images],
            "question": ["What animal is this?", "What is in the cup?", "What stands on the pad?"],
            "chosen": ["A tabby cat.", "Espresso coffee with crema, in a red cup.", "A rocket."],
            "rejected": ["A dog.", "Tea.", "A tall lighthouse by the sea at night."],
            "rejected_image": [{"bytes": noised[0], "path": None}, {"bytes": noised[1], "path": None}, None],
        }
    )


def _online(model, processor, image_bytes: bytes, question: str, answer: str) -> tuple[float, float]:
    """log p(answer | question, image) and the mean next-token entropy over the answer, computed from the
    whole conversation rendered by the chat template, one example at a time, no padding."""
    import torch

    image = _rgb({"bytes": image_bytes})
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True)
    full = processor.apply_chat_template([*user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    start = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(images=[image], text=[full], return_tensors="pt")
    n_answer = len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + end of turn
    with torch.no_grad():
        logits = model(**inputs).logits[0].double()
    lp = torch.log_softmax(logits[start - 1 : start - 1 + n_answer], -1)
    target = inputs["input_ids"][0, start : start + n_answer]
    entropy = -(lp.exp() * lp).sum(-1)
    return float(lp.gather(-1, target[:, None]).sum()), float(entropy.mean())


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_reference_logps_equal_online_computation(arch: str, request: pytest.FixtureRequest):
    """Same code for LLaVA (fixed-size image tokens) and Qwen2-VL (dynamic patches, per-token extras)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    llava = request.getfixturevalue(arch)
    rows = _rows()
    out = run_stage("score", {"model": {"model": str(llava)}, "resources": {"batch_size": 3}}, rows).table.to_pylist()
    model = AutoModelForImageTextToText.from_pretrained(llava).eval()
    processor = AutoProcessor.from_pretrained(llava)
    src = rows.to_pylist()
    for r, s in zip(out, src, strict=True):
        logp_w, entropy = _online(model, processor, s["image"]["bytes"], s["question"], s["chosen"])
        logp_l, _ = _online(model, processor, s["image"]["bytes"], s["question"], s["rejected"])
        assert abs(r["ref_logp_chosen"] - logp_w) < 1e-4
        assert abs(r["ref_logp_rejected"] - logp_l) < 1e-4
        assert abs(r["difficulty"] - entropy) < 1e-4
        if s["rejected_image"] is None:
            assert r["ref_logp_chosen_noised"] is None
        else:
            logp_noised, _ = _online(model, processor, s["rejected_image"]["bytes"], s["question"], s["chosen"])
            assert abs(r["ref_logp_chosen_noised"] - logp_noised) < 1e-4
            assert abs(r["ref_logp_chosen_noised"] - r["ref_logp_chosen"]) > 1e-6  # the image matters
    nll = run_stage(
        "score", {"model": {"model": str(llava)}, "difficulty": "nll", "resources": {"batch_size": 3}}, rows
    ).table.to_pylist()
    assert [r["difficulty"] for r in nll] == pytest.approx([-r["ref_logp_chosen"] for r in out], abs=1e-6)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_chunked_scores_equal_full_logits(arch: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """`answer_scores` runs the decoder, then the head over a few answer positions at a time, on a right-padded
    batch without its mask: the same log-probs and entropies as the full forward's logits, log-softmaxed whole.
    Answers of 5-42 tokens in chunks of 3: each spans several chunks, most end in a partial one."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mfpo import vlm

    path = request.getfixturevalue(arch)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    rows = _rows().to_pylist()
    examples = [
        vlm.build_example(processor, _rgb(r["image"]), r["question"], r[answer])
        for r in rows
        for answer in ("chosen", "rejected")
    ]
    batch = vlm.collate(examples, processor.tokenizer.pad_token_id, "cpu", torch.float32)
    assert len({len(e.input_ids) for e in examples}) > 1  # padded
    assert vlm._decoder_and_head(model) is not None  # the decoder + chunked head path, not the full forward
    with torch.inference_mode():
        logits = model(**batch).logits
        got = vlm.answer_scores(model, examples, batch, chunk=3)
        monkeypatch.setattr(vlm, "_DECODER_HEAD_CLASSES", frozenset())
        fallback = vlm.answer_scores(model, examples, batch, chunk=3)  # full forward, log-softmax in chunks
    want: dict[str, list[float]] = {"logp": [], "entropy_mean": [], "entropy_sum": []}
    for i, (start, end) in enumerate(vlm.answer_spans(examples).tolist()):
        assert end - start > 3
        lp = torch.log_softmax(logits[i, start - 1 : end - 1].float(), dim=-1)
        entropy = -(lp.exp() * lp).sum(-1)
        want["logp"].append(float(lp.gather(-1, batch["input_ids"][i, start:end, None]).sum()))
        want["entropy_mean"].append(float(entropy.mean()))
        want["entropy_sum"].append(float(entropy.sum()))
    for key, values in want.items():
        assert got[key].tolist() == pytest.approx(values, abs=1e-5), key
        assert fallback[key].tolist() == pytest.approx(values, abs=1e-5), key


def test_buckets_are_thirds_by_rank_with_ties_broken_by_id():
    ids = [f"s{i:02d}" for i in range(12)]
    difficulty = [5, 1, 3, 3, 3, 9, 0, 2, 7, 3, 8, 6]
    got = assign_buckets(ids, difficulty, ["easy", "medium", "hard"], None)
    assert sorted(got.values()).count("easy") == 4 and list(got.values()).count("hard") == 4
    assert {i for i in ids if got[i] == "easy"} == {"s06", "s01", "s07", "s02"}  # 0, 1, 2 and the first 3 by id
    shuffled = list(zip(ids, difficulty, strict=True))
    random.Random(0).shuffle(shuffled)
    assert assign_buckets([i for i, _ in shuffled], [d for _, d in shuffled], ["easy", "medium", "hard"], None) == got
    uneven = assign_buckets(ids, difficulty, ["a", "b"], [0.25, 0.75])
    assert list(uneven.values()).count("a") == 3


@pytest.mark.slow
@pytest.mark.ray
def test_score_and_bucket_through_the_pipeline(tmp_path: Path, llava: Path):
    stages = scored_stages(llava)
    trees = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        cli(
            "run",
            str(
                write_config(
                    tmp_path / f"{executor}.yaml", SAMPLE_JSONL, out, stages=stages, shard_size=4, executor=executor
                )
            ),
            check=True,
        )
        rows, problems = check(out)
        assert problems == [] and len(rows) == 9
        by_bucket = {b: sorted(r["difficulty"] for r in rows if r["bucket"] == b) for b in ("easy", "medium", "hard")}
        assert [len(v) for v in by_bucket.values()] == [3, 3, 3]
        assert max(by_bucket["easy"]) <= min(by_bucket["medium"]) and max(by_bucket["medium"]) <= min(by_bucket["hard"])
        assert all(np.isfinite(r["ref_logp_chosen_noised"]) for r in rows)
        trees[executor] = tree(out)
    assert trees["local"] == trees["ray"]
