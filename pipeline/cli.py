"""The pipeline package's subcommands: ``unmix shards write|verify|info|sample|cifar|stl10|tiny-imagenet``
and ``unmix bench shards|pipeline``; also ``python -m unmix.pipeline ...`` on its own.

Every subcommand of the package is registered here; the work is done by the modules the handlers call
(:mod:`unmix.pipeline.shards`, :mod:`unmix.pipeline.bench_pipeline`), imported inside each handler so
that ``unmix --help`` loads neither DALI nor PIL.

Exit status: 0 done, 1 a shard set with problems (``verify``, ``info``), 2 bad input (a refused OUT, an
unreadable image without ``--skip-bad``, a malformed manifest or archive): one line naming the file.
Text that comes from a shard set (manifest strings, member names) is printed with control characters
escaped (:func:`printable`), so a crafted manifest cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from collections.abc import Callable
from typing import Any

from unmix.pipeline import bench_pipeline

#: ``unmix shards sample`` choices: :data:`unmix.pipeline.shards.sample.SAMPLES` (not imported: the parser
#: loads no numpy or PIL; a test keeps the two equal).
SAMPLE_NAMES = ("digits", "shifted-digits", "photos")

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_size(text: str) -> int:
    """``"500MB"``, ``"1G"``, ``"256MiB"``, ``"1000000"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?)B?\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 500MB, 1G, 256MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def printable(text: object) -> str:
    """``text`` with control and format characters (terminal escapes, bidi overrides) written as
    ``\\xNN`` / ``\\uNNNN``, so that it prints as the characters it holds."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(
        ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else ascii(ch)[1:-1] for ch in text
    )


def _error(command: str, exc: BaseException) -> int:
    """The one-line error of a refused input; exit status 2."""
    print(f"unmix shards {command}: error: {printable(exc)}", file=sys.stderr)
    return 2


def _write(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards import ManifestError, ShardWriteError, SourceError, write_shards

    try:
        write_shards(
            args.src,
            args.out,
            list_file=args.list,
            classes_from=args.classes_from,
            split=args.split,
            samples_per_shard=args.samples_per_shard,
            shard_bytes=args.shard_bytes,
            seed=args.seed,
            quality=args.quality,
            max_side=args.max_side,
            workers=args.workers,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            progress=not args.quiet,
            keep_classes=args.classes,
        )
    except (SourceError, ShardWriteError, ManifestError, ValueError, OSError) as e:
        return _error("write", e)
    except KeyboardInterrupt:
        print(
            "\nunmix shards write: interrupted; finished shards are kept, "
            "run the same command again to finish the job",
            file=sys.stderr,
        )
        return 130
    return 0


def _verify(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards import ManifestError, legacy_notice, read_manifest, verify_shards

    try:
        m = read_manifest(args.dir)
    except ManifestError as e:
        return _error("verify", e)
    problems = verify_shards(args.dir, decode=not args.no_decode, device=args.device, fix=args.fix)
    for p in problems:
        print(printable(p))
    if problems:
        print(f"{printable(args.dir)}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    what = "checksums, indices, labels" + ("" if args.no_decode else " and decoding")
    fixed = ""
    if args.fix and legacy_notice(m):
        fixed = "; index checksums and label range recorded in the manifest"
    print(f"{printable(args.dir)}: OK, {m.total} samples in {len(m.shards)} shards ({what} checked{fixed})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards.sample import write_sample

    train, val = write_sample(
        args.name,
        args.out,
        seed=args.seed,
        n_images=args.images,
        n_classes=args.classes,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        f"{args.out}: sample {args.name!r}: train {train.total} images ({len(train.shards)} shards), "
        f"val {val.total} images ({len(val.shards)} shards), {train.num_classes} classes"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards import ManifestError, legacy_notice, read_manifest, shard_set_problems

    try:
        m = read_manifest(args.dir)
    except ManifestError as e:
        return _error("info", e)
    root = printable(m.root)
    labels = f", labels {m.label_range[0]}..{m.label_range[1]}" if m.label_range else ""
    print(
        printable(
            f"{m.root}: split {m.split}, {m.total} samples, {m.num_classes} classes, {len(m.shards)} shards, "
            f"{m.bytes / 1e6:.1f} MB, seed {m.seed}, {m.skipped} skipped, encoded {m.encoded}{labels}"
        )
    )
    print(f"source: {printable(m.source)}")
    if not m.labeled:
        print("labels: none (the manifest says labeled: false): pretraining only")
    problems = shard_set_problems(m)  # presence, sizes, index checksums; tar checksums: `shards verify`
    for p in problems:
        print(f"unmix shards info: {printable(p)}", file=sys.stderr)
    if problems:
        print(
            f"unmix shards info: error: {root} is damaged: {len(problems)} problem(s) "
            f"(run `unmix shards verify {root}` for a full check)",
            file=sys.stderr,
        )
        return 1
    notice = legacy_notice(m)
    if notice:
        print(f"unmix shards info: {printable(notice)}", file=sys.stderr)
    what = "every index present" + ("" if notice else " with its sha256")
    print(f"files: every tar present with its manifest size, {what} (tar checksums: `shards verify`)")
    return 0


def _archive_command(cmd: str, args: argparse.Namespace, read: Callable[[], Any], errors: tuple) -> int:
    """One archive reader's command (``cifar``, ``stl10``, ``tiny-imagenet``): read, write the splits,
    print the reader's notes and one summary line; a fault is one line and exit 2."""
    from unmix.pipeline.shards import ManifestError, ShardWriteError, SourceError
    from unmix.pipeline.shards.archives import write_archive_shards

    try:
        archive = read()
        written = write_archive_shards(
            archive,
            args.out,
            quality=args.quality,
            samples_per_shard=args.samples_per_shard,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (*errors, SourceError, ShardWriteError, ManifestError, ValueError, OSError) as e:
        return _error(cmd, e)
    for note in archive.notes():
        print(f"unmix shards {cmd}: note: {note}", file=sys.stderr)
    print(
        f"{args.out}: "
        + ", ".join(f"{k} {m.total} images ({len(m.shards)} shards)" for k, m in written.items())
        + f", {written['train'].num_classes} classes"
        + ("; unlabeled has no labels (pretraining only)" if "unlabeled" in written else "")
    )
    return 0


def _cifar(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards.cifar import CifarError, read_cifar

    return _archive_command("cifar", args, lambda: read_cifar(args.archive), (CifarError,))


def _stl10(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards.stl10 import Stl10Error, read_stl10

    splits = ("train", "val") if args.no_unlabeled else ("train", "unlabeled", "val")
    return _archive_command("stl10", args, lambda: read_stl10(args.archive, splits), (Stl10Error,))


def _tiny_imagenet(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards.tiny_imagenet import TinyImageNetError, read_tiny_imagenet

    return _archive_command(
        "tiny-imagenet", args, lambda: read_tiny_imagenet(args.archive), (TinyImageNetError,)
    )


def _archive_parser(
    ss: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str,
    archive: str,
    out: str,
    quality: str,
) -> argparse.ArgumentParser:
    """``shards <name> ARCHIVE OUT`` with the options every archive reader takes; ``quality``: the help
    of ``--quality``, whose default is the reader's own (:attr:`default_quality`)."""
    p = ss.add_parser(name, help=help, description=description)
    p.add_argument("archive", help=archive)
    p.add_argument("out", help=out)
    p.add_argument("--quality", type=int, help=quality)
    p.add_argument("--samples-per-shard", type=int, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="global shuffle seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different job's shards in OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return p


def _register_archives(ss: argparse._SubParsersAction) -> None:
    """``shards cifar``, ``shards stl10`` and ``shards tiny-imagenet``."""
    _archive_parser(
        ss,
        "cifar",
        help="write CIFAR-10/100 (the python archive) as OUT/train and OUT/val",
        description="Read cifar-10-python.tar.gz / cifar-100-python.tar.gz (or the extracted "
        "cifar-10-batches-py / cifar-100-python folder) and write OUT/train (training batches) and OUT/val "
        "(test split) with the meta file's class names (CIFAR-100: the 100 fine labels). Images are stored "
        "as JPEG at --quality with 4:4:4 chroma. Nothing is downloaded.",
        archive="cifar-10-python.tar.gz, cifar-100-python.tar.gz or an extracted folder",
        out="output directory (OUT/train and OUT/val are created)",
        quality="JPEG quality, 4:4:4 chroma (default 100)",
    ).set_defaults(func=_cifar)
    stl10 = _archive_parser(
        ss,
        "stl10",
        help="write STL-10 (the binary archive) as OUT/train, OUT/unlabeled and OUT/val",
        description="Read stl10_binary.tar.gz (or the extracted stl10_binary folder) and write OUT/train "
        "(5,000 labelled images), OUT/unlabeled (100,000, no labels: pretraining only) and OUT/val (the "
        "8,000 test images), labels 0-based. Images are stored as JPEG at --quality with 4:4:4 chroma. "
        "Pretrain on train + unlabeled with data.train: [OUT/train, OUT/unlabeled]. Nothing is downloaded.",
        archive="stl10_binary.tar.gz or the extracted stl10_binary folder",
        out="output directory (OUT/train, OUT/unlabeled and OUT/val are created)",
        quality="JPEG quality, 4:4:4 chroma (default 100)",
    )
    stl10.add_argument("--no-unlabeled", action="store_true", help="skip the 100,000 unlabeled images")
    stl10.set_defaults(func=_stl10)
    _archive_parser(
        ss,
        "tiny-imagenet",
        help="write Tiny ImageNet (the zip) as OUT/train and OUT/val",
        description="Read tiny-imagenet-200.zip (or the extracted tiny-imagenet-200 folder) and write "
        "OUT/train (100,000 images) and OUT/val (10,000, labelled from val/val_annotations.txt). Classes are "
        "the wnids, sorted; the manifest records their words.txt names. The JPEGs are copied as they are. "
        "Nothing is downloaded.",
        archive="tiny-imagenet-200.zip or the extracted tiny-imagenet-200 folder",
        out="output directory (OUT/train and OUT/val are created)",
        quality="JPEG quality for non-JPEG images (default 95)",
    ).set_defaults(func=_tiny_imagenet)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``shards`` with its subcommands to the ``unmix`` parser."""
    p = sub.add_parser("shards", help="write, verify and inspect WebDataset shard sets")
    ss = p.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")

    w = ss.add_parser(
        "write",
        help="convert an image tree into shuffled WebDataset shards with DALI indices",
        description="Convert SRC (ImageFolder: SRC/<class>/<image>, or --list) into OUT/<split>-NNNNNN.tar "
        "+ .idx + manifest.json. Re-running the same command after an interruption finishes the job.",
    )
    w.add_argument(
        "src", help="image root (SRC/<class>/<image>); with --list, the root the paths are relative to"
    )
    w.add_argument("out", help="output directory")
    w.add_argument(
        "--list",
        metavar="FILE",
        help="'relative/path,label' lines (label: class name or integer index) instead of class dirs",
    )
    w.add_argument("--classes-from", metavar="MANIFEST", help="reuse another shard set's class mapping")
    w.add_argument(
        "--classes",
        metavar="FILE",
        help="write only the classes listed in FILE (one name a line, e.g. configs/imagenet100.txt); "
        "a name that is not a class of SRC is an error",
    )
    w.add_argument("--split", help="shard name prefix (default: OUT's directory name)")
    w.add_argument("--samples-per-shard", type=int, metavar="N", help="samples per shard (default 1000)")
    w.add_argument(
        "--shard-bytes",
        type=parse_size,
        metavar="SIZE",
        help="cut shards at about SIZE (e.g. 500MB), estimated from source file sizes",
    )
    w.add_argument("--seed", type=int, default=0, help="global shuffle seed (default 0)")
    w.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default 95)")
    w.add_argument("--max-side", type=int, metavar="N", help="re-encode images whose longer side exceeds N")
    w.add_argument("--workers", type=int, metavar="N", help="worker processes (default: the CPUs available)")
    w.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (counted) instead of failing"
    )
    w.add_argument("--overwrite", action="store_true", help="replace a different job's shards in OUT")
    w.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    w.set_defaults(func=_write)

    v = ss.add_parser(
        "verify", help="check a shard set against its manifest (exit 1 on any problem, 2 on a bad manifest)"
    )
    v.add_argument("dir", help="shard directory (or its manifest.json)")
    v.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    v.add_argument(
        "--fix",
        action="store_true",
        help="when all is well, record what a manifest of an older unmix lacks (.idx sha256, label range)",
    )
    v.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="decode with DALI on the CPU or the GPU (nvJPEG; falls back to CPU without CUDA)",
    )
    v.set_defaults(func=_verify)

    s = ss.add_parser("sample", help="write a built-in sample data set as OUT/train and OUT/val")
    s.add_argument(
        "name",
        choices=SAMPLE_NAMES,
        help="digits: sklearn digits 32x32; shifted-digits: the digits at a random place and size on a 16x16 "
        "canvas (unmix bench learning's data); photos: ~500x375",
    )
    s.add_argument("out", help="output directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--images", type=int, default=600, help="photos only: number of images (default 600)")
    s.add_argument("--classes", type=int, default=6, help="photos only: number of classes (default 6)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=_sample)

    _register_archives(ss)

    i = ss.add_parser(
        "info",
        help="print a shard set's manifest summary and check its files' presence and sizes (exit 1 if not)",
    )
    i.add_argument("dir")
    i.set_defaults(func=_info)


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench shards`` and ``bench pipeline``."""
    b = bench_sub.add_parser(
        "shards",
        help="shard write throughput (images/s) for JPEG copy and re-encode",
        description="Builds an ImageNet-like photo tree (~500x375 JPEG) in a temporary directory and times "
        "`shards write` on it: JPEG copy and re-encode with --max-side.",
    )
    b.add_argument("--images", type=int, default=2000, help="images in the tree (default 2000)")
    b.add_argument(
        "--workers", type=int, nargs="+", metavar="N", help="worker counts to time (default: 1 and CPU count)"
    )
    b.add_argument("--max-side", type=int, default=256, help="re-encode case: --max-side (default 256)")
    b.add_argument(
        "--dir", metavar="DIR", help="work directory (default: a temporary one, removed afterwards)"
    )
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.set_defaults(func=_bench_shards)
    _register_bench_pipeline(bench_sub)


def _bench_shards(args: argparse.Namespace) -> int:
    from unmix.pipeline.shards.bench import main as bench_main

    return bench_main(args)


def _register_bench_pipeline(bench_sub: argparse._SubParsersAction) -> None:
    """``bench pipeline``: the DALI loader against a torchvision DataLoader (:mod:`.bench_pipeline`)."""
    p = bench_sub.add_parser(
        "pipeline",
        help="DALI loader vs a torchvision + webdataset DataLoader (images/s, with and without Un-Mix)",
        description=bench_pipeline.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shards", nargs="?", help="shard directory (default: write a photo workload first)")
    p.add_argument(
        "--make-data", type=int, metavar="N", help="write N ~500x375 photo JPEGs as shards (default 512)"
    )
    p.add_argument("--data-dir", help="where --make-data writes (kept, reused); default: a temp dir")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--recipe", choices=["moco_v2", "moco_v1", "byol"], default="moco_v2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--repeat", type=int, default=2, help="measurements per configuration (median)")
    p.add_argument("--only", choices=["dali", "torchvision"], help="measure one side only")
    p.add_argument(
        "--stages",
        action="store_true",
        help="instead: where the DALI graph's time goes, stage by stage (decode, crops, colour, blur, ...)",
    )
    p.add_argument(
        "--unmix-cost",
        action="store_true",
        help="instead: Un-Mix's cost over mixing off, in paired measurements of two live DALI loaders "
        "(--repeat pairs of --steps batches; resolves differences the loader comparison cannot)",
    )
    p.add_argument(
        "--layout-cost",
        action="store_true",
        help="instead: channels_last batches straight from DALI (HWC) against NCHW batches converted "
        "after the loader, in paired measurements (Un-Mix on)",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.set_defaults(func=bench_pipeline.run_bench)
