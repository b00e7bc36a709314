"""The docs stay true to the repository: links resolve, named modules and files exist, no bare issue numbers.

Checked text: README.md and docs/*.md whole (outside code fences for links), and the docstrings and
comments of every Python file, the comment lines of the YAML configs, Slurm scripts and the Makefile.

- Every relative link in README.md and docs/*.md resolves to a file or folder of the repository, and a
  ``#anchor`` into a Markdown page names one of its headings (GitHub's slugs).
- Every dotted module path ``unmix.x.y[.name]`` names a module of the repository (and ``name`` one of its
  top-level definitions); a bare ``training.x`` / ``pipeline.x`` / ``eval.x`` (the pre-namespace style) is
  stale wherever it appears (``eval.knn_k``-style config keys excepted).
- Every repository path ``pipeline/x.py``, ``training/...``, ``configs/x.yaml``, ``docs/x.md``, ... exists.
- No "issue N" a reader cannot look up: an issue number must come with its repository
  (``szq0214/Un-Mix issue 4``) or its project (``pytorch issue 163483``).

Rerun after moving a module: ``pytest tests/test_docs.py -q``; each failure lists file:line and the text.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import io
import re
import tokenize
from pathlib import Path

import pytest

from unmix.training.config import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "unmix.pipeline": "pipeline",
    "unmix.training": "training",
    "unmix.eval": "eval",
    "unmix": "unmix",
}
CODE_DIRS = ("pipeline", "training", "eval", "unmix", "slurm", "tests")
PATH_DIRS = ("pipeline", "training", "eval", "unmix", "slurm", "configs", "docs", "tests")
EXTENSIONS = ("py", "md", "yaml", "yml", "sh", "sbatch", "txt", "json", "toml")
# Projects whose issue tracker a reader can find from the name alone.
PROJECTS = ("pytorch", "torch", "dali", "deepspeed", "mlflow", "torchvision", "webdataset", "slurm")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of checked text and where it starts."""

    path: Path
    line: int
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line + self.text.count(chr(10), 0, offset)}"


def python_chunks(path: Path) -> list[Chunk]:
    """The docstrings and comments of one Python file."""
    source = path.read_text(encoding="utf-8")
    chunks = [
        Chunk(path, tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    chunks.append(Chunk(path, first.lineno, first.value.value))
    return chunks


def comment_chunks(path: Path) -> list[Chunk]:
    """The ``#`` comments of a YAML file, shell script or Makefile."""
    chunks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if "#" in line:
            chunks.append(Chunk(path, n, line[line.index("#") :]))
    return chunks


@functools.cache
def all_chunks() -> tuple[Chunk, ...]:
    chunks = [Chunk(p, 1, p.read_text(encoding="utf-8")) for p in markdown_files()]
    for d in CODE_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            if p != Path(__file__).resolve():  # this file's examples are stale on purpose
                chunks += python_chunks(p)
    for p in [
        *sorted((ROOT / "configs").glob("*.yaml")),
        *sorted((ROOT / "slurm").glob("*.s*")),
        ROOT / "Makefile",
    ]:
        if p.suffix != ".py":
            chunks += comment_chunks(p)
    return tuple(chunks)


# ------------------------------------------------------------------------------------------------ links

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _outside_fences(page.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            k = seen.get(slug, 0)
            seen[slug] = k + 1
            out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for n, line in _outside_fences(page.read_text(encoding="utf-8")):
        for m in _LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(root)}:{n}: ({target})"
            if not dest.is_relative_to(root) or not dest.exists():
                problems.append(f"{where}: no such file in the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def test_link_checker_catches_a_missing_file_and_anchor(tmp_path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Some `code` heading\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#some-code-heading) [bad](docs/b.md) [anchor](docs/a.md#nope) "
        "[web](https://x.org/y) [out](../outside.md)\n```\n[fenced](nowhere.md)\n```\n"
    )
    problems = link_problems(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert "docs/b.md" in problems[0] and "#nope" in problems[1] and "outside.md" in problems[2]


# ------------------------------------------------------------------------------- module and file paths


@functools.cache
def top_level_names(path: Path) -> frozenset[str]:
    """Names a module defines, imports or lists in ``__all__`` at its top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in getattr(node, "targets", [])):
                # lazily provided names (a module __getattr__) are listed in __all__
                names |= {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. a guarded import
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
    return frozenset(names)


def lazy_name(module: Path, name: str) -> bool:
    """Whether a module with a module-level ``__getattr__`` (lazy re-exports) provides ``name``: checked by
    importing it, the only way to know what such a module hands out."""
    if "__getattr__" not in top_level_names(module):
        return False
    rel = module.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    if not parts or parts[0] not in PACKAGES.values():
        return False
    dotted = ".".join(["unmix"] + ([] if parts[0] == "unmix" else [parts[0]]) + parts[1:])
    try:
        return hasattr(importlib.import_module(dotted), name)
    except ImportError:
        return False


def resolve_dotted(dotted: str) -> str | None:
    """None if ``unmix.x.y[.name...]`` names a module of the repository (and a top-level name in it),
    else what is missing."""
    parts = dotted.split(".")
    for n in (3, 2, 1):  # the longest package prefix
        prefix = ".".join(parts[:n])
        if prefix in PACKAGES:
            folder, rest = ROOT / PACKAGES[prefix], parts[n:]
            break
    else:
        return f"{dotted}: not a package of the repository"
    module = folder / "__init__.py"
    for i, part in enumerate(rest):
        if (folder / part).is_dir() and (folder / part / "__init__.py").exists():
            folder, module = folder / part, folder / part / "__init__.py"
        elif (folder / f"{part}.py").exists() and module.parent == folder:
            module = folder / f"{part}.py"
            folder = folder / part  # nothing can live below a module file
        elif part in top_level_names(module) or lazy_name(module, part):
            return None  # an attribute; what follows it (a method, a field) is not checked
        else:
            return f"{dotted}: no module or name {'.'.join(parts[: len(parts) - len(rest) + i + 1])}"
    return None


_FROM_IMPORT = re.compile(r"^\s*from (unmix(?:\.\w+)+) import \(?([\w, ]+)", re.MULTILINE)
_DOTTED = re.compile(r"(?<![\w./-])unmix(?:\.[A-Za-z_]\w*)+")
# ``unmix.<key>`` is also the config section (unmix.enabled) and the MLflow tag prefix (unmix.kind): only a
# path whose second part is a package or a module of unmix/ names code.
_CODE_ROOTS = {"pipeline", "training", "eval"} | {p.stem for p in (ROOT / "unmix").glob("*.py")}
_BARE = re.compile(r"(?<![\w./-])(training|pipeline|eval)\.([A-Za-z_]\w*)(?:\.\w+)*")
_PATH = re.compile(rf"(?<![\w./-])(?:{'|'.join(PATH_DIRS)})/[\w./-]*?\.(?:{'|'.join(EXTENSIONS)})\b")
_CONFIG_SECTION_KEYS = {f.name for f in dataclasses.fields(EvalConfig)}


def path_problems(chunks: tuple[Chunk, ...] | list[Chunk]) -> list[str]:
    problems = []
    for c in chunks:
        for m in _DOTTED.finditer(c.text):
            if m.group(0).split(".")[1] not in _CODE_ROOTS:
                continue
            why = resolve_dotted(m.group(0).rstrip("."))
            if why:
                problems.append(f"{c.where(m.start())}: {why}")
        for m in _FROM_IMPORT.finditer(c.text):  # from unmix.x.y import a, b: each name exists there
            if m.group(1).split(".")[1] not in _CODE_ROOTS:
                continue
            for name in filter(None, (part.split(" as ")[0].strip() for part in m.group(2).split(","))):
                why = resolve_dotted(f"{m.group(1)}.{name}")
                if why:
                    problems.append(f"{c.where(m.start())}: from {m.group(1)} import {name}: {why}")
        for m in _BARE.finditer(c.text):
            package, name = m.group(1), m.group(2)
            after = c.text[m.end() : m.end() + 1]
            if (
                after in ("/", "*")
                or name in EXTENSIONS
                or (package == "eval" and name in _CONFIG_SECTION_KEYS)
            ):
                continue
            problems.append(f"{c.where(m.start())}: {m.group(0)}: a module path without unmix. (stale)")
        for m in _PATH.finditer(c.text):
            if not (ROOT / m.group(0)).exists():
                problems.append(f"{c.where(m.start())}: {m.group(0)}: no such file")
    return problems


def test_named_modules_and_files_exist() -> None:
    problems = path_problems(all_chunks())
    assert not problems, "stale module or file paths:\n" + "\n".join(problems)


def test_path_checker_catches_stale_paths() -> None:
    here = Path(__file__)
    bad = [
        Chunk(here, 1, "see :func:`unmix.training.nowhere.f` and ``unmix.training.config.NoSuchThing``"),
        Chunk(here, 2, "# :mod:`training.config` imports it (pipeline.mixing too)"),
        Chunk(here, 3, "# written by pipeline/no_such_module.py and configs/nope.yaml"),
        Chunk(here, 4, "from unmix.pipeline.shards import write_shards, no_such_function"),
    ]
    problems = path_problems(bad)
    assert len(problems) == 7, problems
    assert "import no_such_function" in problems[-1]
    good = [
        Chunk(here, 1, "unmix.training.config.load_config, `unmix.pipeline.mixing`, unmix.cli.main"),
        Chunk(here, 2, "eval.knn_k 200, eval.knn_every_epochs=1; see training.md and docs/training.md"),
        Chunk(here, 3, "training/config.py, configs/demo.yaml, UnMix_MoCo/for_ImageNet/run.sh"),
    ]
    assert path_problems(good) == []


# ----------------------------------------------------------------------------------- issue references

_ISSUE = re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE)
_NAMED = re.compile(rf"([\w.-]+/[\w.-]+|\b(?:{'|'.join(PROJECTS)})\b)[^.;()]{{0,20}}$", re.IGNORECASE)


def issue_problems(chunks: tuple[Chunk, ...] | list[Chunk]) -> list[str]:
    problems = []
    for c in chunks:
        for m in _ISSUE.finditer(c.text):
            before = c.text[max(0, m.start() - 60) : m.start()]
            if not _NAMED.search(before):
                problems.append(f"{c.where(m.start())}: {m.group(0)!r} without its repository")
    return problems


def test_no_issue_numbers_a_reader_cannot_look_up() -> None:
    problems = issue_problems(all_chunks())
    assert not problems, "name the repository, or say what the thing is:\n" + "\n".join(problems)


def test_issue_checker() -> None:
    here = Path(__file__)
    assert (
        len(issue_problems([Chunk(here, 1, "the goals (issue 4)"), Chunk(here, 2, "# see Issue #12")])) == 2
    )
    assert (
        issue_problems(
            [
                Chunk(here, 1, "their rule (szq0214/Un-Mix issue 4)"),
                Chunk(here, 2, "fixed (pytorch issue 163483)"),
            ]
        )
        == []
    )
