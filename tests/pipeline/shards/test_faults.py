"""Damaged shard sets and awkward ``shards write`` reruns: what the user is told, and the exit status."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unmix.cli import main
from unmix.pipeline.shards import ShardSetError, ShardWriteError, check_shard_set, write_shards


def _tree(root: Path, per_class: int = 4, png_every: int = 3) -> Path:
    """``root/<class>/img_<i>.{jpg,png}``: every ``png_every``-th image a PNG (re-encoded when written)."""
    rng = np.random.default_rng(0)
    n = 0
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            n += 1
            img = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((32, 24))
            buf = io.BytesIO()
            fmt = "PNG" if n % png_every == 0 else "JPEG"
            img.save(buf, format=fmt)
            (root / c / f"img_{i}.{fmt.lower().replace('jpeg', 'jpg')}").write_bytes(buf.getvalue())
    return root


@pytest.fixture
def shard_set(sample_val: Path, tmp_path: Path) -> Path:
    """A private copy of the digits val shards (4 shards), free to damage."""
    return Path(shutil.copytree(sample_val, tmp_path / "val"))


def test_check_shard_set_names_path_and_fault(shard_set: Path, tmp_path: Path):
    assert check_shard_set(shard_set).total == 359
    with pytest.raises(ShardSetError, match=rf"data.train={tmp_path}/nope: no such directory"):
        check_shard_set(tmp_path / "nope", key="data.train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ShardSetError, match=r"notes.txt: is a file, not a shard directory"):
        check_shard_set(tmp_path / "notes.txt")
    tar = shard_set / "val-000001.tar"
    intact = tar.read_bytes()
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size - 1024)
    with pytest.raises(
        ShardSetError, match=r"val-000001.tar does not match its manifest: .*run `unmix shards verify"
    ):
        check_shard_set(shard_set)
    tar.write_bytes(intact)
    (shard_set / "val-000002.idx").unlink()
    with pytest.raises(ShardSetError, match=r"index .*val-000002.idx of shard val-000002.tar is missing"):
        check_shard_set(shard_set / "manifest.json")
    (shard_set / "manifest.json").write_text("{garbage")
    with pytest.raises(ShardSetError, match=r"cannot read shard manifest .*manifest.json"):
        check_shard_set(shard_set)


def test_info_checks_presence_and_sizes(shard_set: Path, capsys):
    assert main(["shards", "info", str(shard_set)]) == 0
    assert "every tar present" in capsys.readouterr().out
    (shard_set / "val-000003.tar").unlink()
    assert main(["shards", "info", str(shard_set)]) == 1
    err = capsys.readouterr().err
    assert "val-000003.tar is missing" in err and "is damaged: 1 problem(s)" in err and "shards verify" in err


def test_write_into_an_existing_file_is_named(tmp_path: Path, capsys):
    src = _tree(tmp_path / "src")
    (tmp_path / "out").write_text("not a directory")
    assert main(["shards", "write", str(src), str(tmp_path / "out"), "-q"]) == 2  # bad input
    err = capsys.readouterr().err
    assert f"output {tmp_path / 'out'} exists and is not a directory" in err and "Errno" not in err


def test_skip_bad_belongs_to_the_job(tmp_path: Path, capsys):
    src = _tree(tmp_path / "src")
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    m = write_shards(src, out, samples_per_shard=4, skip_bad=True, workers=1, progress=False)
    assert m.skipped == 1
    with pytest.raises(ShardWriteError, match=r"written with --skip-bad, which skipped 1 bad input\(s\) "):
        write_shards(src, out, samples_per_shard=4, workers=1, progress=False)
    assert write_shards(src, out, samples_per_shard=4, skip_bad=True, workers=1) == m
    assert (
        "already complete (8 images in 3 shards, 1 bad input(s) skipped when written)"
        in capsys.readouterr().err
    )
    # a set written without --skip-bad skipped nothing: --skip-bad accepts it as the same job
    clean = _tree(tmp_path / "clean")
    m2 = write_shards(clean, tmp_path / "out2", samples_per_shard=4, workers=1, progress=False)
    assert write_shards(clean, tmp_path / "out2", samples_per_shard=4, skip_bad=True, progress=False) == m2


def test_resume_summary_counts_only_this_runs_work(tmp_path: Path, capsys):
    src = _tree(tmp_path / "src", per_class=6)  # 12 images, 4 PNGs re-encoded
    out = tmp_path / "out"
    m = write_shards(src, out, samples_per_shard=4, workers=1)
    assert sum(v for k, v in m.encoded.items() if k != "copied") == 4
    capsys.readouterr()
    # as after a kill: no manifest, the last shard gone; the finished ones are kept
    (out / "manifest.json").unlink()
    last = m.shards[-1]
    last.path.unlink()
    last.index_path.unlink()
    m2 = write_shards(src, out, samples_per_shard=4, workers=1)
    err = capsys.readouterr().err
    assert m2.encoded == m.encoded  # the manifest describes the whole set
    reenc_last = json.loads((out / ".unmix-done.jsonl").read_text().splitlines()[-1])["actions"]
    n = sum(v for k, v in reenc_last.items() if k != "copied")
    assert n < 4  # else the old summary (all shards counted) would read the same
    assert f"{n} re-encoded" in err and "2 shards (8 images) kept from an earlier run" in err
