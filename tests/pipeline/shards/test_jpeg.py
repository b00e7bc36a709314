"""Per-image preparation: format sniffing, the cheap structural JPEG check, re-encoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from unmix.pipeline.shards.jpeg import PrepSettings, prepare_bytes, scan_jpeg, sniff_format


def jpeg(size=(96, 64), mode="RGB", **save) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


S = PrepSettings()


def test_jpeg_copy_paths():
    for data in (jpeg(), jpeg(mode="L"), jpeg(progressive=True), jpeg() + b"\0" * 5000):
        p = prepare_bytes(0, data, S)
        assert (p.action, p.error, p.data) == ("copied", None, data)
    assert prepare_bytes(3, jpeg(), S, keep_copies=False).data is None  # the verdict only
    assert scan_jpeg(jpeg(size=(96, 64)))[:3] == (96, 64, 3)


def test_jpeg_damage_is_caught_without_decoding():
    data = jpeg()
    cut = prepare_bytes(0, data[: int(len(data) * 0.9)], S)  # cut inside the entropy-coded scan
    assert cut.data is None and "truncated JPEG (no end-of-image marker" in cut.error
    head = prepare_bytes(0, data[:300], S)  # cut inside the headers
    assert head.data is None and "truncated JPEG" in head.error
    junk = prepare_bytes(0, b"\xff\xd8\xff\xe0\x00\x04ab" + b"\x13" * 500, S)
    assert junk.data is None and junk.error == "corrupt JPEG (no marker at byte 8)"
    assert prepare_bytes(0, b"\x00" * 100, S).error == "not a readable image (unknown format)"


def _set(data: bytes, at: int, value: int) -> bytes:
    out = bytearray(data)
    out[at] = value
    return bytes(out)


def test_malformed_headers_are_caught():
    """Header damage that crashed DALI's CPU decoder (segfault, seen in CI) or that libjpeg rejects."""
    data = jpeg()
    dqt2 = data.index(b"\xff\xdb", 4)  # PIL writes two single-table DQT segments
    dqt2 = data.index(b"\xff\xdb", dqt2 + 2)
    dht = data.index(b"\xff\xc4")
    sof = data.index(b"\xff\xc0")
    sos = data.index(b"\xff\xda")
    cases = {
        _set(data, 3, 0x00): "invalid marker 0xFF00 at byte 2",  # APP0 marker byte zeroed: segfaulted
        _set(data, 3, 0x10): "invalid marker 0xFF10 at byte 2",  # a reserved marker
        _set(data, dqt2 + 4, 0x25): "bad quantization table spec 0x25",  # precision 2
        _set(data, dqt2 + 3, data[dqt2 + 3] - 1): "quantization tables do not fill",  # length off by one
        _set(data, dht + 4, 0x24): "bad Huffman table spec 0x24",  # table class 2
        _set(data, dht + 5, 200): "Huffman table",  # code counts no longer fill the segment
        _set(data, sof + 9, 5): "malformed frame header",  # 5 components
        _set(data, sos + 4, 0): "malformed scan header",  # 0 components
    }
    for damaged, what in cases.items():
        err = scan_jpeg(damaged)
        assert isinstance(err, str) and what in err, (what, err)
        assert prepare_bytes(0, damaged, S).error == err


def test_cmyk_png_and_resize_are_reencoded():
    cmyk = prepare_bytes(0, jpeg(mode="CMYK"), S)
    assert cmyk.action == "cmyk" and Image.open(io.BytesIO(cmyk.data)).mode == "RGB"
    buf = io.BytesIO()
    Image.new("RGBA", (10, 8), (255, 0, 0, 0)).save(buf, format="PNG")
    png = prepare_bytes(0, buf.getvalue(), S)
    img = Image.open(io.BytesIO(png.data))
    assert png.action == "converted" and img.format == "JPEG" and img.size == (10, 8)
    assert np.asarray(img).min() > 240  # transparent -> white, not black
    big = prepare_bytes(0, jpeg(size=(400, 300)), PrepSettings(quality=70, max_side=100))
    assert big.action == "resized" and Image.open(io.BytesIO(big.data)).size == (100, 75)


def test_sniff_format():
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_format(b"BM......") == "bmp"
    assert sniff_format(b"hello") is None
