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


def test_building_the_parser_imports_no_heavy_dependency() -> None:
    """`unmix --help` stays fast: every handler imports torch, DALI, DeepSpeed, MLflow when it runs."""
    import subprocess
    import sys

    heavy = ("torch", "numpy", "nvidia.dali", "deepspeed", "mlflow", "sklearn", "matplotlib")
    code = (
        "import sys\nfrom unmix.cli import build_parser\nbuild_parser()\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_each_package_registers_its_commands() -> None:
    """One `cli.py` per package; `unmix.cli` assembles them and adds `demo`."""
    import argparse

    import unmix.eval.cli as eval_cli
    import unmix.pipeline.cli as pipeline_cli
    import unmix.training.cli as training_cli
    from unmix.cli import build_parser

    def commands(register) -> list[str]:
        sub = argparse.ArgumentParser().add_subparsers()
        register(sub)
        return sorted(sub.choices)

    assert commands(training_cli.register) == ["config-docs", "train"]
    assert commands(eval_cli.register) == ["compare", "knn", "linear"]
    assert commands(training_cli.register_bench) == ["gpu", "train"]
    assert commands(eval_cli.register_bench) == ["fidelity", "learning", "probe"]
    top = build_parser()._subparsers._group_actions[0].choices
    bench = top["bench"]._subparsers._group_actions[0].choices
    own = {"train", "config-docs", "compare", "knn", "linear", "demo", "bench"}
    assert own <= set(top) and set(top) - own == set(commands(pipeline_cli.register))
    ours = {"gpu", "train", "probe", "fidelity", "learning"}
    assert ours <= set(bench) and set(bench) - ours == set(commands(pipeline_cli.register_bench))


def test_demo_command_passes_its_options_to_run_demo(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from unmix import cli, demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda workdir, **kw: calls.append((workdir, kw)))
    argv = ["demo", "--workdir", str(tmp_path), "--device", "cpu", "--linear-epochs", "4", "--seeds", "3"]
    assert cli.main([*argv, "optim.epochs=1", "model.width=16"]) == 0
    assert calls == [
        (
            tmp_path,
            {
                "device": "cpu",
                "overrides": ["optim.epochs=1", "model.width=16"],
                "linear_epochs": 4,
                "seeds": 3,
            },
        )
    ]
    monkeypatch.setattr(demo, "default_device", lambda: "gpu")
    assert cli.main(["demo", "--workdir", str(tmp_path)]) == 0
    assert calls[-1] == (tmp_path, {"device": "gpu", "overrides": [], "linear_epochs": None, "seeds": 2})
