"""ingest's row rules: what a source row's fields become before the stage checks them. The format layouts
(`normalise_fields`: RLHF-V's JSON `text`, TRL's conversations, flat columns), the text a reader sees (control and
invisible characters, NFC: `reader_view`, `without_invisible`), a row's canonical bytes (its content id and planned
digest), image bytes given as text, and the short forms of values and errors in quarantine reasons. The rules
themselves are listed in stages.ingest's docstring."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

from pipeline.errors import RowError

MAX_DEPTH = 64  # JSON nesting no real row needs; deeper rows would exhaust the recursion limit later
CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # control characters but NUL, \t, \n, \r
# Invisible format characters (Unicode category Cf, less the visible prepended marks such as U+0600): zero-width
# space and joiners, bidi marks and embeddings, word joiner, BOM, soft hyphen, tags, ... A reader sees none.
INVISIBLE = (
    "\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
INVISIBLE_RUN = re.compile(f"[{INVISIBLE}]")
# Kept where they shape what a reader sees: a joiner between two visible characters (emoji sequences such as
# U+1F9D1 U+200D U+1F680, Persian and Indic words), tag characters spelling a flag after U+1F3F4.
SHAPING = re.compile(
    f"(?<=[^\\s{INVISIBLE}])[\u200c\u200d](?=[^\\s{INVISIBLE}])|(?<=\U0001f3f4)[\U000e0020-\U000e007f]+\U000e007f"
)


def reader_view(text: str) -> str:
    """What a reader sees of a text, for equality and emptiness: no invisible characters, whitespace runs as one
    space."""
    return " ".join(INVISIBLE_RUN.sub("", text).split())


def without_invisible(text: str) -> tuple[str, int]:
    """The text without invisible format characters, but the joiners and tags that shape a visible character;
    and how many characters were removed."""
    parts, removed, pos = [], 0, 0
    for m in [*SHAPING.finditer(text), None]:
        end = len(text) if m is None else m.start()
        segment = INVISIBLE_RUN.sub("", text[pos:end])
        removed += end - pos - len(segment)
        parts.append(segment)
        if m is not None:
            parts.append(m.group())
            pos = m.end()
    return "".join(parts), removed


def normalise_fields(fmt: str, fields: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(image reference, question, chosen, rejected) from one source row of the given layout."""
    if fmt == "rlhf-v":
        text = fields.get("text")
        if text is None:
            raise RowError("missing field: text")
        if isinstance(text, str):
            try:
                text = json.loads(text)
            except RecursionError:
                raise RowError(f"bad field: text nests deeper than {MAX_DEPTH} levels") from None
            except json.JSONDecodeError as err:
                raise RowError(f"bad field: text is not valid JSON ({err.msg})") from None
            except ValueError as err:  # e.g. an integer of 5000 digits
                raise RowError(f"bad field: text is not usable JSON ({short_error(err)})") from None
        if not isinstance(text, dict):
            raise RowError("bad field: text must be a JSON object with question, chosen, rejected")
        return fields.get("image"), text.get("question"), text.get("chosen"), text.get("rejected")
    if fmt == "trl":
        images = fields.get("images")
        if not isinstance(images, list) or not images:
            raise RowError("missing field: images")
        if len(images) != 1:
            raise RowError(f"bad field: images has {len(images)} images; MFPO rows need exactly one")
        return (
            images[0],
            message_text(fields.get("prompt"), "user", "prompt"),
            message_text(fields.get("chosen"), "assistant", "chosen"),
            message_text(fields.get("rejected"), "assistant", "rejected"),
        )
    return fields.get("image"), fields.get("question"), fields.get("chosen"), fields.get("rejected")


def message_text(messages: Any, role: str, field: str) -> str | None:
    """Text of the last `role` turn of a conversational field (TRL layout); plain strings pass."""
    if messages is None or isinstance(messages, str):
        return messages
    if not isinstance(messages, list):
        raise RowError(f"bad field: {field} must be a list of messages")
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") == role]
    if not turns:
        raise RowError(f"bad field: {field} has no {role} turn")
    content = turns[-1].get("content")
    if isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = [c.get("text") or "" for c in content if isinstance(c, dict) and c.get("type") == "text"]
    else:
        raise RowError(f"bad field: {field} content must be text or a list of parts")
    return "\n".join(p.replace("<image>", "").strip() for p in parts if p is not None).strip() or None


def canonical_bytes(fields: dict[str, Any]) -> bytes:
    def norm(v: Any) -> Any:
        if isinstance(v, bytes | bytearray):
            return {"sha256": hashlib.sha256(v).hexdigest()}
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(fields), sort_keys=True, ensure_ascii=True, default=str).encode()


def inline_bytes(data: Any) -> bytes:
    """Image bytes carried in the row: binary, or text (JSON has no bytes) that is a data:image/...;base64,
    URI or plain base64. Text that is neither is refused, not guessed at."""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if not isinstance(data, str):
        raise RowError(f"bad field: image bytes must be binary or base64 text, got {type(data).__name__}")
    body = data.strip()
    what = "valid plain base64"
    if body.startswith("data:"):
        header, sep, body = body.partition(",")
        mime, _, params = header[len("data:") :].partition(";")
        if not sep or "base64" not in params.lower().split(";"):
            raise RowError("image: data URI is not base64-encoded (expected data:image/...;base64,...)")
        if not mime.strip().lower().startswith("image/"):
            raise RowError(f"image: data URI holds {mime.strip() or 'untyped data'!r}, not an image")
        what = "a data URI with valid base64"
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RowError(
            f"image: image bytes given as text are not {what} (only data:image/...;base64, URIs and plain "
            "base64 are decoded)"
        ) from None


def json_depth(value: Any) -> int:
    """How deep lists and objects nest (iteratively: the point is to refuse rows that recursion cannot take)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def clip(text: str, limit: int = 120) -> str:
    """A user-supplied string short enough for a one-line reason."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def short_error(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__
