"""Turn one source image file into the JPEG bytes a shard stores (runs in the writer's worker processes).

Rules:

- The real format comes from the file's content, never its extension (ImageNet has PNGs named ``.JPEG``).
- A JPEG is copied byte for byte unless it is CMYK/YCCK (nvJPEG and many readers dislike those) or its
  longer side exceeds ``max_side``: then it is decoded and re-encoded as RGB JPEG at ``quality``.
- Anything else PIL can read (PNG, WebP, BMP, ...) is decoded, converted to RGB and encoded at ``quality``.
- A copied JPEG is validated cheaply, without decoding the entropy-coded data (too slow for the
  >= 2,000 images/s copy goal): the SOI marker, an EOI marker after the last start-of-scan (catches
  truncated files) and a full header parse by PIL (size, mode). ``unmix shards verify`` decodes every
  image with DALI for the full check.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

#: What happened to an image: copied as is, or why it was re-encoded.
COPIED, RESIZED, CONVERTED, CMYK = "copied", "resized", "converted", "cmyk"

_SOI, _EOI, _SOS = b"\xff\xd8\xff", b"\xff\xd9", b"\xff\xda"


@dataclass(frozen=True)
class PrepSettings:
    """How images are prepared: re-encode quality and optional longest-side limit."""

    quality: int = 95
    max_side: int | None = None


@dataclass(frozen=True)
class Prepared:
    """The result for one source file: JPEG bytes and what was done, or an error message."""

    index: int
    data: bytes | None
    action: str | None
    error: str | None = None


def sniff_format(head: bytes) -> str | None:
    """The image format from its first bytes: "jpeg", "png", "webp", "bmp", "gif", "tiff" or None."""
    if head.startswith(_SOI):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _encode(img: Image.Image, settings: PrepSettings) -> bytes:
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
            # Flatten transparency onto white rather than letting it turn black.
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            img = bg
        else:
            img = img.convert("RGB")
    if settings.max_side and max(img.size) > settings.max_side:
        w, h = img.size
        s = settings.max_side / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=settings.quality)
    return out.getvalue()


def prepare_bytes(index: int, data: bytes, settings: PrepSettings) -> Prepared:
    """Prepare already-read file content (see the module docstring for the rules)."""
    fmt = sniff_format(data[:16])
    try:
        if fmt == "jpeg":
            if data.rfind(_EOI) < data.rfind(_SOS) or data.rfind(_SOS) < 0:
                return Prepared(index, None, None, "truncated JPEG (no end-of-image marker after the scan)")
            img = Image.open(io.BytesIO(data))  # parses headers only
            cmyk = img.mode in ("CMYK", "YCCK")
            too_big = bool(settings.max_side) and max(img.size) > settings.max_side
            if not cmyk and not too_big:
                return Prepared(index, data, COPIED)
            if too_big and settings.max_side:
                # Let libjpeg scale by 1/2, 1/4, 1/8 while decoding: much cheaper than a full decode.
                w, h = img.size
                scale = settings.max_side / max(w, h)
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            img.load()
            return Prepared(index, _encode(img, settings), CMYK if cmyk else RESIZED)
        img = Image.open(io.BytesIO(data))
        img.load()
        return Prepared(index, _encode(img, settings), CONVERTED)
    except Image.UnidentifiedImageError:
        return Prepared(index, None, None, "not a readable image (unknown format)")
    except Exception as e:  # PIL raises many types for bad input; all mean "corrupt"
        what = f"not a readable image ({type(e).__name__}: {e})"
        return Prepared(index, None, None, what)


def prepare_file(task: tuple[int, str, bytes | None], settings: PrepSettings) -> Prepared:
    """Read ``path`` and prepare it; ``task`` is ``(index, path, content or None)``. Never raises."""
    index, path, data = task
    if data is not None:
        return prepare_bytes(index, data, settings)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Prepared(index, None, None, f"cannot read ({e.strerror or e})")
    if not data:
        return Prepared(index, None, None, "empty file")
    return prepare_bytes(index, data, settings)


def prepare_chunk(tasks: list[tuple[int, str, bytes | None]], settings: PrepSettings) -> list[Prepared]:
    """:func:`prepare_file` over a chunk (one round trip to a worker process per chunk)."""
    return [prepare_file(t, settings) for t in tasks]
