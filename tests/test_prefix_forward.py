"""The prefix-shared MFPO forward (mfpo/train/prefix.py) on a tiny random-weight LLaVA loaded through the trainer's
own loading code: the same answer log-probs and the same gradients of every trainable parameter as the
concatenated forward, on a batch with answers of different lengths, prompts of different lengths and a row
without a dispreferred image; `prefix_sharing: false` runs the concatenated forward; models it cannot serve fall
back (auto) or are refused (true).

Tolerances (float32): log-probs are sums of up to ~30 token log-probs of magnitude up to ~10 each, and the two
paths add the same terms in another order (attention over padded widths that differ, one batch of 5 prefixes
instead of 9 sequences), so they agree to float32 rounding of those sums, ~1e-5; 1e-4 is asserted. Gradients
are compared with rtol 1e-4 and an absolute floor of 1e-4 times the largest gradient entry of the model:
the rounding error of an entry scales with the magnitudes summed into it, not with the entry itself (key-bias
gradients are mathematically 0 and come out as ~1e-8 either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_llava, save_tiny_qwen2_vl

from mfpo.loss import LossWeights, mfpo_loss
from mfpo.train.config import TrainConfig
from mfpo.train.data import MFPOCollator
from mfpo.train.prefix import PrefixSharingUnsupported, prefix_problem, resolve, shared_prefix_logps
from mfpo.train.trainer import MFPOTrainer, build_policy, training_arguments
from mfpo.vlm import answer_logps
from pipeline.images import encode_png

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}  # vision tower and LM


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("prefix") / "tiny-llava")


def _image(seed: int, size: tuple[int, int] = (48, 64)) -> dict[str, Any]:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return {"bytes": encode_png(Image.fromarray(pixels)), "path": None}


def _rows() -> list[dict[str, Any]]:
    """Three rows: answers and questions of different lengths; the second has no dispreferred image (perturb's
    skip fallback), the third's rejected answer is the longest sequence of the batch."""
    return [
        {
            "sample_id": "a",
            "images": [_image(1)],
            "question": "What is on the mat?",
            "chosen_text": "A cat sits on a red mat.",
            "rejected_text": "A dog.",
            "rejected_image": _image(2),
            "ref_logp_chosen": -60.0,
            "ref_logp_rejected": -25.0,
            "ref_logp_chosen_noised": -61.0,
        },
        {
            "sample_id": "b",
            "images": [_image(3, (64, 40))],
            "question": "Which colour is the sky in this picture, and are there clouds?",
            "chosen_text": "Blue.",
            "rejected_text": "Green, with purple clouds over a wide field.",
            "rejected_image": None,
            "ref_logp_chosen": -20.0,
            "ref_logp_rejected": -120.0,
            "ref_logp_chosen_noised": None,
        },
        {
            "sample_id": "c",
            "images": [_image(4)],
            "question": "Count the coins.",
            "chosen_text": "There are three coins.",
            "rejected_text": "There are four coins on the table, two of them gold and two silver.",
            "rejected_image": _image(5),
            "ref_logp_chosen": -70.0,
            "ref_logp_rejected": -200.0,
            "ref_logp_chosen_noised": -69.0,
        },
    ]


def _policy(path: Path, finetune: str, checkpointing: bool) -> tuple[Any, Any]:
    settings: dict[str, Any] = {"model": {"model": str(path)}, "finetune": finetune, "lora": LORA}
    if finetune == "full":
        settings["freeze_vision_tower"] = False  # gradients must reach the vision tower through the cache
    cfg = TrainConfig.model_validate(settings)
    torch.manual_seed(0)
    model, processor, _ = build_policy(cfg, cfg.model)
    with torch.no_grad():  # LoRA's B starts at 0, which would make every A gradient 0: give B values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    if checkpointing:  # as the Trainer sets it up (training_arguments: use_reentrant False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, processor


def _loss_and_grads(
    model: Any, batch: dict[str, Any], shared: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(3B answer log-probs, gradient of every trainable parameter after the MFPO loss's backward, images the
    vision tower encoded)."""
    inputs = {k: v for k, v in batch.items() if k not in ("answer_spans", "reference", "has_image")}
    spans = batch["answer_spans"]
    images: list[int] = []

    def count(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        images.append(len(kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]))

    tower = next(m for n, m in model.named_modules() if n.endswith("vision_tower"))
    hook = tower.register_forward_pre_hook(count, with_kwargs=True)
    try:
        model.zero_grad(set_to_none=True)
        if shared:
            logps = shared_prefix_logps(model, inputs, spans)[0]
        else:
            logps = answer_logps(model(**inputs).logits, inputs["input_ids"], spans)[0]
        loss, _ = mfpo_loss(logps.view(3, -1).T, batch["reference"], batch["has_image"], LossWeights())
        loss.backward()
    finally:
        hook.remove()
    # (a parameter outside the graph, like the vision tower's unused post_layernorm, has none in either path)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads, sum(images)


@pytest.mark.parametrize(
    ("finetune", "checkpointing"),
    [("lora", False), ("lora", True), ("full", True)],
    ids=["lora", "lora-gradient-checkpointing", "full-vision-tower-gradient-checkpointing"],  # 2nd: the defaults
)
def test_shared_prefix_matches_the_concatenated_forward(llava: Path, finetune: str, checkpointing: bool):
    model, processor = _policy(llava, finetune, checkpointing)
    batch = MFPOCollator(processor)(_rows())
    assert batch["has_image"].tolist() == [True, False, True]
    prompts = batch["answer_spans"][:, 0]
    answers = batch["answer_spans"][:, 1] - prompts
    assert len(set(prompts.tolist())) == 3 and len(set(answers.tolist())) >= 5  # padding in both parts

    concat, concat_grads, concat_images = _loss_and_grads(model, batch, shared=False)
    shared, shared_grads, shared_images = _loss_and_grads(model, batch, shared=True)

    # Every sequence's answer log-prob, the no-image row's chosen-on-m' slot included.
    torch.testing.assert_close(shared, concat, rtol=0, atol=1e-4)
    # 9 sequences, 5 distinct prefixes: m and m' for two rows, m alone for the row without m'.
    assert (concat_images, shared_images) == (9, 5)
    assert concat_grads.keys() == shared_grads.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(concat_grads) > 0.9 * len(trainable)
    scale = max(g.abs().max().item() for g in concat_grads.values())
    for name, grad in concat_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
    tower = {n: g for n, g in shared_grads.items() if "vision_tower" in n}
    assert tower and any(g.abs().max() > 0 for g in tower.values())  # through the prefix's keys/values
    if finetune == "full":
        projector = [g for n, g in shared_grads.items() if "multi_modal_projector" in n]
        assert projector and all(g.abs().max() > 0 for g in projector)


def _trainer(path: Path, tmp_path: Path, setting: Any) -> MFPOTrainer:
    cfg = TrainConfig.model_validate(
        {"model": {"model": str(path)}, "lora": LORA, "gradient_checkpointing": False, "prefix_sharing": setting}
    )
    model, processor, dtype = build_policy(cfg, cfg.model)
    return MFPOTrainer(
        model=model,
        args=training_arguments(cfg, tmp_path / "out", 0, 1.0, False),
        data_collator=MFPOCollator(processor, None, dtype),
        weights=LossWeights(),
        prefix_sharing=cfg.prefix_sharing,
    )


def test_prefix_sharing_false_runs_the_concatenated_forward(llava: Path, tmp_path: Path):
    """false: one forward of all 3B full sequences (the old path); auto (the default): a prefix pass and an
    answer pass; both give the same loss."""
    assert TrainConfig().prefix_sharing == "auto"
    losses = {}
    for setting in (False, "auto"):
        trainer = _trainer(llava, tmp_path, setting)
        calls: list[tuple[int, ...]] = []
        base = trainer.model.get_base_model()
        hook = base.register_forward_pre_hook(
            lambda _m, _a, kwargs, calls=calls: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        )
        batch = trainer.data_collator(_rows())
        starts, ends = batch["answer_spans"].T  # (compute_loss takes the batch's bookkeeping keys out)
        with torch.no_grad():
            losses[setting] = trainer.compute_loss(trainer.model, batch)
        hook.remove()
        full = tuple(batch["input_ids"].shape)
        if setting is False:
            assert trainer.prefix_sharing is False and calls == [full]
        else:
            assert trainer.prefix_sharing is True and len(calls) == 2
            (prefixes, width), (answers, answer_width) = calls
            assert prefixes == 5 and answers == 8  # the no-image row's chosen-on-m' is its chosen: computed once
            # all prompt tokens but the last | that one and the answer, each padded to its own longest
            assert width == starts.max() - 1 and answer_width == (ends - starts).max() + 1
    torch.testing.assert_close(losses["auto"], losses[False], rtol=0, atol=1e-5)


def test_unsupported_models_fall_back_or_are_refused(llava: Path, tmp_path: Path):
    """Qwen2-VL (positions from the image grid, per-token image markers): auto trains with the concatenated
    forward, true is refused before any step with a one-line error naming the option."""
    qwen = save_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    cfg = TrainConfig.model_validate({"model": {"model": str(qwen)}, "lora": {"r": 4, "alpha": 8}})
    model, _, _ = build_policy(cfg, cfg.model)
    assert prefix_problem(model, gradient_checkpointing=False)
    assert resolve("auto", model, gradient_checkpointing=False) is False
    with pytest.raises(ValueError, match=r"train\.prefix_sharing: true, but .*set train\.prefix_sharing: auto"):
        resolve(True, model, gradient_checkpointing=False)
    assert issubclass(PrefixSharingUnsupported, ValueError)

    # LLaVA: supported, with or without gradient checkpointing; the option does not change fingerprints.
    llava_cfg = TrainConfig.model_validate({"model": {"model": str(llava)}, "lora": LORA})
    llava_model, _, _ = build_policy(llava_cfg, llava_cfg.model)
    assert prefix_problem(llava_model, gradient_checkpointing=True) is None
    assert resolve(True, llava_model, gradient_checkpointing=True) is True
    off = TrainConfig.model_validate({"model": {"model": str(llava)}, "lora": LORA, "prefix_sharing": False})
    assert off.weight_fields() == llava_cfg.weight_fields()
