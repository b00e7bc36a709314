"""``unmix shards tiny-imagenet``: a small Tiny ImageNet zip in the real folder layout -> shards."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unmix.pipeline.shards import verify_shards
from unmix.pipeline.shards.archives import write_archive_shards
from unmix.pipeline.shards.tiny_imagenet import TinyImageNetError, read_tiny_imagenet

WNIDS = ["n02124075", "n01443537", "n04067472"]  # wnids.txt order is not sorted
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n04067472": "reel"}


def _jpeg(seed: int, grey: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    (img.convert("L") if grey else img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def make_tiny(pack_archive):
    return lambda *args, **kwargs: _make_tiny(pack_archive, *args, **kwargs)


def _make_tiny(pack, root: Path, per_class: int = 3, val_per_class: int = 2, as_zip: bool = True, edit=None):
    """A Tiny ImageNet archive; returns (path, {split: {member: (jpeg bytes, wnid)}}).

    ``edit(members)`` may change the member dict (relative path -> bytes) before it is written.
    """
    members: dict[str, bytes] = {
        "wnids.txt": ("\n".join(WNIDS) + "\n").encode(),
        "words.txt": "".join(f"{w}\t{n}\n" for w, n in [("n00001740", "entity"), *WORDS.items()]).encode(),
    }
    expect: dict[str, dict[str, tuple[bytes, str]]] = {"train": {}, "val": {}}
    seed = 0
    for w in WNIDS:
        boxes = []
        for i in range(per_class):
            rel = f"train/{w}/images/{w}_{i}.JPEG"
            members[rel] = _jpeg(seed := seed + 1, grey=i == 0)
            expect["train"][rel] = (members[rel], w)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
        members[f"train/{w}/{w}_boxes.txt"] = ("\n".join(boxes) + "\n").encode()
    lines = []
    for j in range(val_per_class * len(WNIDS)):
        w = WNIDS[j % len(WNIDS)]
        rel = f"val/images/val_{j}.JPEG"
        members[rel] = _jpeg(seed := seed + 1)
        expect["val"][rel] = (members[rel], w)
        lines.append(f"val_{j}.JPEG\t{w}\t1\t2\t60\t61")
    members["val/val_annotations.txt"] = ("\n".join(lines) + "\n").encode()
    members["test/images/test_0.JPEG"] = _jpeg(999)
    if edit is not None:
        edit(members)
    path = pack(members, root, "tiny-imagenet-200.zip", "tiny-imagenet-200", "zip" if as_zip else "folder")
    return path, expect


@pytest.mark.parametrize("as_zip", [True, False])
def test_train_and_val_read_back_with_pixels_and_labels(tmp_path, as_zip, make_tiny, read_shards):
    path, expect = make_tiny(tmp_path, as_zip=as_zip)
    written = write_archive_shards(
        read_tiny_imagenet(path), tmp_path / "out", samples_per_shard=4, progress=False
    )
    assert list(written) == ["train", "val"]
    train, val = written["train"], written["val"]
    classes = sorted(WNIDS)  # ImageFolder order on train/
    for m, split in ((train, "train"), (val, "val")):
        assert m.classes == classes and m.class_names == [WORDS[w] for w in classes] and m.labeled
        assert m.total == len(expect[split])
        got = list(read_shards(tmp_path / "out" / split).values())
        want = sorted((data, classes.index(w)) for data, w in expect[split].values())
        assert sorted(got) == want  # every image once, byte for byte (copied), with its class
        assert verify_shards(tmp_path / "out" / split) == []
    # a greyscale original decodes to the same pixels as it had (the decoders give RGB)
    grey = expect["train"][f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"][0]
    assert Image.open(io.BytesIO(grey)).mode == "L" and any(
        g == grey for g, _ in read_shards(tmp_path / "out" / "train").values()
    )


def test_cli(tmp_path, run_shards, make_tiny):
    path, _ = make_tiny(tmp_path)
    status, out, err = run_shards("tiny-imagenet", path, tmp_path / "o")
    assert status == 0 and "train 9 images" in out and "val 6 images" in out and "3 classes" in out
    assert "note: 3 classes (the official Tiny ImageNet has 200)" in err


def _drop(rel):
    return lambda m: m.pop(rel)


def _annotations(fn):
    def edit(m):
        lines = m["val/val_annotations.txt"].decode().splitlines()
        m["val/val_annotations.txt"] = ("\n".join(fn(lines)) + "\n").encode()

    return edit


@pytest.mark.parametrize(
    ("edit", "member", "message"),
    [
        (_annotations(lambda ls: ls[1:]), "val/images/val_0.JPEG", "no line in"),  # missing annotation line
        (_drop("val/images/val_3.JPEG"), "val/images/val_3.JPEG", "listed in"),  # listed but absent
        (
            _annotations(lambda ls: ls + ["val_0.JPEG\tn01443537\t0\t0\t1\t1"]),
            "val/val_annotations.txt:7",
            "twice",
        ),
        (_annotations(lambda ls: ls + ["val_9.JPEG"]), "val/val_annotations.txt:7", "expected"),
        (
            _annotations(lambda ls: [ls[0].replace("n02124075", "n99999999")] + ls[1:]),
            "val/val_annotations.txt:1",
            "n99999999",
        ),
        (
            lambda m: [m.pop(k) for k in list(m) if k.startswith("train/n04067472/images/")],
            "train/n04067472/images",
            "no training image",
        ),
        (lambda m: m.update({"train/n00000001/images/x.JPEG": _jpeg(5)}), "train/n00000001", "no class in"),
        (
            lambda m: m.update({"words.txt": b"n02124075\tEgyptian cat\n"}),
            "words.txt",
            "no line for class n01443537",
        ),
        (lambda m: m.update({"wnids.txt": b"n02124075\nn02124075\n"}), "wnids.txt:2", "listed twice"),
    ],
)
def test_damaged_archives_name_the_member(tmp_path, edit, member, message, make_tiny, run_shards):
    path, _ = make_tiny(tmp_path, edit=edit)
    with pytest.raises(TinyImageNetError) as e:
        read_tiny_imagenet(path)
    assert f"tiny-imagenet-200/{member}" in str(e.value) and message in str(e.value)
    status, _, err = run_shards("tiny-imagenet", path, tmp_path / "o")
    assert status == 2 and f"tiny-imagenet-200/{member}" in err and err.count("\n") == 1  # one line


def test_oversized_member_refused_before_reading(tmp_path, monkeypatch, make_tiny):
    import unmix.pipeline.shards.tiny_imagenet as tiny

    path, _ = make_tiny(tmp_path)
    monkeypatch.setattr(tiny, "MAX_IMAGE_BYTES", 100)  # the declared size is checked, nothing is read
    with pytest.raises(
        TinyImageNetError, match=r"tiny-imagenet-200/train/n\d+/images/n\d+_\d.JPEG: \d+ bytes, more than"
    ):
        write_archive_shards(read_tiny_imagenet(path), tmp_path / "o", progress=False)


def test_corrupt_zip_member_names_it(tmp_path, make_tiny):
    path, _ = make_tiny(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("tiny-imagenet-200/val/images/val_2.JPEG")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 200] ^= 0xFF  # one flipped byte: the CRC check fails on reading
    path.write_bytes(bytes(data))
    with pytest.raises(TinyImageNetError, match="val/images/val_2.JPEG: cannot read"):
        write_archive_shards(read_tiny_imagenet(path), tmp_path / "o", progress=False)


def test_split_total_checked_before_reading(tmp_path, monkeypatch, make_tiny):
    import unmix.pipeline.shards.tiny_imagenet as tiny

    path, _ = make_tiny(tmp_path)
    monkeypatch.setattr(tiny, "MAX_SPLIT_BYTES", 1000)
    with pytest.raises(TinyImageNetError, match=r"tiny-imagenet-200/train: 9 images of .* GB in all"):
        write_archive_shards(read_tiny_imagenet(path), tmp_path / "o", progress=False)
