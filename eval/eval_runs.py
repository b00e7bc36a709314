"""MLflow for evaluations: the eval run (in the pretraining run's experiment) and the metrics written back
onto the pretraining run.

Tags this package writes (and :mod:`unmix.eval.compare` reads):

- eval run: ``unmix.kind`` = ``linear_eval`` | ``knn_eval`` (a pretrained backbone) or ``random_init``
  (an untrained one, with ``random_init`` = ARCH) or ``pixels`` (``unmix linear --pixels``, the pixel
  floor); ``unmix.eval`` = ``linear`` | ``knn``;
  ``unmix.pretrain_run_id`` = the pretraining run's id (absent for random-init / bare state dicts);
  ``model.arch`` param; metrics ``linear_top1``/``linear_top5`` or ``knn_top1``/``knn_top5``; per-epoch
  ``train_loss``, ``val_top1``, ``val_top5``, ``lr`` (linear).
- pretraining run: ``linear_top1``, ``linear_top5`` or ``knn_top1``, ``knn_top5`` (logged with
  ``MlflowClient.log_metric``, which works on FINISHED runs too).

Where the eval logs: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the backbone's own store, the last
only when it is a local store that exists (a received ``backbone.pt`` must not choose where a database
is created, nor send anything to a server); otherwise MLflow's default, said in one line.
``unmix compare`` only reads: :func:`existing_store` refuses a path that is no store.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from unmix.training.tracking import without_credentials

DEFAULT_EXPERIMENT = "unmix"


SQLITE_MAGIC = b"SQLite format 3\x00"


def local_store_path(uri: str) -> tuple[str, Path] | None:
    """``("sqlite", db file)`` or ``("file", directory)`` for a local MLflow store URI; None for any other
    (a server, a database server)."""
    if uri.startswith("sqlite:///"):
        return "sqlite", Path(unquote(uri[len("sqlite:///") :]))
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return "file", Path(unquote(parts.path))
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (a Windows drive letter parses as a scheme)
        return "file", Path(uri)
    return None


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def backbone_store(uri: Any) -> tuple[str | None, str]:
    """The backbone file's tracking URI if it is a local store that exists (else None), and why not."""
    if not isinstance(uri, str) or not uri:
        return None, "none recorded"
    local = local_store_path(uri)
    if local is None:
        return None, "not a local store (a received file does not decide where results are sent)"
    kind, path = local
    if kind == "sqlite" and not (path.is_file() and _is_sqlite(path)):
        return None, f"no SQLite database at {path}"
    if kind == "file" and not path.is_dir():
        return None, f"no store directory at {path}"
    if not os.access(path, os.R_OK | os.W_OK):
        return None, f"{path} is not readable and writable by this user"
    return uri, ""


def resolve_tracking_uri(cli_uri: str | None, recorded: str | None, announce: bool = False) -> str | None:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the backbone's tracking URI (``recorded``) > default.

    The backbone's URI is used only when it names a local store that exists (:func:`backbone_store`);
    otherwise MLflow's default, with one line on stderr when ``announce``.
    """
    if cli_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cli_uri or os.environ["MLFLOW_TRACKING_URI"]
    uri, why = backbone_store(recorded)
    if uri is None and recorded and announce:
        print(
            f"note: not logging to the backbone's tracking store {without_credentials(str(recorded))!r}: "
            f"{why}; using MLflow's default (choose one with --tracking-uri or MLFLOW_TRACKING_URI)",
            file=sys.stderr,
        )
    return uri


def existing_store(uri: str | None) -> str:
    """The tracking URI ``unmix compare`` reads (``uri``, else MLflow's default), checked to name an
    existing store, so that reading never creates one; ValueError naming the path otherwise."""
    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    local = local_store_path(uri)
    if local is None:
        return uri
    kind, path = local
    if kind == "sqlite":
        if not path.exists():
            raise ValueError(f"tracking store {uri}: no such database {path} (nothing was created)")
        if not (path.is_file() and _is_sqlite(path)):
            raise ValueError(f"tracking store {uri}: {path} is not an SQLite database")
        return uri
    if path.is_file():
        hint = f"; for an SQLite store give sqlite:///{path.resolve()}" if _is_sqlite(path) else ""
        raise ValueError(f"tracking store {uri}: {path} is a file, not a store directory{hint}")
    if not path.is_dir():
        raise ValueError(f"tracking store {uri}: no such directory {path} (nothing was created)")
    return uri


def resolve_experiment(cli_experiment: str | None, recorded: str | None) -> str:
    """``--experiment`` > the backbone's ``mlflow_experiment`` > ``MLFLOW_EXPERIMENT_NAME`` > ``unmix``."""
    return cli_experiment or recorded or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


class EvalTracker:
    """One MLflow eval run (rank 0 only); a no-op when ``enabled`` is False."""

    def __init__(
        self,
        enabled: bool,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        pretrain_run_id: str | None,
    ) -> None:
        self.enabled = enabled
        self.pretrain_run_id = pretrain_run_id
        self.run_id: str | None = None
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp_id = None
        if pretrain_run_id:
            # the eval run goes into the pretraining run's experiment, whatever its name
            try:
                exp_id = self.client.get_run(pretrain_run_id).info.experiment_id
            except Exception as exc:
                print(
                    f"warning: pretraining run {pretrain_run_id} not found in tracking store "
                    f"{self.client.tracking_uri} ({type(exc).__name__}); logging to experiment "
                    f"{experiment!r} "
                    "and not onto the pretraining run",
                    file=sys.stderr,
                )
                self.pretrain_run_id = None
        if exp_id is None:
            exp_id = self._experiment_id(experiment)
        run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created concurrently by another job
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics on the eval run."""
        if self.enabled:
            for key, value in metrics.items():
                self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_on_pretrain_run(self, metrics: Mapping[str, float]) -> None:
        """Log final metrics on the pretraining run itself (its status is left unchanged)."""
        if self.enabled and self.pretrain_run_id:
            for key, value in metrics.items():
                self.client.log_metric(self.pretrain_run_id, key, float(value))

    def finish(self, status: str = "FINISHED") -> None:
        """End the eval run with ``status`` (FINISHED or FAILED)."""
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
