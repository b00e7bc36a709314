"""docs/config.md is generated from the config dataclasses, and stays in step with them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from unmix.cli import main
from unmix.training import config_docs
from unmix.training.config import NUMBER_RANGES, Config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def _leaf_keys(obj: object, prefix: str = "") -> list[str]:
    """Every leaf key of a config instance, walked independently of the generator."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_docs_config_md_is_up_to_date() -> None:
    """Fails when a field, default or comment of training/config.py changed without `unmix config-docs`."""
    assert PAGE.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/config.md is out of date: run `unmix config-docs`"
    )


def test_every_key_documented_once_with_its_default() -> None:
    docs = config_docs.field_docs()
    assert [d.key for d in docs] == _leaf_keys(Config())
    by_key = {d.key: d for d in docs}
    # defaults are Config()'s, not the field class's: the trainer's unmix section defaults to off
    assert by_key["unmix.enabled"].default == "false"
    assert by_key["method.moco.T"].default == "null" and by_key["method.moco.T"].type == "float or null"
    assert by_key["data.train"].default == "''" and by_key["data.train"].type == "str or list of str"
    assert by_key["data.device"].type == "gpu, cpu"
    assert by_key["optim.milestones"].default == "[120, 160]"
    assert by_key["deepspeed.config"].default == "{}" and by_key["deepspeed.config"].type == "mapping"
    assert by_key["data.crop"].range == "> 0 and <= 4096"
    assert {d.key for d in docs if d.range} == set(NUMBER_RANGES)
    assert all(d.comment for d in docs)
    text = config_docs.render()
    for d in docs:
        assert text.count(f"| `{d.key}` |") == 1, d.key


@dataclass
class _Toy:
    # first line above
    # second line above
    a: int = 1  # and its own
    b: str = "x"  # only its own

    # a comment separated by a blank line belongs to no field

    c: Literal["p", "q"] = "p"
    d: float | None = None  # comment


@dataclass
class _Undocumented:
    ok: int = 1  # fine
    missing: int = 2


def test_field_comments_join_the_lines_above_and_the_own_line() -> None:
    assert config_docs.field_comments(_Toy) == {
        "a": "first line above second line above and its own",
        "b": "only its own",
        "c": "",
        "d": "comment",
    }


def test_a_key_without_a_comment_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"_Undocumented\.missing: no comment"):
        config_docs.field_docs(_Undocumented())


def test_type_and_yaml_text() -> None:
    assert config_docs.type_text(Literal["a", "b"]) == "a, b"
    assert config_docs.type_text(int | None) == "int or null"
    assert config_docs.type_text(list[str]) == "list of str"
    assert config_docs.yaml_text(None) == "null" and config_docs.yaml_text(True) == "true"
    assert config_docs.yaml_text("") == "''" and config_docs.yaml_text({"k": [1, False]}) == "{k: [1, false]}"


def test_command_writes_then_check_passes_and_fails_when_stale(tmp_path, capsys) -> None:
    page = tmp_path / "config.md"
    assert main(["config-docs", "--check", "--path", str(page)]) == 1  # missing
    assert "does not exist" in capsys.readouterr().err
    assert main(["config-docs", "--path", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == config_docs.render()
    assert main(["config-docs", "--check", "--path", str(page)]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("queue length", "queue size"), encoding="utf-8")
    assert main(["config-docs", "--check", "--path", str(page)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and str(page) in err
    assert "queue size" in page.read_text(encoding="utf-8")  # --check writes nothing


def test_command_cannot_write_exits_2(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["config-docs", "--path", str(blocker / "config.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unmix config-docs: error:") and len(err.strip().splitlines()) == 1


def test_default_path_is_the_checkouts_page_whatever_the_working_directory(tmp_path, monkeypatch) -> None:
    assert config_docs.DEFAULT_PATH == PAGE
    monkeypatch.chdir(tmp_path)
    assert main(["config-docs", "--check"]) == 0  # reads the checkout's docs/config.md, not ./docs
    assert not (tmp_path / "docs").exists()


def test_outside_a_checkout_the_path_must_be_given(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(config_docs, "DEFAULT_PATH", tmp_path / "site-packages" / "docs" / "config.md")
    assert main(["config-docs"]) == 2
    assert "give --path" in capsys.readouterr().err
    assert not (tmp_path / "site-packages").exists()
