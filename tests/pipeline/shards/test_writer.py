"""``write_shards``: round trip (webdataset and DALI with our .idx), shuffle, classes, lists, resizing,
bad input, resume after a kill, job protection."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unmix.pipeline.shards import (
    ManifestError,
    ShardWriteError,
    read_manifest,
    verify_shards,
    write_shards,
)
from unmix.pipeline.shards.sources import SourceError
from unmix.pipeline.shards.writer import KILL_AFTER_ENV

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------------- helpers


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG", size=(64, 48), mode: str = "RGB") -> bytes:
    """A smooth random image (compresses like a photo, not like noise) encoded as ``fmt``."""
    small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_tree(
    root: Path, classes=("cat", "dog", "fox"), per_class=6, seed=0, png_every=0, size=(64, 48)
) -> Path:
    """``root/<class>/img_<i>.jpg``; every ``png_every``-th image is a real ``.png``."""
    rng = np.random.default_rng(seed)
    n = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n += 1
            if png_every and n % png_every == 0:
                (root / c / f"img_{i:03d}.png").write_bytes(image_bytes(rng, "PNG", size))
            else:
                (root / c / f"img_{i:03d}.jpg").write_bytes(image_bytes(rng, "JPEG", size))
    return root


def source_files(root: Path) -> list[Path]:
    """Image files in the writer's sorted order: a sample's key is its position in this list."""
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: str(p.relative_to(root)))


def read_wds(m) -> list[tuple[str, bytes, int]]:
    """(key, jpg bytes, label) of every sample, in shard order, read with the webdataset package."""
    import webdataset as wds

    ds = wds.WebDataset(m.tar_paths, shardshuffle=False, empty_check=False)
    return [(s["__key__"], s["jpg"], int(s["cls"])) for s in ds]


def read_dali(m, batch_size: int = 4) -> list[tuple[bytes, int]]:
    """(jpg bytes, label) of every sample read with DALI's webdataset reader and our .idx files (CPU)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def p():
        jpg, cls = fn.readers.webdataset(
            paths=m.tar_paths,
            index_paths=m.index_paths,
            ext=["jpg", "cls"],
            name="r",
            missing_component_behavior="error",
        )
        return jpg, cls

    pipe = p()
    pipe.build()
    n = pipe.epoch_size("r")
    assert n == m.total
    out: list[tuple[bytes, int]] = []
    while len(out) < n:
        jpg, cls = pipe.run()
        for i in range(len(jpg)):
            out.append((np.array(jpg.at(i)).tobytes(), int(np.array(cls.at(i)).tobytes().decode())))
    return out[:n]


def shard_hashes(m) -> list[str]:
    return [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in m.shards]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src", png_every=5)


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip_webdataset_and_dali(tree: Path, tmp_path: Path):
    m = write_shards(tree, tmp_path / "out", samples_per_shard=5, workers=2, progress=False)
    files = source_files(tree)
    classes = ["cat", "dog", "fox"]
    assert m.classes == classes and m.num_classes == 3 and m.split == "out"
    assert m.total == len(files) == 18 and [s.count for s in m.shards] == [5, 5, 5, 3]
    assert [s.name for s in m.shards] == [f"out-00000{i}.tar" for i in range(4)]
    assert m == read_manifest(tmp_path / "out") == read_manifest(tmp_path / "out" / "manifest.json")
    assert m.encoded == {"converted": 3, "copied": 15}

    samples = read_wds(m)
    assert sorted(k for k, _, _ in samples) == [f"{i:08d}" for i in range(len(files))]
    for key, jpg, label in samples:
        src = files[int(key)]
        assert label == classes.index(src.parent.name)
        if src.suffix == ".jpg":
            assert jpg == src.read_bytes()  # copied byte for byte
        else:  # PNG: encoded as JPEG, same picture
            assert jpg[:3] == b"\xff\xd8\xff"
            a = np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.float32)
            b = np.asarray(Image.open(src).convert("RGB"), dtype=np.float32)
            assert a.shape == b.shape and np.abs(a - b).mean() < 3.0

    # DALI's own reader with the .idx files we wrote returns the same samples in the same order.
    assert read_dali(m) == [(jpg, label) for _, jpg, label in samples]


def test_index_matches_wds2idx(tree: Path, tmp_path: Path):
    m = write_shards(tree, tmp_path / "out", samples_per_shard=7, workers=1, progress=False)
    wds2idx = Path(sys.executable).with_name("wds2idx")  # a console script of the nvidia-dali wheel
    assert wds2idx.exists(), f"DALI's wds2idx is not installed next to {sys.executable}"
    for s in m.shards:
        ref = tmp_path / (s.name + ".ref.idx")
        subprocess.run([str(wds2idx), str(s.path), str(ref)], check=True, capture_output=True, timeout=60)
        assert s.index_path.read_text() == ref.read_text()


# ------------------------------------------------------------------------------------------- shuffle


def test_shuffle_is_global_and_seeded(tmp_path: Path):
    src = make_tree(tmp_path / "src", per_class=10)
    a = write_shards(src, tmp_path / "a", samples_per_shard=8, seed=3, progress=False)
    b = write_shards(src, tmp_path / "b", samples_per_shard=8, seed=3, workers=2, progress=False)
    c = write_shards(src, tmp_path / "c", samples_per_shard=8, seed=4, progress=False)
    keys_a = [k for k, _, _ in read_wds(a)]
    assert keys_a != sorted(keys_a)  # not source order
    assert len({lab for _, _, lab in read_wds(a)[:8]}) > 1  # the first shard mixes classes
    # the same seed gives byte-identical shards (shard names differ only by split prefix "a"/"b")
    assert shard_hashes(a) != [] and [s.count for s in a.shards] == [s.count for s in b.shards]
    b2 = write_shards(src, tmp_path / "x" / "a", samples_per_shard=8, seed=3, workers=2, progress=False)
    assert shard_hashes(b2) == shard_hashes(a)
    assert [k for k, _, _ in read_wds(b)] == keys_a
    assert [k for k, _, _ in read_wds(c)] != keys_a


def test_shard_bytes_cuts_by_size(tree: Path, tmp_path: Path):
    m = write_shards(tree, tmp_path / "out", shard_bytes=12 * 1024, progress=False)
    assert len(m.shards) > 1 and m.total == 18
    assert all(s.bytes <= 12 * 1024 + 10240 for s in m.shards)  # + tar end-of-archive padding
    assert m.options["shard_bytes"] == 12 * 1024 and m.options["samples_per_shard"] is None


# ------------------------------------------------------------------------------- classes and lists


def test_classes_from_reuses_mapping(tmp_path: Path):
    train = write_shards(make_tree(tmp_path / "tr"), tmp_path / "train", progress=False)
    val_src = make_tree(tmp_path / "va", classes=("dog", "fox"), per_class=2, seed=1)
    val = write_shards(
        val_src, tmp_path / "val", classes_from=tmp_path / "train" / "manifest.json", progress=False
    )
    assert val.classes == train.classes == ["cat", "dog", "fox"]
    labels = {train.classes[lab] for _, _, lab in read_wds(val)}
    assert labels == {"dog", "fox"}
    for key, _, lab in read_wds(val):
        assert source_files(val_src)[int(key)].parent.name == val.classes[lab]

    make_tree(tmp_path / "va", classes=("wolf",), per_class=1)
    with pytest.raises(SourceError, match="wolf"):
        write_shards(val_src, tmp_path / "val2", classes_from=tmp_path / "train", progress=False)
    with pytest.raises(ManifestError, match="nowhere"):
        write_shards(val_src, tmp_path / "val3", classes_from=tmp_path / "nowhere", progress=False)


def test_list_file_names_and_indices(tmp_path: Path):
    src = make_tree(tmp_path / "src", per_class=3)
    train = write_shards(src, tmp_path / "train", progress=False)
    files = source_files(src)
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for i, f in enumerate(files):
        (flat / f"v{i:02d}.JPEG").write_bytes(f.read_bytes())
        lines.append(f"v{i:02d}.JPEG,{f.parent.name}")
    (tmp_path / "names.txt").write_text("# val ground truth\n" + "\n".join(lines) + "\n\n")
    m = write_shards(
        flat,
        tmp_path / "val",
        list_file=tmp_path / "names.txt",
        classes_from=tmp_path / "train",
        progress=False,
    )
    assert m.total == len(files) and m.classes == train.classes
    for key, jpg, lab in read_wds(m):
        assert jpg == files[int(key)].read_bytes() and m.classes[lab] == files[int(key)].parent.name

    # integer labels: indices (checked against the mapping when there is one)
    (tmp_path / "ints.txt").write_text("".join(f"v{i:02d}.JPEG,{i % 3}\n" for i in range(len(files))))
    m2 = write_shards(flat, tmp_path / "ints", list_file=tmp_path / "ints.txt", progress=False)
    assert m2.classes == ["0", "1", "2"]
    assert all(lab == int(k) % 3 for k, _, lab in read_wds(m2))
    # names without a mapping: sorted names
    m3 = write_shards(flat, tmp_path / "n3", list_file=tmp_path / "names.txt", progress=False)
    assert m3.classes == ["cat", "dog", "fox"]

    bad = {
        "v00.JPEG,cat\nmissing.JPEG,dog\n": r"bad\.txt:2: file .*missing\.JPEG does not exist",
        "v00.JPEG,7\n": r"bad\.txt:1: label 7 out of range \(0\.\.2\)",
        "v00.JPEG,zebra\n": r"bad\.txt:1: unknown class 'zebra'",
        "v00.JPEG\n": r"bad\.txt:1: expected 'relative/path,label'",
    }
    for text, err in bad.items():
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(SourceError, match=err):
            write_shards(
                flat,
                tmp_path / "bad",
                list_file=tmp_path / "bad.txt",
                classes_from=tmp_path / "train",
                progress=False,
            )


def test_empty_inputs_are_named(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class directories"):
        write_shards(tmp_path / "empty", tmp_path / "o1", progress=False)
    src = make_tree(tmp_path / "src", per_class=1)
    (src / "ghost").mkdir()
    (src / "ghost" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="ghost holds no images"):
        write_shards(src, tmp_path / "o2", progress=False)
    with pytest.raises(SourceError, match="not a directory"):
        write_shards(tmp_path / "nope", tmp_path / "o3", progress=False)
    with pytest.raises(ValueError, match="must not be inside the source tree"):
        write_shards(src, src / "cat" / "shards", progress=False)


# ------------------------------------------------------------------------------------------ encoding


def test_max_side_reencodes_only_large_images(tmp_path: Path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "big.jpg").write_bytes(image_bytes(rng, size=(64, 48)))
    (src / "a" / "tall.jpg").write_bytes(image_bytes(rng, size=(20, 40)))
    (src / "a" / "small.jpg").write_bytes(small := image_bytes(rng, size=(32, 24)))
    m = write_shards(src, tmp_path / "out", max_side=32, quality=80, progress=False)
    got = {source_files(src)[int(k)].name: jpg for k, jpg, _ in read_wds(m)}
    assert Image.open(io.BytesIO(got["big.jpg"])).size == (32, 24)
    assert Image.open(io.BytesIO(got["tall.jpg"])).size == (16, 32)
    assert got["small.jpg"] == small
    assert m.encoded == {"copied": 1, "resized": 2} and m.options["max_side"] == 32


def test_format_from_content_cmyk_and_disguised_png(tmp_path: Path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "png_in_disguise.JPEG").write_bytes(image_bytes(rng, "PNG"))
    (src / "a" / "cmyk.jpg").write_bytes(image_bytes(rng, "JPEG", mode="CMYK"))
    (src / "a" / "grey.webp").write_bytes(image_bytes(rng, "WEBP", mode="L"))
    m = write_shards(src, tmp_path / "out", progress=False)
    assert m.encoded == {"cmyk": 1, "converted": 2}
    for _, jpg, _ in read_wds(m):
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.mode == "RGB"
    assert verify_shards(tmp_path / "out") == []


def test_corrupt_image_fails_naming_it_or_is_skipped(tmp_path: Path):
    src = make_tree(tmp_path / "src", per_class=4)
    good = (src / "dog" / "img_000.jpg").read_bytes()
    (src / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(
        ShardWriteError, match=r"bad image .*dog/truncated\.jpg: (corrupt or )?truncated JPEG"
    ):
        write_shards(src, tmp_path / "out", samples_per_shard=4, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    (src / "fox" / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ShardWriteError, match=r"fox/garbage\.png: not a readable image \(unknown format\)"):
        write_shards(src, tmp_path / "out", samples_per_shard=4, overwrite=True, progress=False)

    m = write_shards(src, tmp_path / "out", samples_per_shard=4, skip_bad=True, workers=2, progress=False)
    assert m.skipped == 2 and m.skipped_files == ["dog/truncated.jpg", "fox/garbage.png"]
    assert m.total == 12 and read_manifest(tmp_path / "out").skipped == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == 2
    assert verify_shards(tmp_path / "out") == []


# ----------------------------------------------------------------------------- jobs and interruption


def test_other_job_refused_same_job_recognised(tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    m = write_shards(tree, out, samples_per_shard=5, seed=1, progress=False)
    mtime = m.shards[0].path.stat().st_mtime_ns
    assert write_shards(tree, out, samples_per_shard=5, seed=1, progress=False) == m  # nothing rewritten
    assert m.shards[0].path.stat().st_mtime_ns == mtime
    with pytest.raises(ShardWriteError, match="different shard job.*--overwrite"):
        write_shards(tree, out, samples_per_shard=5, seed=2, progress=False)
    m2 = write_shards(tree, out, samples_per_shard=6, seed=2, overwrite=True, progress=False)
    assert len(m2.shards) == 3 and sorted(p.name for p in out.glob("*.tar")) == [s.name for s in m2.shards]
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ShardWriteError, match="not from this job"):
        write_shards(tree, other, progress=False)


def test_killed_write_resumes_to_identical_shards(tmp_path: Path):
    src = make_tree(tmp_path / "src", per_class=8)
    out = tmp_path / "train"
    cmd = [
        sys.executable,
        "-m",
        "unmix.pipeline",
        "shards",
        "write",
        str(src),
        str(out),
        "--samples-per-shard",
        "5",
        "--workers",
        "2",
        "--seed",
        "7",
        "-q",
    ]
    env = {**os.environ, KILL_AFTER_ENV: "12"}  # SIGKILL itself mid-way through the third shard
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert not (out / "manifest.json").exists()
    with pytest.raises(ManifestError, match="unfinished write"):
        read_manifest(out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert (out / "train-000002.tar.partial").exists()
    # damage a finished shard: the resume must notice its checksum and rewrite it
    with open(out / "train-000001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"\x00")

    r = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    m = read_manifest(out)
    assert m.total == 24 and len(m.shards) == 5
    assert not list(out.glob("*.partial"))
    assert verify_shards(out) == []
    ref = write_shards(src, tmp_path / "ref" / "train", samples_per_shard=5, seed=7, progress=False)
    assert shard_hashes(m) == shard_hashes(ref)
    assert [s.index_path.read_bytes() for s in m.shards] == [s.index_path.read_bytes() for s in ref.shards]


def test_read_manifest_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ManifestError, match=str(tmp_path / "manifest.json")):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read shard manifest .*manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "unmix-webdataset", "version": 1}))
    with pytest.raises(ManifestError, match="malformed .*KeyError"):
        read_manifest(tmp_path / "manifest.json")


def test_cli_write_and_info(tree: Path, tmp_path: Path, capsys):
    from unmix.cli import main

    out = tmp_path / "val"
    assert (
        main(
            [
                "shards",
                "write",
                str(tree),
                str(out),
                "--samples-per-shard",
                "10",
                "--shard-bytes",
                "1MB",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "18 images in 2 shards" in err and "0 skipped" in err and "3 re-encoded" in err
    assert read_manifest(out).split == "val"
    assert main(["shards", "info", str(out)]) == 0
    assert "18 samples" in capsys.readouterr().out
    assert main(["shards", "write", str(tmp_path / "missing"), str(tmp_path / "o"), "-q"]) == 2
    assert "missing is not a directory" in capsys.readouterr().err


def test_shard_of_only_bad_images_is_left_out_and_resumable(tmp_path: Path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        (src / "a" / f"good{i}.jpg").write_bytes(image_bytes(rng))
        (src / "a" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    m = write_shards(src, tmp_path / "out", samples_per_shard=1, skip_bad=True, progress=False)
    assert m.total == 4 and m.skipped == 4 and len(m.shards) == 4
    (tmp_path / "out" / "manifest.json").unlink()  # as if interrupted before the manifest
    again = write_shards(src, tmp_path / "out", samples_per_shard=1, skip_bad=True, progress=False)
    assert again == m and verify_shards(tmp_path / "out") == []
