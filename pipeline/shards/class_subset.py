"""A class subset of a data set: ``unmix shards write ... --classes FILE`` (e.g. ImageNet-100).

``FILE`` lists the class names to keep (ImageNet wnids such as ``n01558993``), one a line; blank lines
and lines starting with ``#`` are ignored, so a list can carry its provenance in a header (see
``configs/imagenet100.txt``). A name listed twice is refused naming the file and line; a name that is
not a class of the source (a class directory of the tree, or a label of the list file) naming the class
and the source.

The kept classes are indexed in sorted order, as torchvision's ``ImageFolder`` indexes a tree holding
only them (what CMC and solo-learn train ImageNet-100 on), unless ``--classes-from`` gives the mapping.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from unmix.pipeline.shards.sources import Source, SourceError

#: A class list larger than this is not a class list (ImageNet-21k has ~22k classes).
MAX_CLASS_FILE_BYTES = 4 << 20


def read_class_file(path: str | Path) -> list[str]:
    """The class names listed in ``path`` (file order); raises :class:`SourceError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"class list {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CLASS_FILE_BYTES:
        raise SourceError(f"class list {path}: {size} bytes, more than a class list holds (at most 4 MiB)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"class list {path}: unreadable ({exc})") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if "/" in name or "\\" in name or name in (".", ".."):
            raise SourceError(f"{path}:{n}: {name!r} is not a class name (a directory name, one a line)")
        if name in first_line:
            raise SourceError(f"{path}:{n}: class {name!r} listed twice (first on line {first_line[name]})")
        first_line[name] = n
        names.append(name)
    if not names:
        raise SourceError(f"class list {path} lists no classes")
    return names


def keep_classes(source: Source, keep: list[str], where: str, mapping: list[str] | None = None) -> Source:
    """``source`` with only the images of the ``keep`` classes, relabelled.

    ``where``: the class list's path (for errors). ``mapping``: the class names to index by (from
    ``--classes-from``); default: ``keep`` sorted. Every kept name must be one of ``source.classes``.
    """
    present = set(source.classes)
    absent = [c for c in keep if c not in present]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise SourceError(
            f"{where}: class {absent[0]!r} is not a class of {source.root}{more} "
            f"(its {len(source.classes)} classes: {', '.join(source.classes[:5])}"
            f"{', ...' if len(source.classes) > 5 else ''})"
        )
    classes = sorted(keep) if mapping is None else list(mapping)
    index = {c: i for i, c in enumerate(classes)}
    missing = [c for c in keep if c not in index]
    if missing:
        raise SourceError(f"{where}: class {missing[0]!r} is not in the --classes-from mapping")
    wanted = {source.classes.index(c): index[c] for c in keep}
    items = [replace(it, label=wanted[it.label]) for it in source.items if it.label in wanted]
    if not items:
        raise SourceError(f"{where}: none of the {len(keep)} classes holds an image in {source.root}")
    return Source(source.root, items, classes)
