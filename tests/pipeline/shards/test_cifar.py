"""``unmix shards cifar``: CIFAR-10/100 python archives (written here, in the official format) -> shards."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from unmix.pipeline.shards import read_manifest, verify_shards
from unmix.pipeline.shards.archives import write_archive_shards
from unmix.pipeline.shards.cifar import CIFAR10, CIFAR100, CifarError, Layout, read_cifar


def _dump(obj: dict) -> bytes:
    # Protocol 2 with byte-string keys: what the official (Python 2 cPickle) files hold.
    return pickle.dumps(obj, protocol=2)


@pytest.fixture
def make_archive(pack_archive):
    return lambda *args, **kwargs: _make_archive(pack_archive, *args, **kwargs)


def _make_archive(
    pack, root: Path, layout: Layout, train_per_batch: int, n_test: int, as_tar: bool, seed: int = 0
) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """A CIFAR archive in the official layout with random images; returns (path, split arrays, names)."""
    rng = np.random.default_rng(seed)
    names = [f"class {c}" for c in range(layout.num_classes)]
    labels_key = layout.labels_key.encode()
    members: dict[str, bytes] = {layout.meta: _dump({layout.names_key.encode(): [n.encode() for n in names]})}
    arrays = {}
    for split, batch_names, n in (("train", layout.train, train_per_batch), ("val", layout.test, n_test)):
        datas, labs = [], []
        for i, name in enumerate(batch_names):
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # uniform noise: JPEG's worst case
            lab = (np.arange(n) + i * n) % layout.num_classes  # every class present
            members[name] = _dump({b"batch_label": name.encode(), b"data": data, labels_key: lab.tolist()})
            datas.append(data)
            labs.append(lab)
        data = np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        arrays[split] = (data, np.concatenate(labs))
    name = f"{layout.name.lower()}-python.tar.gz"  # the official file names
    return pack(members, root, name, layout.folder, "tar.gz" if as_tar else "folder"), arrays, names


@pytest.fixture
def check_split(read_shards):
    """``check_split(shard_dir, images, labels, names)``: every archive row is one sample (key = row),
    label equal, pixels within JPEG q100's error."""

    def check(shard_dir: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
        m = read_manifest(shard_dir)
        assert m.classes == names and m.total == len(labels)
        got = {int(k): v for k, v in read_shards(shard_dir, size=(32, 32)).items()}
        assert sorted(got) == list(range(len(labels)))
        decoded = np.stack([got[i][0] for i in range(len(labels))]).astype(np.int16)
        assert [got[i][1] for i in range(len(labels))] == labels.tolist()
        err = np.abs(decoded - images.astype(np.int16))
        # Quality 100, 4:4:4: only colour-conversion and integer-DCT rounding remain (module docstring);
        # measured mean 0.48 and max 4 on noise. A wrong channel order or a transposed image gives ~85.
        assert err.mean() < 1.0 and err.max() <= 6, (err.mean(), err.max())

    return check


@pytest.mark.parametrize("as_tar", [True, False])
def test_cifar10(tmp_path: Path, as_tar: bool, make_archive, check_split):
    path, arrays, names = make_archive(tmp_path, CIFAR10, train_per_batch=12, n_test=20, as_tar=as_tar)
    written = write_archive_shards(read_cifar(path), tmp_path / "out", samples_per_shard=16, progress=False)
    assert list(written) == ["train", "val"]
    train, val = written["train"], written["val"]
    assert (train.split, val.split, train.total, val.total) == ("train", "val", 60, 20)
    assert len(train.shards) == 4 and "CIFAR-10 python archive" in train.source
    for split in ("train", "val"):
        check_split(tmp_path / "out" / split, *arrays[split], names)
    assert verify_shards(tmp_path / "out" / "train", decode=False) == []


@pytest.mark.parametrize("as_tar", [True, False])
def test_cifar100_fine_labels(tmp_path: Path, as_tar: bool, make_archive, check_split):
    path, arrays, names = make_archive(tmp_path, CIFAR100, train_per_batch=110, n_test=30, as_tar=as_tar)
    if not as_tar:
        path = path.parent  # the folder holding cifar-100-python/ works too
    cifar = read_cifar(path)
    assert cifar.layout is CIFAR100 and cifar.classes == names and len(names) == 100
    assert cifar.notes() and "50000" in cifar.notes()[0]  # a subset: said, not refused
    write_archive_shards(cifar, tmp_path / "out", progress=False)
    for split in ("train", "val"):
        check_split(tmp_path / "out" / split, *arrays[split], names)


def test_cli(tmp_path: Path, run_shards, make_archive):
    path, _, _ = make_archive(tmp_path, CIFAR10, train_per_batch=4, n_test=10, as_tar=True)
    status, out, _ = run_shards("cifar", path, tmp_path / "out", "--quality", 90)
    assert status == 0 and "train 20 images" in out and "val 10 images" in out and "10 classes" in out
    assert "quality 90" in read_manifest(tmp_path / "out" / "val").source
    status, _, err = run_shards("cifar", tmp_path / "nothing.tar.gz", tmp_path / "o2")
    assert status == 2 and "nothing.tar.gz: no such file" in err
    status, _, err = run_shards("cifar", path, tmp_path / "o3", "--quality", 0)
    assert status == 2 and "quality must be in 1..100, got 0" in err


def _rewrite(folder: Path, name: str, obj) -> None:
    (folder / name).write_bytes(pickle.dumps(obj, protocol=2))


def test_errors_name_the_member(tmp_path: Path, make_archive):
    folder, arrays, _ = make_archive(tmp_path, CIFAR10, train_per_batch=4, n_test=10, as_tar=False)
    good = (folder / "data_batch_3").read_bytes()

    (folder / "data_batch_3").unlink()
    with pytest.raises(CifarError, match=r"data_batch_3: missing"):
        read_cifar(folder)

    _rewrite(folder, "data_batch_3", {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4})
    with pytest.raises(CifarError, match=r"data_batch_3: 'data' must be a uint8 array \[N, 3072\]"):
        read_cifar(folder)

    _rewrite(folder, "data_batch_3", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]})
    with pytest.raises(CifarError, match=r"data_batch_3: label 10 of row 3 out of range \(0..9\)"):
        read_cifar(folder)

    (folder / "data_batch_3").write_bytes(good[:100])
    with pytest.raises(CifarError, match=r"data_batch_3: cannot unpickle"):
        read_cifar(folder)

    (folder / "data_batch_3").write_bytes(good)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    with pytest.raises(CifarError, match=r"batches.meta: 'label_names' holds duplicate"):
        read_cifar(folder)

    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(CifarError, match="not an extracted CIFAR python archive"):
        read_cifar(tmp_path / "elsewhere")


class _Exploit:
    """A pickle that would create a file when loaded by a plain unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_untrusted_pickle_is_refused(tmp_path: Path, make_archive):
    folder, _, _ = make_archive(tmp_path, CIFAR10, train_per_batch=4, n_test=10, as_tar=False)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(
        CifarError, match=r"test_batch: cannot unpickle .*refusing to load global (posix|os|nt)"
    ):
        read_cifar(folder)
    assert not marker.exists()


def _py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as the official archives are (Python 2 cPickle, protocol 2): byte-string opcodes
    for str, and numpy 1.x's global ``numpy.core.multiarray._reconstruct`` (which Python 3 cannot emit)."""
    import struct

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:  # BININT
        return b"J" + struct.pack("<i", v)

    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"  # dtype('u1', 0, 1)
    dtype += b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"  # BUILD: its state
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
    )
    shape = i(data.shape[0]) + i(data.shape[1]) + b"\x86"
    array += (
        b"(" + i(1) + shape + dtype + b"\x89" + s(data.tobytes()) + b"tb"
    )  # BUILD (1, shape, dtype, F, raw)
    items = s(b"data") + array + s(b"labels") + b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + items + b"u."


def test_python2_pickles_of_the_official_archives(tmp_path: Path, make_archive):
    folder, arrays, _ = make_archive(tmp_path, CIFAR10, train_per_batch=4, n_test=10, as_tar=False)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    labels = list(range(10))
    raw = _py2_pickle(data, labels)
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    (folder / "test_batch").write_bytes(raw)
    images, got = read_cifar(folder).splits["val"]
    assert got.tolist() == labels
    assert np.array_equal(images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert np.array_equal(images[3, 5, 7], data[3, [5 * 32 + 7, 1024 + 5 * 32 + 7, 2048 + 5 * 32 + 7]])
