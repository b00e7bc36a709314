"""Where evaluation results go in MLflow: URI and experiment precedence."""

from __future__ import annotations

from unmix.eval.eval_runs import DEFAULT_EXPERIMENT, resolve_experiment, resolve_tracking_uri

META = {"mlflow_tracking_uri": "sqlite:///from_meta.db", "mlflow_experiment": "pretraining"}


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, META) is None  # the backbone's store does not exist: not created
    assert not (tmp_path / "from_meta.db").exists()
    (tmp_path / "from_meta.db").write_bytes(b"SQLite format 3\x00" + bytes(100))  # a local store: used
    assert resolve_tracking_uri(None, META) == "sqlite:///from_meta.db"
    assert resolve_tracking_uri(None, {}) is None  # MLflow's own default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_tracking_uri(None, META) == "http://server:5000"
    assert resolve_tracking_uri("sqlite:///cli.db", META) == "sqlite:///cli.db"


def test_experiment_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert resolve_experiment(None, {}) == DEFAULT_EXPERIMENT
    assert resolve_experiment(None, META) == "pretraining"
    assert resolve_experiment("floor", META) == "floor"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env")
    assert resolve_experiment(None, {}) == "env"
