"""MLflow tracking, from rank 0 only (many writers on one SQLite store would lock it).

A resumed job reopens the run whose id is stored in the checkpoint, so metric steps continue.
Other ranks get a tracker whose methods do nothing. A tracking URI is written anywhere (MLflow params,
``backbone.pt``) only through :func:`without_credentials`.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from unmix.training.config import Config, flatten, to_dict


def tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<output_dir's parent>/mlflow.db``.

    The default keeps one store for all runs under a common runs directory.
    """
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output_dir).resolve().parent / 'mlflow.db'}"


_SECRET_PARAM = ("pass", "pwd", "token", "secret", "key", "auth", "cred", "sig")


def without_credentials(uri: str | None) -> str | None:
    """``uri`` without a user name, password or secret-looking query parameter (token, key, ...), so it
    can be stored with a run or a backbone file: ``https://u:p@host/x?token=t`` -> ``https://host/x``."""
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in pairs if not _is_secret(k)]
    if "@" not in parts.netloc and len(query) == len(pairs):
        return uri  # nothing to remove (and sqlite:////abs/path stays as written)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


def _is_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_PARAM)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"version.python": platform.python_version()}
    for name in ("torch", "torchvision", "deepspeed", "mlflow", "nvidia-dali-cuda120", "unmix"):
        try:
            out[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    """The commit of the checkout this package runs from ("unknown" outside git); "+dirty" if modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """One MLflow run. ``active`` is False on ranks other than 0 and with ``mlflow.enabled: false``."""

    def __init__(self, cfg: Config, active: bool):
        self.cfg = cfg
        self.active = active and cfg.mlflow.enabled
        self.uri = tracking_uri(cfg)
        self.run_id: str | None = None
        self.logged_until = -1  # metric steps at or below this were logged before a resume

    def start(self, run_id: str | None, world_size: int, extra_params: dict[str, Any]) -> str | None:
        """Start a new run, or reopen ``run_id`` (resume). Logs params and tags on a new run."""
        if not self.active:
            return run_id
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        if run_id is None:
            mlflow.set_experiment(self.cfg.mlflow.experiment)
            run = mlflow.start_run(
                run_name=self.cfg.mlflow.run_name or Path(self.cfg.output_dir).name,
                log_system_metrics=self.cfg.mlflow.system_metrics,
            )
            params = {k: ("" if v is None else v) for k, v in flatten(to_dict(self.cfg)).items()}
            params["mlflow.tracking_uri"] = without_credentials(self.cfg.mlflow.tracking_uri)
            params.update({"world_size": world_size, "git_commit": git_commit(), **library_versions()})
            params.update(extra_params)
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            mlflow.set_tags(
                {
                    "unmix.kind": "pretrain",
                    "method": self.cfg.method.name,
                    "unmix": str(self.cfg.unmix.enabled).lower(),
                }
            )
        else:
            # Params are immutable in MLflow: a resumed run keeps the ones it started with.
            run = mlflow.start_run(run_id=run_id, log_system_metrics=self.cfg.mlflow.system_metrics)
            # After a hard kill the steps between the checkpoint and the kill were already logged; the
            # resumed job recomputes them (identically) but does not log them twice.
            history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
            self.logged_until = max((m.step for m in history), default=-1)
        self.run_id = run.info.run_id
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and step > self.logged_until:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status=status)
