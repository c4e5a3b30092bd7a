"""Text as data: a question or an answer is given to a model as the characters it is, never as markup (a
special token's string in the data is tokenised as ordinary text, or the row is refused)."""

from __future__ import annotations

from typing import Any


class UnencodableText(ValueError):
    """A text that cannot be given to a model as text (the stage quarantines its row)."""


# Where data text goes while a chat template is rendered, when the text holds a special token's string:
# private-use characters, which no template or tokenizer gives a meaning.
TEXT_SLOT = "\ue000text\ue001"


def special_strings(tokenizer: Any, processor: Any = None) -> tuple[str, ...]:
    """The strings the tokenizer (or the processor: `<image>`, `<|image_pad|>`, ...) reads as special tokens.
    In data (a question, an answer) they are text, tokenised as the characters they are."""
    owner = processor if processor is not None else tokenizer
    cached = getattr(owner, "_mfpo_special_strings", None)
    if cached is None:
        found = set(tokenizer.all_special_tokens)
        found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        for attr in ("image_token", "video_token", "audio_token", "boi_token", "eoi_token", "fake_image_token"):
            value = getattr(processor, attr, None)
            if isinstance(value, str):
                found.add(value)
        cached = tuple(sorted((s for s in found if s), key=len, reverse=True))
        owner._mfpo_special_strings = cached
    return cached


def text_ids(tokenizer: Any, text: str, what: str) -> list[int]:
    """Token ids of `text` as plain text: a special token's string is split into ordinary tokens."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    if any(i in special for i in ids):  # a tokenizer that cannot split them: never pass one through as markup
        raise UnencodableText(f"{what}: the tokenizer reads part of it as a special token")
    return ids


def around_slot(rendered: str, what: str) -> tuple[str, str]:
    """The rendered chat template before and after the one place where the data text (TEXT_SLOT) goes."""
    before, found, after = rendered.partition(TEXT_SLOT)
    if not found or TEXT_SLOT in after:
        raise UnencodableText(f"{what}: the chat template does not place the {what} as given")
    return before, after
