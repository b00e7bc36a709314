"""The `unmix` dispatcher."""

from __future__ import annotations

import pytest


def test_cli_takes_deepspeed_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `deepspeed` launcher appends --local_rank=N; `unmix` turns it into LOCAL_RANK."""
    import os

    from unmix import cli

    seen = {}
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(cli, "build_parser", lambda: _Recorder(seen))
    assert cli.main(["train", "cfg.yaml", "--local_rank=3"]) == 0
    assert seen["argv"] == ["train", "cfg.yaml"] and os.environ["LOCAL_RANK"] == "3"


class _Recorder:
    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def parse_args(self, argv: list[str]):
        self.seen["argv"] = argv
        return type("Args", (), {"func": staticmethod(lambda args: 0)})()
