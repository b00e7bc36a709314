"""Turn one source image file into the JPEG bytes a shard stores (runs in the writer's worker processes).

Rules:

- The real format comes from the file's content, never its extension (ImageNet has PNGs named ``.JPEG``).
- A JPEG is copied byte for byte unless it is CMYK/YCCK (nvJPEG and many readers dislike those), uses a
  frame type other than Huffman baseline/extended/progressive (arithmetic, lossless), or its longer
  side exceeds ``max_side``: then it is decoded and re-encoded as RGB JPEG at ``quality``.
- Anything else PIL can read (PNG, WebP, BMP, ...) is decoded, converted to RGB and encoded at ``quality``.
- A copied JPEG is validated cheaply, without decoding the entropy-coded data (a full decode would cap
  the writer far below the >= 2,000 images/s copy goal): the marker segments up to the first scan must
  be well formed with a sane frame header, and an end-of-image marker must follow the scan (catches
  truncated files). ``unmix shards verify`` decodes every image with DALI for the full check.
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


#: Huffman baseline / extended / progressive frames: what libjpeg-turbo, nvJPEG and DALI all decode.
_COPYABLE_SOF = (0xC0, 0xC1, 0xC2)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def scan_jpeg(data: bytes) -> tuple[int, int, int, int] | str:
    """Walk a JPEG's marker segments up to the first scan, without decoding anything.

    Returns ``(width, height, components, SOF marker)`` or an error message: invalid markers, bad or
    overrunning segments, malformed quantization/Huffman tables or frame/scan headers, no frame header
    before the scan, no scan, or no end-of-image marker (a truncated file). ~20 us,
    against ~300 us for PIL's header parse, which matters at >= 2,000 images/s on two cores.
    """
    n, i = len(data), 2
    frame = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return f"corrupt JPEG (no marker at byte {i})"
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # standalone markers
            i += 2
            continue
        if m == 0xD9:
            return "corrupt JPEG (end-of-image before any scan)"
        if m < 0xC0:  # 0x00 and the reserved 0x02..0xBF: DALI's CPU decoder can crash on them
            return f"corrupt JPEG (invalid marker 0xFF{m:02X} at byte {i})"
        seg = int.from_bytes(data[i + 2 : i + 4], "big")
        if seg < 2 or i + 2 + seg > n:
            return f"corrupt or truncated JPEG (segment 0x{m:02X} at byte {i} overruns the file)"
        bad = _bad_table(m, data, i + 4, i + 2 + seg)
        if bad:
            return f"corrupt JPEG ({bad} at byte {i})"
        if m in _SOF_MARKERS:
            if seg < 8 or seg != 8 + 3 * data[i + 9] or not 1 <= data[i + 9] <= 4:
                return f"corrupt JPEG (malformed frame header at byte {i})"
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            if w == 0 or h == 0:
                return f"unsupported JPEG (frame size {w}x{h})"
            frame = (w, h, data[i + 9], m)
        if m == 0xDA:
            if frame is None:
                return "corrupt JPEG (scan before any frame header)"
            if seg < 8 or not 1 <= data[i + 4] <= 4 or seg != 6 + 2 * data[i + 4]:
                return f"corrupt JPEG (malformed scan header at byte {i})"
            if not _has_eoi(data):
                return "truncated JPEG (no end-of-image marker after the scan)"
            return frame
        i += 2 + seg
    return "corrupt or truncated JPEG (no image data)"


def _bad_table(m: int, data: bytes, start: int, end: int) -> str | None:
    """What is wrong with a quantization (DQT) or Huffman (DHT) table segment's layout, or None.

    Each table must have a valid class/precision and id and the tables must fill the segment exactly:
    libjpeg-turbo rejects such files, and DALI's CPU decoder has been seen to crash on them.
    """
    p = start
    if m == 0xDB:
        while p < end:
            pq, tq = data[p] >> 4, data[p] & 15
            if pq > 1 or tq > 3:
                return f"bad quantization table spec 0x{data[p]:02X}"
            p += 1 + 64 * (1 + pq)
        return None if p == end else "quantization tables do not fill their segment"
    if m == 0xC4:
        while p < end:
            tc, th = data[p] >> 4, data[p] & 15
            if tc > 1 or th > 3 or p + 17 > end:
                return f"bad Huffman table spec 0x{data[p]:02X}"
            count = sum(data[p + 1 : p + 17])
            if count > 256:
                return "Huffman table with more than 256 codes"
            p += 17 + count
        return None if p == end else "Huffman tables do not fill their segment"
    return None


def _has_eoi(data: bytes) -> bool:
    """An end-of-image marker after the last start-of-scan: a JPEG cut short has none.

    Fast path: EOI within the last 1 KB. Inside entropy-coded data 0xFF is always followed by 0x00 or a
    restart marker, so an EOI there really is the end; an embedded EXIF thumbnail's EOI sits near the
    start of the file. Files with trailing bytes after their EOI take the exact (slower) path.
    """
    if _EOI in data[-1024:] and len(data) > 4096:
        return True
    sos = data.rfind(_SOS)
    return sos >= 0 and data.rfind(_EOI) > sos


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


def prepare_bytes(index: int, data: bytes, settings: PrepSettings, keep_copies: bool = True) -> Prepared:
    """Prepare already-read file content (see the module docstring for the rules).

    ``keep_copies=False``: for a JPEG to be copied as is, return ``data=None`` (the verdict only): the
    writer re-reads the file itself, which is cheaper than shipping ~100 KB back from a worker process.
    """
    fmt = sniff_format(data[:16])
    try:
        if fmt == "jpeg":
            info = scan_jpeg(data)
            if isinstance(info, str):
                return Prepared(index, None, None, info)
            w, h, components, sof = info
            cmyk = components == 4
            too_big = bool(settings.max_side) and max(w, h) > settings.max_side
            if sof in _COPYABLE_SOF and components in (1, 3) and not too_big:
                return Prepared(index, data if keep_copies else None, COPIED)
            img = Image.open(io.BytesIO(data))
            if too_big and settings.max_side:
                # Let libjpeg scale by 1/2, 1/4, 1/8 while decoding: much cheaper than a full decode.
                scale = settings.max_side / max(w, h)
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            img.load()
            action = CMYK if cmyk else RESIZED if too_big else CONVERTED
            return Prepared(index, _encode(img, settings), action)
        img = Image.open(io.BytesIO(data))
        img.load()
        return Prepared(index, _encode(img, settings), CONVERTED)
    except Image.UnidentifiedImageError:
        return Prepared(index, None, None, "not a readable image (unknown format)")
    except Exception as e:  # PIL raises many types for bad input; all mean "corrupt"
        what = f"not a readable image ({type(e).__name__}: {e})"
        return Prepared(index, None, None, what)


def prepare_file(
    task: tuple[int, str, bytes | None], settings: PrepSettings, keep_copies: bool = True
) -> Prepared:
    """Read ``path`` and prepare it; ``task`` is ``(index, path, content or None)``. Never raises."""
    index, path, data = task
    if data is not None:
        return prepare_bytes(index, data, settings, keep_copies)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Prepared(index, None, None, f"cannot read ({e.strerror or e})")
    if not data:
        return Prepared(index, None, None, "empty file")
    return prepare_bytes(index, data, settings, keep_copies)


def prepare_chunk(
    tasks: list[tuple[int, str, bytes | None]], settings: PrepSettings, keep_copies: bool = True
) -> list[Prepared]:
    """:func:`prepare_file` over a chunk (one round trip to a worker process per chunk)."""
    return [prepare_file(t, settings, keep_copies) for t in tasks]
