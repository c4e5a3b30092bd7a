"""The prefix-shared MFPO forward: each distinct image+prompt prefix runs once, the answers continue its KV cache.

The collator (`data.MFPOCollator`) builds three sequences per row: (y_w | m), (y_l | m), (y_w | m'). In a
LLaVA-style model the image+prompt prefix (576 image tokens for LLaVA-1.5, plus the question) is far longer
than an answer, and two of the three sequences share it. Here, from that same collated batch:

1. **Prefixes.** Sequences with identical prompt tokens and identical image tensors share one prefix
   (chosen and rejected on `m` always do; `m'` where the row has no dispreferred image and the collator put `m`
   in its place). The distinct prefixes, all prompt tokens but the last, run as one batch with `use_cache`,
   right-padded as the collator pads (positions 0..P-2; padding sits after the real tokens and is masked).
   Their keys/values stay in the autograd graph: the loss backpropagates through them into the language
   model, the projector and the vision tower.
2. **Answers.** Each distinct (prefix, answer) pair runs as `[last prompt token, answer tokens]` on the cache
   of its prefix, right-padded. Carrying the last prompt token over means the logits that predict the first
   answer token come out of this pass, as in the full sequence. The cache is expanded to the answers by an
   index along the batch dimension (two or three answers per prefix), taken inside each layer so that only one
   layer's expanded copy exists at a time. The 2-D attention mask is [prefix mask | answer mask] (the holes of
   a short prefix's padding are masked), and position ids continue each prefix's own length (P-1 + t), not
   the padded width, so rotary embeddings see what they see in the full sequence.
3. The answer log-probs go back to the collated order (chosen x B, rejected x B, chosen-on-m' x B); a
   sequence identical to another (same prefix, same answer) reuses its log-prob.

Per row the policy thus pays two prefixes (one where `m'` is missing) instead of three, and three short
answers. The result equals the concatenated forward up to float rounding, values and gradients
(tests/test_prefix_forward.py). One difference in distribution, not in value: with dropout (LoRA's `dropout`),
the answers that share a prefix share its dropout mask, where the concatenated forward draws one per sequence.

Under gradient checkpointing transformers drops the cache of checkpointed decoder layers, since replaying a
layer in backward would write its keys/values twice. The caches here are replay-safe (the prefix cache stores a
layer once and a replay gets its fresh states back; the answer cache only reads), so the layers are allowed
to keep them for the duration of our two calls (`_can_checkpoint_with_cache`, in transformers 5.23 and 5.24).

Not every model fits: one that derives positions from the image layout (Qwen2-VL's M-RoPE), marks tokens as
image/text per position (Gemma 3, PaliGemma `token_type_ids`), or has sliding-window layers (whose cache drops
old positions) runs the concatenated forward instead (`prefix_problem` says why).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import DynamicCache

from mfpo.vlm import answer_logps
from pipeline.errors import PipelineError

log = logging.getLogger("mfpo")


class PrefixSharingUnsupported(PipelineError, ValueError):
    """`train.prefix_sharing: true` where the prefix-shared forward cannot run (one line for the CLI)."""


# ------------------------------------------------------------------------------------------ model support
def unwrap(model: Any) -> Any:
    """The transformers model under DDP / peft wrappers."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def _cache_kwarg(base: Any) -> str | None:
    params = inspect.signature(type(base).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _checkpoint_keeps_cache() -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


def prefix_problem(model: Any, gradient_checkpointing: bool) -> str | None:
    """Why the prefix-shared forward cannot run on this model (None when it can)."""
    base = unwrap(model)
    if _cache_kwarg(base) is None:
        return f"{type(base).__name__}.forward takes no KV cache"
    params = inspect.signature(type(base).forward).parameters
    per_token = [p for p in params if p.endswith("token_type_ids")]
    if per_token:
        return f"{type(base).__name__} takes per-token image/text markers ({per_token[0]})"
    if any(hasattr(m, "get_rope_index") for m in base.modules()):
        return f"{type(base).__name__} computes multimodal rotary positions from the image layout (M-RoPE)"
    text = base.config.get_text_config(decoder=True)
    if not getattr(text, "is_causal", True):
        return f"{type(base).__name__}'s language model is not causal"
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
        not layer_types and getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    ):
        return f"{type(base).__name__} has sliding-window or non-attention layers"
    if gradient_checkpointing and not _checkpoint_keeps_cache():
        import transformers

        return (
            f"transformers {transformers.__version__} drops the KV cache of checkpointed layers "
            "(train.gradient_checkpointing)"
        )
    return None


def resolve(setting: bool | Literal["auto"], model: Any, gradient_checkpointing: bool) -> bool:
    """train.prefix_sharing -> whether to use the prefix-shared forward: `auto` where the model supports it,
    `true` or a one-line error naming the reason, `false` never."""
    if setting is False:
        return False
    problem = prefix_problem(model, gradient_checkpointing)
    if problem is None:
        return True
    if setting is True:
        raise PrefixSharingUnsupported(
            f"train.prefix_sharing: true, but {problem}; set train.prefix_sharing: auto (or false) to train with "
            "the concatenated forward"
        )
    log.info("train: concatenated forward (prefix sharing is off: %s)", problem)
    return False


# ------------------------------------------------------------------------------------------ the caches
class _PrefixCache(DynamicCache):
    """Stores each layer's prefix keys/values once. A second update of a filled layer is the replay of that layer
    in backward (gradient checkpointing): it gets its freshly recomputed states back and nothing is stored."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx < len(self.layers) and self.layers[layer_idx].get_seq_length() > 0:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class _AnswerCache(DynamicCache):
    """Read-only view of a prefix cache for the answers: layer keys/values are `prefix[index]` along the batch
    (an index, so autograd reaches the prefix), concatenated with the answers' own; nothing is stored, so a
    replay under gradient checkpointing sees the same states and only one layer's expanded copy is alive."""

    def __init__(self, prefix: _PrefixCache, index: torch.Tensor) -> None:
        super().__init__()
        self.layers = list(prefix.layers)  # the same layer objects: lengths (for the masks) come from them
        self.index = index

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        keys = torch.cat([layer.keys.index_select(0, self.index), key_states], dim=-2)
        values = torch.cat([layer.values.index_select(0, self.index), value_states], dim=-2)
        return keys, values


@contextlib.contextmanager
def _cache_under_checkpointing(model: Any) -> Iterator[None]:
    """Let checkpointed decoder layers keep our (replay-safe) caches for the duration of a call."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    flagged = [m for m in layers if m.gradient_checkpointing and "_can_checkpoint_with_cache" not in vars(m)]
    for m in flagged:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in flagged:
            del m._can_checkpoint_with_cache


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """How the n collated sequences map onto distinct prefixes and distinct answers."""

    prefix_rows: list[int]  # per distinct prefix: the sequence it is taken from
    answer_rows: list[int]  # per distinct (prefix, answer): the sequence it is taken from
    answer_prefix: list[int]  # per distinct answer: its prefix (index into prefix_rows)
    answer_of: list[int]  # per sequence: its distinct answer (index into answer_rows)


def plan(batch: dict[str, Any], spans: torch.Tensor, image_token_id: int | None = None) -> Plan:
    """Group the collated sequences by prefix (prompt tokens and image tensors) and by answer. Raises
    PrefixSharingUnsupported when the batch has inputs the prefix-shared forward cannot split."""
    ids = batch["input_ids"]
    n, length = ids.shape
    extras = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    for key, value in extras.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != n:
            raise PrefixSharingUnsupported(f"train.prefix_sharing: `{key}` is not one tensor row per sequence")
        if value.ndim == 2 and value.shape[1] == length and not key.startswith("pixel"):
            raise PrefixSharingUnsupported(f"train.prefix_sharing: `{key}` has one value per token")
    rows = ids.tolist()
    starts = spans[:, 0].tolist()
    ends = spans[:, 1].tolist()
    prefix_rows: list[int] = []
    prefix_of: list[int] = []
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for s in range(n):
        if starts[s] < 2:
            raise PrefixSharingUnsupported("train.prefix_sharing: a prompt of fewer than two tokens")
        if image_token_id is not None and rows[s][starts[s] - 1] == image_token_id:
            raise PrefixSharingUnsupported("train.prefix_sharing: a prompt that ends with an image token")
        candidates = by_prompt.setdefault(tuple(rows[s][: starts[s]]), [])
        same = next((g for g in candidates if all(torch.equal(v[s], v[prefix_rows[g]]) for v in extras.values())), None)
        if same is None:
            same = len(prefix_rows)
            prefix_rows.append(s)
            candidates.append(same)
        prefix_of.append(same)
    answer_rows: list[int] = []
    answer_prefix: list[int] = []
    answer_of: list[int] = []
    seen: dict[tuple[int, tuple[int, ...]], int] = {}
    for s in range(n):
        key = (prefix_of[s], tuple(rows[s][starts[s] : ends[s]]))
        if key not in seen:
            seen[key] = len(answer_rows)
            answer_rows.append(s)
            answer_prefix.append(prefix_of[s])
        answer_of.append(seen[key])
    return Plan(prefix_rows, answer_rows, answer_prefix, answer_of)


# ------------------------------------------------------------------------------------------ the forward
def shared_prefix_logps(model: Any, batch: dict[str, Any], spans: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Summed answer log-probs of the n collated sequences (as `answer_logps` of one full forward gives them),
    with each distinct prefix computed once. Returns (logps (n,), the answer pass's model output)."""
    base = unwrap(model)
    config = base.config
    p = plan(batch, spans, getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None))
    ids = batch["input_ids"]
    device = ids.device
    starts = spans[:, 0].tolist()
    ends = spans[:, 1].tolist()
    cache_kwarg = _cache_kwarg(base)
    assert cache_kwarg is not None  # resolve() checked it

    # 1. The distinct prefixes: all prompt tokens but the last, right-padded (padding masked, after the tokens).
    lengths = [starts[s] - 1 for s in p.prefix_rows]
    width = max(lengths)
    prefix_ids = torch.empty((len(lengths), width), dtype=ids.dtype, device=device)
    prefix_mask = torch.zeros((len(lengths), width), dtype=torch.long, device=device)
    for g, (s, size) in enumerate(zip(p.prefix_rows, lengths, strict=True)):
        prefix_ids[g, :size] = ids[s, :size]
        prefix_ids[g, size:] = ids[s, size]  # any text token will do (masked); the prompt's last one is one
        prefix_mask[g, :size] = 1
    rows = torch.tensor(p.prefix_rows, device=device)
    extras = {k: v.index_select(0, rows) for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    cache = _PrefixCache()
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(base).forward).parameters else {}
    with _cache_under_checkpointing(model):
        model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            position_ids=torch.arange(width, device=device).expand(len(lengths), -1),
            use_cache=True,
            **{cache_kwarg: cache},
            **keep,  # the prefix's logits are not needed: the answer pass predicts the first answer token
            **extras,
        )

        # 2. The distinct answers, each as [last prompt token, answer tokens] on its prefix's cache.
        sizes = [ends[s] - starts[s] for s in p.answer_rows]
        answer_width = max(sizes) + 1
        answer_ids = torch.empty((len(sizes), answer_width), dtype=ids.dtype, device=device)
        answer_mask = torch.zeros((len(sizes), answer_width), dtype=torch.long, device=device)
        for a, (s, size) in enumerate(zip(p.answer_rows, sizes, strict=True)):
            answer_ids[a, : size + 1] = ids[s, starts[s] - 1 : ends[s]]
            answer_ids[a, size + 1 :] = ids[s, starts[s] - 1]  # masked
            answer_mask[a, : size + 1] = 1
        index = torch.tensor(p.answer_prefix, device=device)
        offset = torch.tensor([lengths[g] for g in p.answer_prefix], device=device)
        outputs = model(
            input_ids=answer_ids,
            attention_mask=torch.cat([prefix_mask.index_select(0, index), answer_mask], dim=1),
            position_ids=offset[:, None] + torch.arange(answer_width, device=device),
            use_cache=True,
            **{cache_kwarg: _AnswerCache(cache, index)},
        )
    answer_spans = torch.tensor([[1, size + 1] for size in sizes])
    logps = answer_logps(outputs.logits, answer_ids, answer_spans)[0]
    # 3. Back to the collated order; identical sequences share one log-prob (and its gradient path).
    return logps.index_select(0, torch.tensor(p.answer_of, device=logps.device)), outputs
