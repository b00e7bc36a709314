"""Print what the Slurm scripts need from a pretraining config, resolved exactly as ``unmix train`` will.

    python slurm/resolve_config.py CONFIG.yaml [key=value ...]

prints ``key=value`` lines for data.train, data.val, data.crop, output_dir (absolute, relative paths
taken from the current directory, which is also the job's), mlflow.experiment and mlflow.tracking_uri
(the trainer's default when unset: ``sqlite:///<output_dir's parent>/mlflow.db``) and where that URI
came from. A bad config exits 2 with the trainer's message naming the key.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    # A checkout that is not installed: the packages sit beside slurm/.
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from unmix.training.config import ConfigError, load_config
        from unmix.training.tracking import tracking_uri
    except ImportError as exc:
        print(
            f"cannot import the trainer ({exc}): set UNMIX_VENV or UNMIX_PYTHON to the unmix environment",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except (ConfigError, OSError) as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    values = {
        "data.train": os.path.abspath(cfg.data.train) if cfg.data.train else "",
        "data.val": os.path.abspath(cfg.data.val) if cfg.data.val else "",
        "data.crop": cfg.data.crop,
        "output_dir": os.path.abspath(cfg.output_dir),
        "mlflow.experiment": cfg.mlflow.experiment,
        "mlflow.tracking_uri": tracking_uri(cfg),
        # "default" = the SQLite file beside output_dir, so it moves with output_dir
        "mlflow.tracking_uri_from": "config"
        if cfg.mlflow.tracking_uri
        else "env"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else "default",
    }
    for key, value in values.items():  # one line each: a line break in a value would forge another key
        if any(c in str(value) for c in "\n\r\0"):
            print(
                f"{argv[0]}: {key} {str(value)!r} holds a line break, which the Slurm scripts cannot pass on",
                file=sys.stderr,
            )
            return 2
    for key, value in values.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
