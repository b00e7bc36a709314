"""``unmix shards write ... --classes FILE``: a class subset (ImageNet-100) of a tree or a list file."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unmix.cli import main
from unmix.pipeline.shards import write_shards
from unmix.pipeline.shards.class_subset import read_class_file
from unmix.pipeline.shards.sources import SourceError

REPO = Path(__file__).resolve().parents[3]
CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")


def make_tree(root: Path, classes, per_class: int) -> Path:
    """``root/<class>/img_<i>.jpg``: distinct small JPEGs."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
            (root / c / f"img_{i}.jpg").write_bytes(buf.getvalue())
    return root


def read_wds(m) -> list[tuple[str, bytes, int]]:
    import webdataset as wds

    return [(s["__key__"], s["jpg"], int(s["cls"])) for s in wds.WebDataset(m.tar_paths, shardshuffle=False)]


def _class_file(path: Path, names, header: str = "# a header line\n\n") -> Path:
    path.write_text(header + "".join(f"{n}\n" for n in names))
    return path


def _images_by_class(root: Path) -> dict[str, set[bytes]]:
    return {c.name: {p.read_bytes() for p in c.iterdir()} for c in root.iterdir()}


def test_keeps_exactly_the_listed_classes(tmp_path):
    src = make_tree(tmp_path / "src", classes=CLASSES, per_class=4)
    keep = ["n01491361", "n01440764", "n01484850"]  # not sorted: labels follow the sorted order
    m = write_shards(
        src, tmp_path / "out", keep_classes=_class_file(tmp_path / "k.txt", keep), progress=False
    )
    assert m.classes == sorted(keep) and m.total == 12
    assert m.options["classes_file"] == str((tmp_path / "k.txt").resolve())
    by_class = _images_by_class(src)
    got: dict[int, set[bytes]] = {}
    for _, jpg, label in read_wds(m):
        got.setdefault(label, set()).add(jpg)
    assert got == {
        i: by_class[c] for i, c in enumerate(sorted(keep))
    }  # every image of a kept class, no other


def test_refuses_a_class_not_in_the_tree(tmp_path, capsys):
    src = make_tree(tmp_path / "src", classes=CLASSES, per_class=2)
    k = _class_file(tmp_path / "k.txt", ["n01440764", "n09999999"])
    with pytest.raises(SourceError, match="class 'n09999999' to keep is not a class directory of"):
        write_shards(src, tmp_path / "out", keep_classes=k, progress=False)
    assert main(["shards", "write", str(src), str(tmp_path / "o"), "--classes", str(k), "-q"]) == 2
    assert "n09999999" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n01440764\nn01443537\nn01440764\n", r"k.txt:3: class 'n01440764' listed twice \(first on line 1\)"),
        ("# only a comment\n\n", "lists no classes"),
        ("n01440764\n../etc\n", r"k.txt:2: '../etc' is not a class name"),
    ],
)
def test_bad_class_files_are_named(tmp_path, text, message):
    (tmp_path / "k.txt").write_text(text)
    with pytest.raises(SourceError, match=message):
        read_class_file(tmp_path / "k.txt")


def test_list_file_subset_and_classes_from(tmp_path):
    src = make_tree(tmp_path / "src", classes=CLASSES, per_class=3)
    lines = [f"{p.relative_to(src)},{p.parent.name}" for p in sorted(src.rglob("*.jpg"))]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    k = _class_file(tmp_path / "k.txt", ["n01484850", "n01443537"])
    m = write_shards(src, tmp_path / "a", list_file=tmp_path / "list.txt", keep_classes=k, progress=False)
    assert m.classes == ["n01443537", "n01484850"] and m.total == 6
    labels = {(jpg, lab) for _, jpg, lab in read_wds(m)}
    by_class = _images_by_class(src)
    assert labels == {(b, i) for i, c in enumerate(m.classes) for b in by_class[c]}
    # a val set written with the train set's mapping and the same list: same indices
    v = write_shards(src, tmp_path / "v", classes_from=tmp_path / "a", keep_classes=k, progress=False)
    assert v.classes == m.classes and {(j, lab) for _, j, lab in read_wds(v)} == labels
    bad = _class_file(tmp_path / "bad.txt", ["n01484850", "nope"])
    with pytest.raises(SourceError, match="bad.txt: class 'nope' is not a class of"):
        write_shards(src, tmp_path / "b", list_file=tmp_path / "list.txt", keep_classes=bad, progress=False)


def test_shipped_imagenet100_list():
    path = REPO / "configs" / "imagenet100.txt"
    names = read_class_file(path)
    assert len(names) == 100 and len(set(names)) == 100
    assert all(re.fullmatch(r"n\d{8}", n) for n in names)
    header = path.read_text().split("\nn")[0]
    assert "HobbitLong/CMC" in header and re.search(r"\b[0-9a-f]{40}\b", header)  # source and commit cited
    assert names[:3] == ["n02869837", "n01749939", "n02488291"] and names[-1] == "n02090622"  # CMC's order
