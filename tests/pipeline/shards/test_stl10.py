"""``unmix shards stl10``: STL-10 binary archives (written here in the official byte layout) -> shards."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from unmix.pipeline.shards import read_manifest, verify_shards
from unmix.pipeline.shards.archives import write_archive_shards
from unmix.pipeline.shards.stl10 import ROW, Stl10Error, read_stl10

NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def to_binary(images: np.ndarray) -> bytes:
    """``[N, 96, 96, 3]`` images -> the official bytes, written independently of the reader: per image,
    per channel, column by column (x outer, y inner), as MATLAB's column-major ``X(:)`` of the .mat files."""
    out = bytearray()
    for img in images:
        for c in range(3):
            for x in range(96):
                out += img[:, x, c].tobytes()  # column x, rows top to bottom
    return bytes(out)


@pytest.fixture
def make_stl10(pack_archive):
    return lambda *args, **kwargs: _make_stl10(pack_archive, *args, **kwargs)


def _make_stl10(
    pack,
    root: Path,
    n_train: int = 20,
    n_test: int = 10,
    n_unlabeled: int = 12,
    as_tar: bool = True,
    **damage,
) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray | None]]]:
    """A small STL-10 binary archive; ``damage`` replaces a member's bytes (name -> bytes or None to drop)."""
    rng = np.random.default_rng(0)
    # smooth images (gradients + a little noise) with a distinct structure per axis: a transposed
    # layout would not survive the check
    yy, xx = np.mgrid[0:96, 0:96]
    arrays, members = {}, {"class_names.txt": ("\n".join(NAMES) + "\n").encode()}
    for split, prefix, n in (
        ("train", "train", n_train),
        ("val", "test", n_test),
        ("unlabeled", "unlabeled", n_unlabeled),
    ):
        base = np.stack([yy * 2, xx * 2 + 10, (yy + xx)], axis=-1)[None].repeat(n, 0)
        images = np.clip(base + rng.integers(0, 40, (n, 1, 1, 3)) + rng.integers(0, 4, base.shape), 0, 255)
        images = images.astype(np.uint8)
        members[f"{prefix}_X.bin"] = to_binary(images)
        labels = None
        if split != "unlabeled":
            labels = (np.arange(n) % 10).astype(np.int64)  # 0-based; the file holds 1..10
            members[f"{prefix}_y.bin"] = (labels + 1).astype(np.uint8).tobytes()
        arrays[split] = (images, labels)
    members["fold_indices.txt"] = b"0 1 2\n"
    for name, data in damage.items():
        name = name.replace("__", ".")
        if data is None:
            members.pop(name)
        else:
            members[name] = data
    path = pack(members, root, "stl10_binary.tar.gz", "stl10_binary", "tar.gz" if as_tar else "folder")
    return path, arrays


def test_layout_helper_matches_the_official_reader():
    # the data set's own python reader: np.reshape(x, (-1, 3, 96, 96)); np.transpose(x, (0, 3, 2, 1))
    img = np.random.default_rng(1).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    official = np.frombuffer(to_binary(img), np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    assert np.array_equal(official, img)


@pytest.mark.parametrize("as_tar", [True, False])
def test_splits_read_back_with_pixels_and_labels(tmp_path, as_tar, make_stl10, read_shards):
    path, arrays = make_stl10(tmp_path, as_tar=as_tar)
    out = tmp_path / "out"
    written = write_archive_shards(read_stl10(path), out, samples_per_shard=7, progress=False)
    assert list(written) == ["train", "unlabeled", "val"]  # archive order
    for split, (images, labels) in arrays.items():
        m = read_manifest(out / split)
        assert m.classes == NAMES and m.total == len(images) and m.labeled is (labels is not None)
        got = {int(k): v for k, v in read_shards(out / split, size=(96, 96)).items()}
        assert sorted(got) == list(range(len(images)))  # key = archive row
        decoded = np.stack([got[i][0] for i in range(len(images))]).astype(np.int16)
        err = np.abs(decoded - images.astype(np.int16))
        assert err.mean() < 1.0 and err.max() <= 6  # JPEG q100 4:4:4 rounding only
        if labels is None:
            assert all(got[i][1] is None for i in got)  # no .cls member at all
        else:
            assert [got[i][1] for i in range(len(images))] == labels.tolist()  # 1..10 stored 0-based
        assert verify_shards(out / split) == []


def test_cli_writes_all_three_sets_and_reports_counts(tmp_path, run_shards, make_stl10):
    path, _ = make_stl10(tmp_path)
    status, out, err = run_shards("stl10", path, tmp_path / "o")
    assert status == 0 and "train 20 images" in out and "unlabeled 12 images" in out
    assert "val 10 images" in out and "unlabeled has no labels" in out
    assert "note: train: 20 images" in err  # a subset of the official 5,000 is said
    assert run_shards("stl10", path, tmp_path / "p", "--no-unlabeled")[0] == 0
    assert not (tmp_path / "p" / "unlabeled").exists() and (tmp_path / "p" / "val").is_dir()
    status, _, err = run_shards("stl10", tmp_path / "nothing.tar.gz", tmp_path / "q")
    assert status == 2 and "nothing.tar.gz: no such file" in err


@pytest.mark.parametrize(
    ("damage", "member", "message"),
    [
        ({"train_X__bin": b"\0" * (ROW * 20 - 5)}, "train_X.bin", "not a whole number"),
        ({"train_X__bin": b"\0" * (ROW * 19)}, "train_X.bin", "19 images but"),
        ({"test_y__bin": bytes([1] * 9 + [11])}, "test_y.bin", "label 11 of image 9 out of range"),
        ({"train_y__bin": bytes([0] + [1] * 19)}, "train_y.bin", "label 0 of image 0 out of range"),
        ({"train_y__bin": bytes([1] * 5001)}, "train_y.bin", "more than the official"),
        ({"unlabeled_X__bin": b""}, "unlabeled_X.bin", "holds no image"),
        ({"test_X__bin": None}, "test_X.bin", "missing"),
        ({"class_names__txt": b"a\nb\n"}, "class_names.txt", "2 class names"),
    ],
)
def test_damaged_archives_name_the_member(tmp_path, damage, member, message, make_stl10, run_shards):
    path, _ = make_stl10(tmp_path, **damage)
    with pytest.raises(Stl10Error) as e:
        read_stl10(path)
    assert f"stl10_binary/{member}" in str(e.value) and message in str(e.value)
    status, _, err = run_shards("stl10", path, tmp_path / "o")
    assert status == 2 and f"stl10_binary/{member}" in err and err.count("\n") == 1  # one line


def test_truncated_tar_names_the_member(tmp_path, make_stl10):
    # the tar header declares the full member but the archive ends inside it
    path, _ = make_stl10(tmp_path, as_tar=True)
    plain = tmp_path / "plain.tar"
    with tarfile.open(path) as src, tarfile.open(plain, "w") as dst:
        for info in src.getmembers():
            dst.addfile(info, src.extractfile(info))
    data = plain.read_bytes()
    with tarfile.open(plain) as t:
        x = t.getmember("stl10_binary/unlabeled_X.bin")
    plain.write_bytes(data[: x.offset_data + ROW * 3 + 100])  # 3 whole images, then the archive ends
    with pytest.raises(Stl10Error) as e:
        write_archive_shards(read_stl10(plain), tmp_path / "o", progress=False)
    assert "stl10_binary/unlabeled_X.bin" in str(e.value)
