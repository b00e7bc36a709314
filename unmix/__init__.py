"""unmix: self-supervised pretraining with Un-Mix mixtures (MoCo v2/v1, BYOL, SimCLR) on DALI and DeepSpeed.

One import namespace for the three packages, whose folders sit at the top of the repository:

- ``unmix.pipeline``: WebDataset shards and the DALI loaders with Un-Mix mixing (usable on its own);
- ``unmix.training``: MoCo v2/v1 and BYOL with the Un-Mix loss under DeepSpeed;
- ``unmix.eval``: linear evaluation, kNN and the MLflow comparison of runs.

``python -m unmix`` (or the ``unmix`` script) is the command line.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unmix")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
