"""Where evaluation results go in MLflow: URI and experiment precedence."""

from __future__ import annotations

from unmix.eval.eval_runs import DEFAULT_EXPERIMENT, resolve_experiment, resolve_tracking_uri

URI, EXPERIMENT = "sqlite:///from_meta.db", "pretraining"  # what a backbone.pt records


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, URI) is None  # the backbone's store does not exist: not created
    assert not (tmp_path / "from_meta.db").exists()
    (tmp_path / "from_meta.db").write_bytes(b"SQLite format 3\x00" + bytes(100))  # a local store: used
    assert resolve_tracking_uri(None, URI) == "sqlite:///from_meta.db"
    assert resolve_tracking_uri(None, None) is None  # MLflow's own default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_tracking_uri(None, URI) == "http://server:5000"
    assert resolve_tracking_uri("sqlite:///cli.db", URI) == "sqlite:///cli.db"


def test_experiment_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert resolve_experiment(None, None) == DEFAULT_EXPERIMENT
    assert resolve_experiment(None, EXPERIMENT) == "pretraining"
    assert resolve_experiment("floor", EXPERIMENT) == "floor"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env")
    assert resolve_experiment(None, None) == "env"
