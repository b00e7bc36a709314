"""The method registry is the only place that knows method names: nothing else compares ``method.name``
(or a variable holding it) to a literal name, and every registered method implements the interface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from unmix.training import methods

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("training", "eval", "pipeline", "slurm", "unmix")
REGISTRY = ROOT / "training" / "methods.py"


def _names_in(node: ast.AST) -> set[str]:
    """Registered method names that appear as string constants in ``node`` (a literal or a collection)."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in methods.METHODS:
            found.add(sub.value)
    return found


def _mentions_method(node: ast.AST) -> bool:
    return "method" in ast.unparse(node).lower()


def name_switches(source: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each comparison between an expression mentioning a method and a method-name
    literal (``cfg.method.name == "byol"``, ``method in ("moco_v1", "moco_v2")``), and of each ``match``
    on such an expression with a method-name case."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literal = [s for s in sides if _names_in(s) and not _mentions_method(s)]
            other = [s for s in sides if _mentions_method(s)]
            if literal and other:
                out.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Match) and _mentions_method(node.subject):
            if any(_names_in(case.pattern) for case in node.cases):
                out.append((node.lineno, f"match {ast.unparse(node.subject)}"))
    return sorted(out)


def test_the_scanner_finds_the_switches_it_is_meant_to_find():
    bad = """
if cfg.method.name == "byol":
    pass
x = method == "simclr"
y = self.cfg.method.name in ("moco_v1", "moco_v2")
match cfg.method.name:
    case "byol":
        pass
"""
    assert [line for line, _ in name_switches(bad)] == [2, 4, 5, 6]
    fine = """
if name == "byol":  # a linear-probe protocol name, not a method
    pass
spec = methods.spec(cfg.method.name)
for method in ("moco_v2", "byol"):
    pass
"""
    assert name_switches(fine) == []


def test_no_module_outside_the_registry_switches_on_the_method_name():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == REGISTRY:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{line}: {code}" for line, code in name_switches(path.read_text())
            ]
    assert not found, "method-name switches outside training/methods.py:\n" + "\n".join(found)


@pytest.mark.parametrize("name", methods.names())
def test_every_registered_method_implements_the_interface(name):
    from unmix.training.backbones import build_backbone
    from unmix.training.config import load_config

    spec = methods.spec(name)
    module = spec.load()
    assert callable(module.build)
    cfg = load_config(None, [f"method.name={name}", "model.arch=resnet10", "model.width=8", "data.crop=16"])
    assert cfg.data.recipe == spec.recipe  # the method's own augmentation unless the config names one
    online, method = methods.build(cfg, build_backbone("resnet10", crop=16, width=8), 2, 4, "cpu")
    members = [m for m in methods.Method.__dict__ if not m.startswith("_")]
    for member in members:
        assert hasattr(method, member), f"{name}: no {member}"
    assert isinstance(method.state_dict(), dict)


def test_unknown_method_names_the_choices():
    from unmix.training.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match="method.name: invalid value 'swav'; allowed: moco_v2, moco_v1, byol, simclr"
    ):
        load_config(None, ["method.name=swav"])
