"""``unmix shards verify``: check a shard set against its manifest.

Checks, per shard: the tar exists with the manifest's size and sha256; its ``.idx`` exists and equals the
index re-derived from the tar (what ``wds2idx`` would write); every sample has ``.jpg`` and ``.cls``;
``.cls`` is an integer class index in range; keys are unique across the set; the sample count matches.
Then every image is decoded with DALI (``device="cpu"``: CPU decoder, ``device_id=None``;
``device="gpu"``: nvJPEG ``"mixed"`` decoder when CUDA is available, else the CPU one).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.dali_index import Member, format_index, parse_index, split_name
from pipeline.shards import (
    MANIFEST,
    ManifestError,
    Problem,
    ShardInfo,
    available_cpus,
    read_manifest,
    sha256_file,
)

DECODE_BATCH = 64


def _index_diff(expected: str, actual: str) -> str:
    try:
        got = parse_index(actual)
    except ValueError as e:
        return f"malformed ({e})"
    want = parse_index(expected)
    if len(got) != len(want):
        return f"lists {len(got)} samples, the tar holds {len(want)}"
    for a, b in zip(got, want, strict=True):
        if a != b:
            return f"entry {a[0].name if a else '?'} disagrees with the tar ({b[0].name if b else '?'})"
    return "differs from the index derived from the tar"


def _check_shard(
    s: ShardInfo, num_classes: int, seen: dict[str, str], problems: list[Problem]
) -> list[tuple[str, bytes]]:
    """Structural checks of one shard; returns its (key, jpeg bytes) for decoding."""
    if not s.path.is_file():
        problems.append(Problem(s.name, None, f"tar {s.path} is missing"))
        return []
    size = s.path.stat().st_size
    if size != s.bytes:
        problems.append(Problem(s.name, None, f"size {size} bytes, manifest says {s.bytes}"))
    if sha256_file(s.path) != s.sha256:
        problems.append(Problem(s.name, None, "sha256 does not match the manifest (corrupted or modified)"))

    members: list[Member] = []
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(s.path, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                f = tar.extractfile(info)
                assert f is not None
                data = f.read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                members.append(Member(info.name, info.offset_data, info.size))
                key, ext = split_name(info.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(
            Problem(s.name, None, f"unreadable tar ({e}); checked {len(order)} samples before it")
        )

    if not s.index_path.is_file():
        problems.append(Problem(s.name, None, f"index {s.index_path} is missing"))
    elif members:
        actual = s.index_path.read_text(errors="replace")
        expected = format_index(members)
        if actual != expected:
            problems.append(
                Problem(s.name, None, f"index {s.index_path.name} {_index_diff(expected, actual)}")
            )

    if len(order) != s.count:
        problems.append(Problem(s.name, None, f"holds {len(order)} samples, manifest says {s.count}"))
    out = []
    for key in order:
        parts = samples[key]
        if key in seen:
            problems.append(Problem(s.name, key, f"key also used in {seen[key]}"))
        seen[key] = s.name
        for ext in ("jpg", "cls"):
            if ext not in parts:
                problems.append(Problem(s.name, key, f"no .{ext} member"))
        if "cls" in parts:
            text = parts["cls"].decode("ascii", errors="replace").strip()
            if not text.lstrip("-").isdigit():
                problems.append(Problem(s.name, key, f".cls is {text!r}, not a class index"))
            elif not 0 <= int(text) < num_classes:
                problems.append(Problem(s.name, key, f"label {text} out of range (0..{num_classes - 1})"))
        if "jpg" in parts:
            out.append((key, parts["jpg"]))
    return out


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class _Decoder:
    """Decodes batches of encoded images with DALI, fed through ``external_source``."""

    def __init__(self, device: str, batch_size: int):
        self.gpu = device == "gpu" and _cuda_available()
        self.threads = min(8, available_cpus())
        self.batch_size = batch_size
        self.pipe = self._build(batch_size)

    def _build(self, batch_size: int):  # -> nvidia.dali.Pipeline
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch_size, num_threads=self.threads, device_id=0 if self.gpu else None)
        def decode_pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(enc, device="mixed" if self.gpu else "cpu", output_type=types.RGB)

        pipe = decode_pipe(prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        pipe.build()
        return pipe

    def _run(self, pipe, blobs: list[bytes]) -> None:
        pipe.feed_input("enc", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        pipe.run()

    def check(self, shard: str, batch: list[tuple[str, bytes]], problems: list[Problem]) -> None:
        """Decode ``batch``; on failure find and report the samples that do not decode."""
        try:
            self._run(self.pipe, [b for _, b in batch])
            return
        except Exception:
            pass
        single = self._build(1)  # a failed run can leave the pipeline unusable: isolate each sample
        for key, blob in batch:
            try:
                self._run(single, [blob])
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                problems.append(Problem(shard, key, f"image does not decode with DALI ({msg[:200]})"))
                single = self._build(1)
        self.pipe = self._build(self.batch_size)


def _batches(items: list[tuple[str, bytes]], n: int) -> Iterator[list[tuple[str, bytes]]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def verify_shards(path: str | Path, decode: bool = True, device: str = "cpu") -> list[Problem]:
    """Check the shard set at ``path`` (directory or manifest.json); returns every problem found.

    ``decode``: also decode every image with DALI; ``device``: ``"cpu"`` or ``"gpu"`` (GPU decoding when
    CUDA is available, CPU otherwise).
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    try:
        m = read_manifest(path)
    except ManifestError as e:
        return [Problem(str(path), None, str(e))]
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    decoder = _Decoder(device, DECODE_BATCH) if decode else None
    total = 0
    for s in m.shards:
        images = _check_shard(s, m.num_classes, seen, problems)
        total += len(images)
        if decoder is not None:
            for batch in _batches(images, DECODE_BATCH):
                decoder.check(s.name, batch, problems)
    if total != m.total and not problems:
        problems.append(Problem(MANIFEST, None, f"{total} images in the shards, manifest total {m.total}"))
    return problems
