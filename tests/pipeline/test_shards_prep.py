"""Per-image preparation (format sniffing, cheap JPEG validation, re-encode) and the raw tar writer."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from unmix.pipeline.dali_index import Member, format_index, parse_index
from unmix.pipeline.image_prep import PrepSettings, prepare_bytes, scan_jpeg, sniff_format
from unmix.pipeline.shards import _tar_header


def jpeg(size=(96, 64), mode="RGB", **save) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


S = PrepSettings()


def test_tar_header_matches_tarfile():
    for name, size in [("00000001.jpg", 123_456), ("00000001.cls", 1), ("x" * 100, 0), ("k.jpg", 8**11 - 1)]:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
        assert _tar_header(name, size) == ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="too long"):
        _tar_header("y" * 101, 1)


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


def test_index_format_round_trip():
    members = [Member("000.jpg", 512, 10), Member("000.cls", 1536, 1), Member("001.jpg", 2560, 700)]
    text = format_index(members)
    assert text == "v1.2 2\njpg 512 10 000.jpg cls 1536 1 000.cls\njpg 2560 700 001.jpg\n"
    assert parse_index(text) == [members[:2], members[2:]]
    with pytest.raises(ValueError, match="header says 3"):
        parse_index(text.replace("v1.2 2", "v1.2 3"))


def test_parse_size():
    import argparse

    from unmix.pipeline.shards_cli import parse_size

    assert parse_size("500MB") == 500_000_000 and parse_size("1G") == 10**9 and parse_size("256MiB") == 2**28
    assert parse_size("1.5k") == 1500 and parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="bad size 'lots'"):
        parse_size("lots")
