"""``unmix shards verify``: check a shard set against its manifest.

Checks, per shard: the tar exists with the manifest's size and sha256; its ``.idx`` exists, has the
manifest's sha256 (when recorded) and equals the index re-derived from the tar (what ``wds2idx`` would
write); every sample has ``.jpg`` and ``.cls`` (only ``.jpg`` in a set whose manifest says
``labeled: false``); ``.cls`` is a class index in range (parsed as strictly as the loaders do:
:mod:`unmix.pipeline.labels`) and within the manifest's ``label_range``; keys are unique across the set; the
sample count matches. Every name in the manifest is a file beside it (``read_manifest`` refuses ``../``
and absolute paths). ``fix=True`` records the index checksums and the label range in a manifest written
before unmix recorded them, once everything else checks out.
Every ``.jpg`` must be a structurally sound JPEG (the writer's check: markers, tables, frame and scan
headers, end-of-image). Then every image is decoded with DALI (``device="cpu"``: CPU decoder,
``device_id=None``; ``device="gpu"``: nvJPEG ``"mixed"`` decoder when CUDA is available, else the CPU
one), in a child process, so that a decoder crash on a damaged file is reported against its key instead
of killing the verifier.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from unmix.pipeline.labels import parse_label
from unmix.pipeline.shards.dali_index import Member, format_index, parse_index, split_name
from unmix.pipeline.shards.jpeg import scan_jpeg, sniff_format
from unmix.pipeline.shards.manifest import (
    MANIFEST,
    Manifest,
    ManifestError,
    Problem,
    ShardInfo,
    read_manifest,
    sha256_file,
    write_manifest,
)
from unmix.pipeline.shards.writer import available_cpus

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
    s: ShardInfo, m: Manifest, seen: dict[str, str], problems: list[Problem], labels: list[int]
) -> list[tuple[str, bytes]]:
    """Structural checks of one shard; returns its (key, jpeg bytes) for decoding; appends its labels."""
    num_classes = m.num_classes
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
    else:
        actual = s.index_path.read_text(errors="replace")
        expected = format_index(members) if members else None
        if expected is not None and actual != expected:
            problems.append(
                Problem(s.name, None, f"index {s.index_path.name} {_index_diff(expected, actual)}")
            )
        elif s.index_sha256 is not None and sha256_file(s.index_path) != s.index_sha256:
            problems.append(
                Problem(s.name, None, f"index {s.index_path.name}: sha256 does not match the manifest")
            )

    if len(order) != s.count:
        problems.append(Problem(s.name, None, f"holds {len(order)} samples, manifest says {s.count}"))
    out = []
    for key in order:
        parts = samples[key]
        if key in seen:
            problems.append(Problem(s.name, key, f"key also used in {seen[key]}"))
        seen[key] = s.name
        for ext in ("jpg", "cls") if m.labeled else ("jpg",):
            if ext not in parts:
                problems.append(Problem(s.name, key, f"no .{ext} member"))
        if "cls" in parts and not m.labeled:
            problems.append(Problem(s.name, key, "a .cls member in a set the manifest says has no labels"))
        elif "cls" in parts:
            try:
                label = parse_label(parts["cls"], num_classes)
            except ValueError as e:
                problems.append(Problem(s.name, key, str(e)))
            else:
                labels.append(label)
                lo, hi = m.label_range or (0, num_classes - 1)
                if not lo <= label <= hi:
                    problems.append(
                        Problem(s.name, key, f"label {label} outside the manifest's label_range {lo}..{hi}")
                    )
        if "jpg" in parts:
            out.append((key, parts["jpg"]))
    return out


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


_READY = "ready"


def _exit_reason(code: int | None) -> str:
    return f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"


class DecoderCrashError(Exception):
    """The decode worker process died while decoding (a native crash in the decoder)."""


def _decode_worker(conn: Connection, gpu: bool, threads: int, batch_size: int) -> None:
    """Child process: decode each list of encoded images it receives; reply None or the error's text.

    One pipeline per batch-size limit (the full batch and 1, for isolating samples); a pipeline that
    failed is rebuilt, since DALI leaves it unusable.
    """
    from nvidia.dali import fn, pipeline_def, types

    def build(n: int):  # -> nvidia.dali.Pipeline
        @pipeline_def(batch_size=n, num_threads=threads, device_id=0 if gpu else None)
        def decode_pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)

        pipe = decode_pipe(prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        pipe.build()
        return pipe

    pipes: dict[int, Any] = {}
    try:
        pipes[batch_size] = build(batch_size)
    except Exception as e:
        conn.send(f"cannot build the decoding pipeline: {e}")
        return
    conn.send(_READY)
    while (blobs := conn.recv()) is not None:
        n = batch_size if len(blobs) > 1 else 1
        try:
            if n not in pipes:
                pipes[n] = build(n)
            pipes[n].feed_input("enc", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
            pipes[n].run()
            conn.send(None)
        except Exception as e:
            pipes.pop(n, None)
            text = str(e).strip()
            conn.send(text.splitlines()[0][:200] if text else type(e).__name__)


class DecodeWorker:
    """DALI decoding in a child process, so that a decoder crash on a malformed image is reported
    (:class:`DecoderCrashError`) instead of killing the verifier. The child is restarted after a crash."""

    def __init__(self, gpu: bool, threads: int, batch_size: int):
        self._args = (gpu, threads, batch_size)
        self._ctx = mp.get_context("spawn")  # DALI and CUDA are not fork-safe
        self._start()

    def _start(self) -> None:
        """Start the child and wait until its pipeline is built; a child that cannot start is an error
        (not a problem of the images)."""
        self.conn, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_decode_worker, args=(child, *self._args), daemon=True)
        self.proc.start()
        child.close()
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=30)
            msg = f"the process exited ({_exit_reason(self.proc.exitcode)})"
        if msg != _READY:
            self.close()
            raise RuntimeError(f"DALI decode worker did not start: {msg}")

    def decode(self, blobs: list[bytes]) -> str | None:
        """Decode ``blobs`` (at most ``batch_size``); None if all decode, else DALI's error message."""
        try:
            self.conn.send(blobs)
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(timeout=30)
            how = _exit_reason(self.proc.exitcode)
            self.conn.close()
            self._start()
            raise DecoderCrashError(f"DALI's decoder process died ({how})") from None

    def close(self) -> None:
        """Stop the child process."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):  # ValueError: the connection is already closed
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


def _decode_error(worker: DecodeWorker, blobs: list[bytes]) -> str | None:
    """None if ``blobs`` decode, else why not (DALI's error, or the worker's crash)."""
    try:
        return worker.decode(blobs)
    except DecoderCrashError as e:
        return str(e)


def _check_decodes(
    worker: DecodeWorker, shard: str, batch: list[tuple[str, bytes]], problems: list[Problem]
) -> None:
    """Decode ``batch``; on failure find and report the samples that do not decode, one at a time."""
    if _decode_error(worker, [b for _, b in batch]) is None:
        return
    for key, blob in batch:
        err = _decode_error(worker, [blob])
        if err is not None:
            problems.append(Problem(shard, key, f"image does not decode with DALI ({err})"))


def _jpeg_ok(shard: str, key: str, data: bytes, problems: list[Problem]) -> bool:
    """The writer's structural JPEG check (markers, tables, headers, end-of-image); False, with the
    problem recorded, when ``data`` fails it. Such files never reach DALI, whose CPU decoder can crash
    on malformed headers."""
    fmt = sniff_format(data[:16])
    if fmt != "jpeg":
        problems.append(Problem(shard, key, f".jpg member holds {fmt or 'unknown'} data, not a JPEG"))
        return False
    info = scan_jpeg(data)
    if isinstance(info, str):
        problems.append(Problem(shard, key, info))
        return False
    return True


def _batches(items: list[tuple[str, bytes]], n: int) -> Iterator[list[tuple[str, bytes]]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def verify_shards(
    path: str | Path, decode: bool = True, device: str = "cpu", fix: bool = False
) -> list[Problem]:
    """Check the shard set at ``path`` (directory or manifest.json); returns every problem found.

    ``decode``: also decode every image with DALI; ``device``: ``"cpu"`` or ``"gpu"`` (GPU decoding when
    CUDA is available, CPU otherwise). ``fix``: when nothing is wrong, record what an older manifest lacks
    (each ``.idx``'s sha256, the label range) in it; the tars' checksums, which it always had, vouch for
    the data the new records describe.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    try:
        m = read_manifest(path)
    except ManifestError as e:
        return [Problem(str(path), None, str(e))]
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    labels: list[int] = []
    gpu = device == "gpu" and _cuda_available()
    decoder = DecodeWorker(gpu, min(8, available_cpus()), DECODE_BATCH) if decode else None
    total = 0
    try:
        for s in m.shards:
            images = _check_shard(s, m, seen, problems, labels)
            total += len(images)
            images = [(k, b) for k, b in images if _jpeg_ok(s.name, k, b, problems)]
            if decoder is not None:
                for batch in _batches(images, DECODE_BATCH):
                    _check_decodes(decoder, s.name, batch, problems)
    finally:
        if decoder is not None:
            decoder.close()
    if total != m.total and not problems:
        problems.append(Problem(MANIFEST, None, f"{total} images in the shards, manifest total {m.total}"))
    if fix and not problems:
        shards = [replace(s, index_sha256=sha256_file(s.index_path)) for s in m.shards]
        label_range = (min(labels), max(labels)) if labels else None  # None: a set without labels
        write_manifest(replace(m, shards=shards, label_range=label_range))
    return problems
