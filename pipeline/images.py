"""Bounded, validated image decoding shared by the stages.

`validate_image` is the gate every source image passes at ingest: size bounds before decoding
(decompression bombs), a full decode (truncated files), EXIF orientation applied, any mode (palette,
CMYK, 16-bit, alpha, 1-bit, floating point) converted to 8-bit RGB. An animated image keeps its first
frame. Floating-point pixels (mode F, e.g. float TIFF) are read as [0, 1] when they all lie there (scaled
by 255), else as [0, 255]; NaN, infinite or other ranges are refused rather than guessed. Whatever a
decoder raises on hostile bytes becomes a RowError. Later stages call `decode_rgb` on stored images,
which are already clean.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import RowError

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_KEEP_AS_IS = {"JPEG", "PNG", "WEBP"}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 16
    formats: tuple[str, ...] = DEFAULT_FORMATS


@dataclass(frozen=True)
class CleanImage:
    data: bytes  # encoded image: the original bytes when they were already clean RGB, else PNG
    width: int
    height: int
    reencoded: bool


def validate_image(data: bytes, limits: ImageLimits) -> CleanImage:
    """Decode, bound and normalise one image; raise RowError('image: ...') with a specific reason."""
    if not data:
        raise RowError("image: empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise RowError(f"image: {len(data)} bytes exceeds image.max_bytes={limits.max_bytes}")
    Image.init()  # register every decoder, so `formats` can name any of them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RowError(f"image: decompression bomb refused before decoding ({err})") from None
    except UnidentifiedImageError:
        raise RowError(
            f"image: not a decodable image (accepted formats: {', '.join(limits.formats)})", payload=data
        ) from None
    except Exception as err:  # OSError mostly; any decoder error on hostile bytes is the row's problem
        raise RowError(f"image: corrupt header ({_short(err)})", payload=data) from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise RowError(
            f"image: decompression bomb refused before decoding: {width}x{height} = {width * height} "
            f"pixels exceeds image.max_pixels={limits.max_pixels}"
        )
    fmt = img.format
    try:
        animated = getattr(img, "n_frames", 1) > 1  # the first frame is the image; stored alone, as PNG
        img.load()
    except Exception as err:  # decoders raise OSError, but also EOFError, struct.error, ... on hostile bytes
        raise RowError(f"image: truncated or corrupt data ({_short(err)})", payload=data) from None
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block: the pixels are fine, the orientation is unknown
        orientation = 1
    source_mode = img.mode
    with contextlib.suppress(Exception):  # as above: a corrupt EXIF block keeps the pixels as stored
        img = ImageOps.exif_transpose(img) or img
    try:
        rgb = to_rgb(img)
    except RowError:
        raise
    except Exception as err:
        raise RowError(f"image: cannot convert mode {source_mode} to RGB ({_short(err)})", payload=data) from None
    if min(rgb.size) < limits.min_side:
        raise RowError(f"image: too small ({rgb.width}x{rgb.height}; image.min_side={limits.min_side})")
    if fmt in _KEEP_AS_IS and source_mode == "RGB" and orientation in (None, 1) and not animated:
        clean = CleanImage(data, rgb.width, rgb.height, reencoded=False)
    else:
        clean = CleanImage(encode_png(rgb), rgb.width, rgb.height, reencoded=True)  # lossless: same pixels
    cache = _PASS_CACHE.get()
    if cache is not None:  # later stages of this pass decode the stored bytes to exactly these pixels
        cache.put(clean.data, np.array(rgb))
    return clean


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Alpha is composited over white; 16-bit keeps its top 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        # PIL's own I;16 -> L conversion clips at 255 instead of rescaling: scale 16-bit data down.
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) >> 8
        arr = np.clip(arr, 0, 255)  # negative 32-bit values would wrap around in uint8
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(img, dtype=np.float64)), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Floating-point pixels to 8 bits: [0, 1] data (the usual float convention) is scaled by 255, [0, 255]
    data is kept; anything else has no agreed meaning, so it is refused instead of clipped to black."""
    if not np.isfinite(arr).all():
        raise RowError("image: floating-point image has NaN or infinite pixels")
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo < 0 or hi > 255:
        raise RowError(f"image: floating-point pixels span [{lo:g}, {hi:g}], outside [0, 1] and [0, 255]")
    scale = 255.0 if hi <= 1.0 else 1.0
    return np.rint(arr * scale).astype(np.uint8)


def _short(err: BaseException) -> str:
    """An exception as a short single line for a quarantine reason."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_rgb(image: dict | bytes) -> np.ndarray:
    """A stored image (datasets Image struct or bytes) as an HxWx3 uint8 array, writable (torch warns on
    read-only arrays). Inside `decode_once()`, an image already decoded by an earlier stage of the same
    worker pass is copied from there instead of decoded again."""
    data = image["bytes"] if isinstance(image, dict) else image
    cache = _PASS_CACHE.get()
    if cache is not None:
        hit = cache.get(data)
        if hit is not None:
            return hit.copy()
    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(to_rgb(img))
    if cache is not None:
        cache.put(data, arr.copy())
    return arr


class _DecodeCache:
    """Decoded images of one worker pass, keyed by their encoded bytes, oldest dropped first past `max_bytes`.

    Keyed by content, not by object: every stage gets its own Python `bytes` for the same Arrow value (the dict
    compares the bytes themselves, so two images can never be confused)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def get(self, data: bytes) -> np.ndarray | None:
        arr = self.entries.get(data)
        if arr is not None:
            self.entries.move_to_end(data)
        return arr

    def put(self, data: bytes, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        old = self.entries.pop(data, None)
        if old is not None:
            self.size -= old.nbytes
        self.entries[data] = arr
        self.size += arr.nbytes
        while self.size > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.size -= dropped.nbytes


_PASS_CACHE: contextvars.ContextVar[_DecodeCache | None] = contextvars.ContextVar("mfpo_decode_cache", default=None)


@contextlib.contextmanager
def decode_once(max_bytes: int = 512 * 1024 * 1024) -> Iterator[None]:
    """Within this block `decode_rgb` decodes each distinct image once (up to `max_bytes` of decoded pixels
    kept): the engine opens it around one worker pass, in which several stages read the same images."""
    token = _PASS_CACHE.set(_DecodeCache(max_bytes))
    try:
        yield
    finally:
        _PASS_CACHE.reset(token)
