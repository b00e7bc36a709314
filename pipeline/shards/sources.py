"""Where the images to shard come from: an ImageFolder tree or a ``relative/path,label`` list file.

Class indices follow torchvision's ``ImageFolder``: class names sorted, index = position. With
``classes`` given (``--classes-from``: another shard set's mapping, e.g. the train set's for a val set)
that mapping is used as is and every label must be one of its names.

List files: one ``relative/path,label`` per line (paths relative to the source root; blank lines and
lines starting with ``#`` ignored; the label is the text after the *last* comma). A label is a class
name; with a known mapping an integer that is not a class name is accepted as an index and range-checked.
Without a mapping, if every label is an integer the labels are indices and the classes are named
``"0" .. str(max)``; otherwise the labels are names, sorted into indices.

Symbolic links in a tree: a class directory ``SRC/<class>`` may be a link to anywhere (a subset of a
larger tree made of links, e.g. ImageNet-100), and image files may be links. A directory link *inside* a
class is followed only when it stays within ``SRC`` or that class's directory and leads to a directory
not walked yet: a link back to an ancestor (``loop -> .``), to a directory already walked, or out of the
tree is not followed, and is counted and named (:attr:`Source.links_skipped`). One file reached by two
paths is one image: twice in one class it is kept once (:attr:`Source.aliases`); in two classes it is an
error naming both paths, since an image has one label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class SourceError(ValueError):
    """The input tree or list is unusable; the message names the file, line or class at fault."""


@dataclass(frozen=True)
class SourceItem:
    """One input image: path relative to the source root, absolute path, class index, size in bytes.

    ``data`` holds the file's content for in-memory sources (the built-in samples); ``None`` = read ``path``.
    """

    rel: str
    path: str
    label: int
    size: int
    data: bytes | None = None


@dataclass(frozen=True)
class Source:
    """The sorted input images and the class names (index = position)."""

    root: Path
    items: list[SourceItem]
    classes: list[str]
    links_skipped: list[str] = field(default_factory=list)  # "rel/path (why)": directory links not followed
    aliases: int = 0  # files reached twice in the same class, kept once


def memory_source(name: str, images: list[tuple[str, bytes, int]], classes: list[str]) -> Source:
    """A source held in memory: ``images`` are ``(relative name, encoded bytes, class index)``."""
    if not images:
        raise SourceError(f"in-memory source {name} holds no images")
    items = []
    for rel, data, label in images:
        if not 0 <= label < len(classes):
            raise SourceError(f"{name}/{rel}: label {label} out of range (0..{len(classes) - 1})")
        items.append(SourceItem(rel, f"{name}/{rel}", label, len(data), data))
    items.sort(key=lambda it: it.rel)
    return Source(Path(name), items, list(classes))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _under(path: str, top: str) -> bool:
    """``path`` is ``top`` or inside it (both real, absolute paths)."""
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


class _TreeWalk:
    """The images of an ImageFolder tree, walked link-aware (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self.root_real = os.path.realpath(root)
        self.seen: dict[str, tuple[str, int]] = {}  # real path -> (relative path, label)
        self.skipped: list[str] = []
        self.aliases = 0

    def _skip(self, path: str, why: str) -> None:
        self.skipped.append(f"{os.path.relpath(path, self.root)} ({why})")

    def class_images(self, class_dir: Path, label: int) -> list[SourceItem]:
        top_real = os.path.realpath(class_dir)
        visited = {top_real}
        found: list[SourceItem] = []
        stack = [(str(class_dir), top_real)]
        while stack:
            path, real = stack.pop()
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
            subdirs = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():  # follows a link
                    target = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                    if e.is_symlink():
                        if target in visited or _under(real, target):
                            self._skip(
                                e.path,
                                f"link to {'an enclosing' if _under(real, target) else 'a walked'} "
                                "directory: a loop or an alias",
                            )
                            continue
                        if not (_under(target, self.root_real) or _under(target, top_real)):
                            self._skip(e.path, f"link out of the tree, to {target}")
                            continue
                    visited.add(target)
                    subdirs.append((e.path, target))
                elif _is_image(e.name) and e.is_file():
                    file_real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                    rel = os.path.relpath(e.path, self.root)
                    first = self.seen.get(file_real)
                    if first is not None:
                        if first[1] != label:
                            raise SourceError(
                                f"{self.root / first[0]} and {self.root / rel} are one file ({file_real}) "
                                "in two classes: an image has one label (remove the link)"
                            )
                        self.aliases += 1
                        continue
                    self.seen[file_real] = (rel, label)
                    found.append(SourceItem(rel, e.path, label, os.path.getsize(e.path)))
            stack.extend(reversed(subdirs))
        return found


def scan_tree(root: Path, classes: list[str] | None = None, keep: list[str] | None = None) -> Source:
    """Read an ImageFolder tree ``root/<class>/**/<image>`` (links: see the module docstring).

    ``keep``: only these class directories are read (the others are not walked); a name that is not a
    class directory of ``root`` is refused. Without ``classes`` the kept names, sorted, are the classes.
    """
    if not root.is_dir():
        raise SourceError(f"source {root} is not a directory")
    walk = _TreeWalk(root)
    class_dirs = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if not e.is_dir() or e.name.startswith("."):
            continue
        if e.is_symlink() and _under(walk.root_real, os.path.realpath(e.path)):
            walk._skip(e.path, "link to the tree itself or a directory above it: a loop")
            continue
        class_dirs.append(e.name)
    if not class_dirs:
        raise SourceError(f"source {root} has no class directories (expected {root}/<class>/<image>)")
    if keep is not None:
        class_dirs = _kept_dirs(root, class_dirs, keep)
    if classes is None:
        classes = class_dirs
    index = {c: i for i, c in enumerate(classes)}
    items: list[SourceItem] = []
    for c in class_dirs:
        if c not in index:
            raise SourceError(f"class directory {root / c} is not one of the {len(classes)} known classes")
        found = walk.class_images(root / c, index[c])
        if not found:
            raise SourceError(f"class directory {root / c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        items.extend(found)
    items.sort(key=lambda it: it.rel)
    return Source(root, items, list(classes), walk.skipped, walk.aliases)


def _kept_dirs(root: Path, class_dirs: list[str], keep: list[str]) -> list[str]:
    present = set(class_dirs)
    absent = [c for c in keep if c not in present]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise SourceError(
            f"class {absent[0]!r} to keep is not a class directory of {root}{more} "
            f"({len(class_dirs)} class directories there)"
        )
    wanted = set(keep)
    return [c for c in class_dirs if c in wanted]


def _parse_label(token: str, classes: list[str] | None, index: dict[str, int], where: str) -> int | str:
    if classes is None:
        return token
    if token in index:
        return index[token]
    try:
        i = int(token)
    except ValueError:
        raise SourceError(
            f"{where}: unknown class {token!r} (not among the {len(classes)} classes)"
        ) from None
    if not 0 <= i < len(classes):
        raise SourceError(f"{where}: label {i} out of range (0..{len(classes) - 1})")
    return i


def read_list(root: Path, list_file: Path, classes: list[str] | None = None) -> Source:
    """Read a ``relative/path,label`` list file; paths are relative to ``root``."""
    if not list_file.is_file():
        raise SourceError(f"list file {list_file} does not exist")
    index = {c: i for i, c in enumerate(classes or [])}
    raw: list[tuple[str, str, int | str]] = []
    seen: set[str] = set()
    for n, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_file}:{n}"
        rel, sep, token = line.rpartition(",")
        rel, token = rel.strip(), token.strip()
        if not sep or not rel or not token:
            raise SourceError(f"{where}: expected 'relative/path,label', got {line!r}")
        if rel in seen:
            raise SourceError(f"{where}: {rel} listed twice")
        seen.add(rel)
        p = root / rel
        if not p.is_file():
            raise SourceError(f"{where}: file {p} does not exist")
        raw.append((rel, str(p), _parse_label(token, classes, index, where)))
    if not raw:
        raise SourceError(f"list file {list_file} lists no images")
    if classes is None:
        tokens = [str(lab) for _, _, lab in raw]
        if all(t.lstrip("-").isdigit() for t in tokens):
            ints = [int(t) for t in tokens]
            bad = next((i for i in ints if i < 0), None)
            if bad is not None:
                raise SourceError(f"{list_file}: label {bad} out of range (labels must be >= 0)")
            classes = [str(i) for i in range(max(ints) + 1)]
            labels = ints
        else:
            classes = sorted(set(tokens))
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[t] for t in tokens]
        raw = [(r, p, lab) for (r, p, _), lab in zip(raw, labels, strict=True)]
    items = [SourceItem(r, p, int(lab), os.path.getsize(p)) for r, p, lab in raw]
    items.sort(key=lambda it: it.rel)
    return Source(root, items, list(classes))
