"""``verify_shards`` / ``unmix shards verify``: a good set passes; each kind of damage is reported with its
shard (and key where there is one)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from unmix.pipeline.shards import read_manifest, verify_shards
from unmix.pipeline.shards.dali_index import index_for_tar
from unmix.pipeline.shards.verify import DecoderCrashError, DecodeWorker


@pytest.fixture
def shard_copy(sample_val: Path, tmp_path: Path) -> Path:
    """A private copy of the digits val set (4 shards) to damage."""
    dst = tmp_path / "val"
    shutil.copytree(sample_val, dst)
    return dst


def rewrite_shard(root: Path, shard: str, mutate) -> None:
    """Rebuild ``shard`` with ``mutate(name, data) -> (name, data) | None`` applied to each member, and
    update its index and manifest entry, so that only what the mutation broke is wrong."""
    tar_path = root / shard
    members = []
    with tarfile.open(tar_path) as t:
        for info in t:
            f = t.extractfile(info)
            assert f is not None
            members.append((info.name, f.read()))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            new = mutate(name, data)
            if new is not None:
                ti = tarfile.TarInfo(new[0])
                ti.size = len(new[1])
                t.addfile(ti, io.BytesIO(new[1]))
    tar_path.with_suffix(".idx").write_text(index_for_tar(tar_path))
    mpath = root / "manifest.json"
    d = json.loads(mpath.read_text())
    for s in d["shards"]:
        if s["name"] == shard:
            s["bytes"] = tar_path.stat().st_size
            s["sha256"] = hashlib.sha256(tar_path.read_bytes()).hexdigest()
            s["index_sha256"] = hashlib.sha256(tar_path.with_suffix(".idx").read_bytes()).hexdigest()
    mpath.write_text(json.dumps(d))


def first_key(root: Path, shard: str) -> str:
    with tarfile.open(root / shard) as t:
        return t.getnames()[0].split(".")[0]


def test_good_set_passes_with_dali_decode(sample_train: Path, sample_val: Path):
    assert verify_shards(sample_train) == []
    assert verify_shards(sample_val / "manifest.json", decode=True, device="gpu") == []  # CPU fallback


def test_truncated_tar(shard_copy: Path):
    m = read_manifest(shard_copy)
    with open(m.shards[1].path, "r+b") as f:
        f.truncate(m.shards[1].bytes // 2)
    problems = verify_shards(shard_copy, decode=False)
    assert {p.shard for p in problems} == {m.shards[1].name}
    text = "\n".join(map(str, problems))
    assert "manifest says" in text and "sha256 does not match" in text
    assert "unreadable tar" in text or "holds" in text


def test_flipped_byte(shard_copy: Path):
    m = read_manifest(shard_copy)
    with open(m.shards[2].path, "r+b") as f:
        f.seek(3000)
        b = f.read(1)
        f.seek(3000)
        f.write(bytes([b[0] ^ 0x55]))
    problems = verify_shards(shard_copy)
    assert [(p.shard, p.key) for p in problems if "sha256" in p.message] == [(m.shards[2].name, None)]
    assert all(p.shard == m.shards[2].name for p in problems)


def test_missing_and_wrong_index(shard_copy: Path):
    m = read_manifest(shard_copy)
    m.shards[0].index_path.unlink()
    idx = m.shards[3].index_path
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    problems = verify_shards(shard_copy, decode=False)
    assert [str(p) for p in problems] == [
        f"{m.shards[0].name}: index {m.shards[0].index_path} is missing",
        f"{m.shards[3].name}: index {idx.name} entry {first_key(shard_copy, m.shards[3].name)}.jpg "
        f"disagrees with the tar ({first_key(shard_copy, m.shards[3].name)}.jpg)",
    ]


def test_missing_tar(shard_copy: Path):
    m = read_manifest(shard_copy)
    m.shards[0].path.unlink()
    assert [str(p) for p in verify_shards(shard_copy)] == [
        f"{m.shards[0].name}: tar {m.shards[0].path} is missing"
    ]


def replace_image(root: Path, shard: str, key: str, damage) -> None:
    rewrite_shard(root, shard, lambda n, d: (n, damage(d)) if n == f"{key}.jpg" else (n, d))


def test_malformed_jpeg_named_by_key(shard_copy: Path):
    """The writer's structural check runs first, with or without decoding: DALI's CPU decoder crashed
    (segfault) on this file when it was handed to it in a batch."""
    name = read_manifest(shard_copy).shards[1].name
    key = first_key(shard_copy, name)
    replace_image(shard_copy, name, key, lambda d: b"\xff\xd8\xff" + b"garbage" * 50)
    expected = [f"{name} [{key}]: corrupt JPEG (invalid marker 0xFF67 at byte 2)"]
    assert [str(p) for p in verify_shards(shard_copy)] == expected
    assert [str(p) for p in verify_shards(shard_copy, decode=False)] == expected


def test_non_jpeg_member_named_by_key(shard_copy: Path):
    name = read_manifest(shard_copy).shards[0].name
    key = first_key(shard_copy, name)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    replace_image(shard_copy, name, key, lambda d: buf.getvalue())
    assert [str(p) for p in verify_shards(shard_copy)] == [
        f"{name} [{key}]: .jpg member holds png data, not a JPEG"
    ]


def test_undecodable_image_named_by_key(shard_copy: Path):
    """Well formed, but the frame uses quantization table 1, which is never defined: only decoding
    finds it."""
    name = read_manifest(shard_copy).shards[1].name
    key = first_key(shard_copy, name)

    def undefine_table_1(d: bytes) -> bytes:
        dqt2 = d.index(b"\xff\xdb", d.index(b"\xff\xdb") + 2)
        assert d[dqt2 + 4] == 1
        return d[: dqt2 + 4] + b"\x00" + d[dqt2 + 5 :]

    replace_image(shard_copy, name, key, undefine_table_1)
    problems = verify_shards(shard_copy)
    assert [(p.shard, p.key) for p in problems] == [(name, key)]
    assert "does not decode with DALI" in problems[0].message
    assert verify_shards(shard_copy, decode=False) == []


def test_decoder_crash_is_reported_and_survived(sample_val: Path):
    """A native crash in the decode worker becomes an error naming the signal; the worker restarts."""
    with tarfile.open(read_manifest(sample_val).shards[0].path) as t:
        f = t.extractfile(t.getnames()[0])
        assert f is not None
        good = f.read()
    worker = DecodeWorker(gpu=False, threads=1, batch_size=4)
    try:
        assert worker.decode([good, good]) is None
        os.kill(worker.proc.pid, signal.SIGSEGV)
        with pytest.raises(DecoderCrashError, match="killed by SIGSEGV"):
            worker.decode([good])
        assert worker.decode([good]) is None
    finally:
        worker.close()
    assert not worker.proc.is_alive()


def test_missing_part_and_bad_labels(shard_copy: Path):
    m = read_manifest(shard_copy)
    name = m.shards[0].name
    with tarfile.open(m.shards[0].path) as t:
        keys = [n.split(".")[0] for n in t.getnames()][::2]

    def mutate(n: str, d: bytes):
        if n == f"{keys[0]}.cls":
            return None  # sample without a label
        if n == f"{keys[1]}.cls":
            return n, b"10"  # 10 classes: 0..9
        if n == f"{keys[2]}.cls":
            return n, b"seven"
        return n, d

    rewrite_shard(shard_copy, name, mutate)
    got = {(p.key, p.message) for p in verify_shards(shard_copy, decode=False)}
    assert got == {
        (keys[0], "no .cls member"),
        (keys[1], "label 10 out of range (0..9)"),
        (keys[2], ".cls is 'seven', not a class index"),
    }


def test_cli_exit_status(sample_val: Path, shard_copy: Path, capsys):
    from unmix.cli import main

    assert main(["shards", "verify", str(sample_val), "--no-decode"]) == 0
    assert "OK, 359 samples in 4 shards" in capsys.readouterr().out
    read_manifest(shard_copy).shards[0].index_path.unlink()
    assert main(["shards", "verify", str(shard_copy)]) == 1
    assert "val-000000.tar: index" in capsys.readouterr().out
    assert main(["shards", "verify", str(shard_copy / "nowhere")]) == 2  # no manifest: bad input


@pytest.mark.gpu
def test_gpu_decode_catches_bad_image(shard_copy: Path):
    name = read_manifest(shard_copy).shards[0].name
    key = first_key(shard_copy, name)
    assert verify_shards(shard_copy, device="gpu") == []
    rewrite_shard(
        shard_copy, name, lambda n, d: (n, b"\xff\xd8\xff" + b"x" * 99) if n == f"{key}.jpg" else (n, d)
    )
    assert [(p.shard, p.key) for p in verify_shards(shard_copy, device="gpu")] == [(name, key)]


def test_decode_worker_that_cannot_start_is_an_error():
    """A child whose pipeline cannot be built is reported once, not as a crash on every image."""
    with pytest.raises(RuntimeError, match="did not start: cannot build the decoding pipeline"):
        DecodeWorker(gpu=False, threads=0, batch_size=2)  # DALI refuses num_threads=0
