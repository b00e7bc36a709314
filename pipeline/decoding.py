"""How the loaders read and decode JPEGs: the knobs of DALI's reader and nvJPEG ("mixed") decoder.

DALI's own defaults for the mixed decoder (``hw_decoder_load`` 0.65, 16 MB device / 8 MB host memory
padding) are not what DALI's ImageNet training example uses, and they were chosen before GPUs had
several hardware JPEG engines:

- ``hw_decoder_load``: the fraction of each batch sent to the GPU's hardware JPEG decoder (A100: one
  NVJPG engine; H100/H200: seven); the rest is decoded by nvJPEG's hybrid path, whose Huffman stage runs
  on the pipeline's CPU threads. The default 0.9 keeps most of the work off the CPU threads (a Slurm
  task has a handful of cores per GPU, and MoCo v2 + Un-Mix at ResNet-50 trains a few hundred to a
  thousand or so images per second per GPU, which Hopper's seven engines serve with room to spare). Not
  measured yet: ``unmix bench gpu`` reports the data-wait fraction it gives on a node; lower it where the
  engine is the bottleneck. Ignored on GPUs without a hardware decoder and by the CPU decoder.
- ``device_memory_padding`` / ``host_memory_padding``: nvJPEG's buffers grow by at least this much when
  an image does not fit, so a few large images early in an epoch do not cause a reallocation each; the
  values of DALI's ImageNet (ResNet-50) example, 211,025,920 and 140,544,512 bytes.
- ``dont_use_mmap``: the reader ``read()``s the tars instead of memory-mapping them; for network file
  systems (Lustre, GPFS, NFS) where mapping large files is slow or unreliable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# DALI's ImageNet (ResNet-50) training example: nvJPEG buffer growth for the mixed decoder
IMAGENET_DEVICE_PADDING = 211_025_920
IMAGENET_HOST_PADDING = 140_544_512


@dataclass(frozen=True)
class DecoderOptions:
    """Reader and decoder settings of the loaders (``data.hw_decoder_load`` etc. in the training config)."""

    hw_decoder_load: float = 0.9  # share of each batch for the hardware JPEG decoder (mixed only)
    device_memory_padding: int = IMAGENET_DEVICE_PADDING  # bytes (mixed only)
    host_memory_padding: int = IMAGENET_HOST_PADDING  # bytes (mixed only)
    dont_use_mmap: bool = False  # read() the tars instead of mmap (network filesystems)

    def __post_init__(self) -> None:
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        for name in ("device_memory_padding", "host_memory_padding"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def resolve(cls, options: DecoderOptions | Mapping | None) -> DecoderOptions:
        """Accept options, a dict of their fields, or None (the defaults)."""
        if options is None:
            return cls()
        if isinstance(options, DecoderOptions):
            return options
        if isinstance(options, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(options) - names)
            if unknown:
                raise ValueError(f"unknown decoder option(s) {unknown}; valid: {sorted(names)}")
            return cls(**dict(options))
        raise TypeError(
            f"decoder options must be None, a dict or DecoderOptions, got {type(options).__name__}"
        )

    def decoder_args(self, device: str) -> dict[str, Any]:
        """Keyword arguments of ``fn.decoders.image`` for the loaders' ``device`` ("gpu": mixed)."""
        if device != "gpu":
            return {}
        return {
            "hw_decoder_load": float(self.hw_decoder_load),
            "device_memory_padding": int(self.device_memory_padding),
            "host_memory_padding": int(self.host_memory_padding),
        }

    def reader_args(self) -> dict[str, Any]:
        """Keyword arguments of ``fn.readers.webdataset``."""
        return {"dont_use_mmap": bool(self.dont_use_mmap)}
