"""Vision-language model helpers shared by the `score` stage and the trainer: load any
`AutoModelForImageTextToText` with its processor, turn (image, question, answer) into model inputs the
same way everywhere, and score answers (summed log-probs, predictive entropy) on the answer tokens only.

Answers are tokenized apart from the prompt and appended (as TRL does), so a prompt's tokens never merge
with the answer's; the tokenizer's end-of-turn token closes the answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfpo.models import ModelConfig
from mfpo.text import TEXT_SLOT, around_slot, special_strings, text_ids

# Parquet schema metadata key under which the score stage records what its reference log-probs were
# computed with; the write stage carries it into the final dataset, and the trainer checks it.
REFERENCE_KEY = "mfpo.reference"
# Fields of that record that must match between the reference and the policy's starting point.
REFERENCE_FIELDS = ("weights", "dtype", "chat_template_sha256", "system_prompt", "max_length")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class Example:
    input_ids: list[int]
    answer_start: int  # index of the first answer token in input_ids
    extra: dict[str, Any]  # processor outputs besides input_ids / attention_mask (pixel_values, ...)
    token_keys: tuple[str, ...] = ()  # extras with one value per token (e.g. Qwen2-VL's mm_token_type_ids)


def load_vlm(cfg: ModelConfig, device: Any, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = cfg.pretrained_kwargs()
    processor = AutoProcessor.from_pretrained(cfg.model, **kwargs)
    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype, **kwargs).to(device)
    return model, processor


def weights_identity(cfg: ModelConfig) -> str:
    """What identifies the weights: `commit:<sha>` of a Hub checkpoint (the revision resolved through the
    local cache), or `sha256:<hex>` of a local directory's weight files (names and bytes)."""
    folder = Path(cfg.model)
    if folder.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
            h.update(str(f.relative_to(folder)).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(chunk)
        return f"sha256:{h.hexdigest()}"
    from transformers.utils import cached_file

    config = cached_file(cfg.model, "config.json", **cfg.pretrained_kwargs())
    parts = Path(config).parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else cfg.revision or "unresolved"
    return f"commit:{commit}"


def reference_record(cfg: ModelConfig, processor: Any, dtype: Any, system_prompt: str | None) -> dict[str, Any]:
    """What a set of answer log-probs was computed with: enough to tell whether another model (the policy at
    step 0) would compute the same ones."""
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return {
        "model": cfg.model,
        "revision": cfg.revision,
        "weights": weights_identity(cfg),
        "dtype": str(dtype).removeprefix("torch."),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "system_prompt": system_prompt,
        "max_length": None,  # prompts and answers are never truncated
    }


def reference_mismatch(reference: dict[str, Any], policy: dict[str, Any]) -> list[str]:
    """The fields in which two reference records differ, as `field: reference value != policy value`."""

    def short(value: Any) -> str:
        text = repr(value)
        return text[:24] + "...'" if len(text) > 28 else text  # hashes: enough to tell them apart

    return [
        f"{k} {short(reference.get(k))} (reference) != {short(policy.get(k))} (policy)"
        for k in REFERENCE_FIELDS
        if reference.get(k) != policy.get(k)
    ]


def prompt_messages(question: str, system: str | None = None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return messages


def build_prompt(processor: Any, image: np.ndarray, question: str, system: str | None = None) -> Example:
    """The prompt part of a sequence (image tokens and question), ready for `with_answer`. A question holding
    a special token's text (a literal `<image>`) is tokenised around the template: that text stays text."""
    if any(s in question for s in special_strings(processor.tokenizer, processor)):
        return _build_prompt_escaped(processor, image, question, system)
    prompt = processor.apply_chat_template(prompt_messages(question, system), add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    return _prompt_example(inputs, [])


def _build_prompt_escaped(processor: Any, image: np.ndarray, question: str, system: str | None) -> Example:
    rendered = processor.apply_chat_template(prompt_messages(TEXT_SLOT, system), add_generation_prompt=True)
    before, after = around_slot(rendered, "question")
    inputs = processor(images=[image], text=[before], return_tensors="pt")  # the image's tokens, expanded
    rest = processor.tokenizer(after, add_special_tokens=False)["input_ids"]
    return _prompt_example(inputs, text_ids(processor.tokenizer, question, "question") + rest)


def _prompt_example(inputs: Any, more_ids: list[int]) -> Example:
    """An Example from the processor's outputs, followed by `more_ids` (text: per-token extras are 0 there)."""
    import torch

    head = inputs["input_ids"][0].tolist()
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    token_keys = tuple(
        k for k, v in extra.items() if not k.startswith("pixel") and v.ndim == 2 and v.shape == (1, len(head))
    )
    for k in token_keys:
        extra[k] = torch.cat([extra[k], extra[k].new_zeros((1, len(more_ids)))], dim=1)
    prompt_ids = head + more_ids
    return Example(prompt_ids, len(prompt_ids), extra, token_keys)


def with_answer(processor: Any, prompt: Example, answer: str) -> Example:
    """The prompt followed by the answer's own tokens (as text: a literal `<image>` is characters, not the
    image token) and the end-of-turn token."""
    tokenizer = processor.tokenizer
    answer_ids = text_ids(tokenizer, answer, "answer")
    if tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    return Example(prompt.input_ids + answer_ids, len(prompt.input_ids), prompt.extra, prompt.token_keys)


def build_example(processor: Any, image: np.ndarray, question: str, answer: str, system: str | None = None) -> Example:
    return with_answer(processor, build_prompt(processor, image, question, system), answer)


def collate(examples: list[Example], pad_id: int, device: Any, dtype: Any, left: bool = False) -> dict[str, Any]:
    """Right-padded batch (`left`: left-padded, for generation to continue every sequence from its last token);
    per-example image tensors are concatenated along their first dimension, which fits LLaVA (one image each),
    LLaVA-NeXT, Qwen2-VL (patches + grid) and Idefics3 alike."""
    import torch

    length = max(len(e.input_ids) for e in examples)
    starts = [length - len(e.input_ids) if left else 0 for e in examples]
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, starts[i] : starts[i] + len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, starts[i] : starts[i] + len(e.input_ids)] = 1
    batch: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    for key in examples[0].extra:
        if key in examples[0].token_keys:  # per-token values: answer and padding positions are text (0)
            value = torch.zeros((len(examples), length), dtype=examples[0].extra[key].dtype)
            for i, e in enumerate(examples):
                value[i, starts[i] : starts[i] + e.extra[key].shape[1]] = e.extra[key][0]
        else:
            value = torch.cat([e.extra[key] for e in examples], dim=0)
        batch[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return batch


def answer_spans(examples: list[Example]) -> Any:
    """(n, 2) tensor of [first answer token, end) per example, for `answer_logps`."""
    import torch

    return torch.tensor([[e.answer_start, len(e.input_ids)] for e in examples], dtype=torch.long)


def answer_logps(logits: Any, input_ids: Any, spans: Any, with_entropy: bool = False) -> tuple[Any, Any]:
    """Summed log-prob of each example's answer tokens (differentiable), and optionally the entropy of
    the next-token distribution at each answer position (a list of 1-d tensors).

    The float32 log-softmax runs over `ANSWER_CHUNK` positions at a time, so without gradients its temporaries
    stay bounded however long the answer. Log-softmax is per position and the per-position values are joined
    before they are summed, so the results, and the log-probs' gradients, are the same bits as in one piece
    (with gradients, autograd keeps every chunk's log-softmax for the backward pass, as it kept the whole)."""
    import torch

    logps, entropies = [], []
    for i, (start, end) in enumerate(spans.tolist()):
        # Position t predicts token t + 1: answer tokens [start, end) are predicted at [start-1, end-1).
        parts = [
            _token_scores(logits[i, s:e], input_ids[i, s + 1 : e + 1], with_entropy)
            for s, e in _chunks(start - 1, end - 1, ANSWER_CHUNK)
        ]
        logps.append(torch.cat([lp for lp, _ in parts]).sum())
        if with_entropy:
            entropies.append(torch.cat([h for _, h in parts]))
    return torch.stack(logps), entropies


def answer_scores(
    model: Any, examples: list[Example], batch: dict[str, Any], chunk: int | None = None
) -> dict[str, Any]:
    """Per example: summed answer log-prob, and the mean / summed entropy of the next-token
    distribution over the answer positions (full vocabulary). Returns float64 numpy arrays.

    For scoring without gradients (the score stage, under `torch.inference_mode`). Memory does not grow with
    answer length x vocabulary: where the model is a decoder with a plain output head (`_decoder_and_head`),
    only the decoder runs over the whole batch, and the head then makes logits for `chunk` (default
    `ANSWER_CHUNK`) answer positions at a time, each chunk log-softmaxed in float32 and reduced to its answer
    tokens' log-probs and entropies before the next. A right-padded batch goes to such a decoder without its
    attention mask (`_unpadded`). Any other model runs its full forward, with the log-softmax chunked. The sums
    are those of `answer_logps` over the full logits, on the same per-position values."""
    import torch

    chunk = chunk or ANSWER_CHUNK
    split = _decoder_and_head(model)
    if split is None:
        states, head = model(**batch).logits, None
    else:
        decoder, head = split
        states = decoder(**_unpadded(batch), use_cache=False)[0]  # last hidden state, (B, L, hidden)
    input_ids = batch["input_ids"]
    logp, entropy_mean, entropy_sum = [], [], []
    for i, (start, end) in enumerate(answer_spans(examples).tolist()):
        lps, entropies = [], []
        # Position t predicts token t + 1: answer tokens [start, end) are predicted at [start-1, end-1).
        for s, e in _chunks(start - 1, end - 1, chunk):
            logits = states[i, s:e] if head is None else head(states[i, s:e])
            lp, entropy = _token_scores(logits, input_ids[i, s + 1 : e + 1], True)
            lps.append(lp)
            entropies.append(entropy)
        entropy = torch.cat(entropies)
        logp.append(torch.cat(lps).sum())
        entropy_mean.append(entropy.mean())
        entropy_sum.append(entropy.sum())
    return {
        "logp": torch.stack(logp).detach().double().cpu().numpy(),
        "entropy_mean": torch.stack(entropy_mean).detach().double().cpu().numpy(),
        "entropy_sum": torch.stack(entropy_sum).detach().double().cpu().numpy(),
    }


# Answer positions log-softmaxed at a time (and, in `answer_scores`, given to the output head at a time): beyond the
# model's activations, scoring holds a few float32 tensors of this many positions x the vocabulary (512 x 32k,
# LLaVA-1.5's vocabulary: 66 MB each; x 152k, Qwen2-VL's: 311 MB), whatever the answer's length.
ANSWER_CHUNK = 512

# Image-text-to-text classes whose forward is `logits = self.lm_head(self.model(...)[0])`, nothing applied after
# the head (no logit scaling, no soft-capping), over a causal language model (read in their modeling files,
# transformers 5.24). `answer_scores` runs their `model` and `lm_head` apart; any other class (PaliGemma soft-caps
# its logits, Gemma 3 attends both ways over image tokens, a wrapped or compiled model) runs its full forward.
_DECODER_HEAD_CLASSES = frozenset(
    {
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "LlavaNextVideoForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
        "Idefics2ForConditionalGeneration",
        "Idefics3ForConditionalGeneration",
        "SmolVLMForConditionalGeneration",
    }
)


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder returning the last hidden state, output head) when the model's logits are exactly
    `head(decoder(...)[0])`; None when they may not be (then the caller runs the full forward)."""
    import torch

    if type(model).__name__ not in _DECODER_HEAD_CLASSES:
        return None
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    text_config = model.config.get_text_config()
    if decoder is None or not isinstance(head, torch.nn.Linear):
        return None
    if any(getattr(text_config, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        return None  # a checkpoint asking for a transform of its logits: leave it to the model's own forward
    return decoder, head


def _unpadded(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its attention mask when the mask only marks right padding (as `collate` pads): in a
    causal decoder no real token attends to a later position, so the padding is invisible to them either way.
    With a mask, attention over a padded batch materialises a (batch, 1, L, L) boolean mask, which torch's CPU
    attention turns into float: 5 bytes x B x L^2 (6 GB for three sequences when one is 20,000 tokens long);
    without it, causal attention is computed blockwise in memory linear in L. On the CPU the real tokens'
    outputs are the same bits either way (checked for LLaVA and Qwen2-VL, fp32 and bf16)."""
    import torch

    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    lengths = mask.sum(-1, keepdim=True)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[-1], device=mask.device) < lengths):
        return batch  # not plain right padding: keep the mask
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def _chunks(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """[start, end) in consecutive pieces of at most `size` positions (an empty span: one empty piece)."""
    return [(s, min(s + size, end)) for s in range(start, end, size)] or [(start, end)]


def _token_scores(logits: Any, targets: Any, with_entropy: bool) -> tuple[Any, Any]:
    """For positions' logits (n, V) and the tokens they predict (n,): each token's log-prob (n, 1), and the
    entropy of each position's distribution (n,) or None. float32 whatever the logits' dtype."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(lp.exp() * lp).sum(-1) if with_entropy else None
    return lp.gather(-1, targets[:, None]), entropy
