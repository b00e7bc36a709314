"""Reader wiring and PyTorch iteration: ``build_pretrain_loader`` and ``build_eval_loader``.

One code path, one device switch: ``device="cpu"`` builds a pipeline with ``device_id=None``, the CPU
JPEG decoder and CPU operators; ``device="gpu"`` uses the ``"mixed"`` (nvJPEG) decoder and GPU operators on
``LOCAL_RANK``'s GPU, and the tensors stay on that GPU (no host round trip).

Graph definitions: :func:`pretrain_pipeline` and :func:`eval_pipeline` return the DALI pipeline (defined,
not built) that the loaders run. They are the only place the graphs are wired, so what
:mod:`unmix.pipeline.graph_check` inspects (e.g. the ``device="gpu"`` graph defined with
``device_id=None`` on a machine without CUDA) is exactly what a loader builds.

Memory layout: ``channels_last=True`` makes the graph emit the float images as HWC, and the loader
hands them out as ``[B, 3, H, W]`` views with channels_last strides (``permute(0, 3, 1, 2)`` of the
``[B, H, W, 3]`` tensor: no copy), the layout a channels_last model wants. Values are identical to the
default NCHW output for the same seed.

Epochs and sharding: ``fn.readers.webdataset`` reads the manifest's tars with their ``.idx`` files,
``shard_id``/``num_shards`` (default ``RANK``/``WORLD_SIZE``) split the samples into contiguous ranges,
and a shuffle buffer of ``shuffle_buffer`` samples shuffles them (shards must be written pre-shuffled).
Pretraining drops the last incomplete batch, and every rank takes the same number of steps:
``len(loader) == (total // num_shards) // batch_size``. Evaluation loaders cover every sample exactly
once across ranks per epoch (padded duplicates are stripped; the last batch may be smaller).

Several shard sets as one (``shards=[dir_a, dir_b]``, ``data.train`` as a list): the reader takes the
union of their tars, interleaved (:func:`shard_files`), so everything above holds for the union: one
epoch is ``sum of totals`` samples split across ranks, every sample of every set once, and a checkpoint
resumes it exactly. Sample keys (``with_keys``) become ``"<set index>/<key>"``. Pretraining reads only the
``.jpg`` members, so a set without labels (STL-10's unlabeled split) can be one of them; the evaluation
loaders refuse such a set.

Tensor ownership: DALI's PyTorch iterator hands out tensors that alias DALI's output buffers. The
pipelines run DALI's dynamic executor (``exec_dynamic=True``), whose outputs are per-iteration buffers
that the torch tensors keep alive (zero-copy, DALI >= 1.44): a later batch never overwrites a tensor
you hold, so nothing is copied (a copy of three float outputs costs more CPU than Un-Mix itself).
If a pipeline ever runs another executor, the loader clones instead. A test holds a batch across later
ones and checks it is unchanged. Keep the tensors as long as you like.

Checkpointing: the pipeline runs with ``enable_checkpointing=True``. ``loader.state_dict()`` returns the
DALI checkpoint of the reader position, the shuffle buffer and every random generator, taken after the
last batch handed out, plus the loader's epoch counter. ``load_state_dict(state)`` (or
``build_*_loader(..., state=state)``) rebuilds the pipeline from it: iteration continues with exactly
the batches (same samples, same augmentations) that the original loader would have produced next;
nothing of the epoch is visited twice or skipped. The loader must be built with the same arguments.
``len(loader)`` stays the length of a full epoch; a loader resumed after k steps of an epoch yields the
remaining ``len(loader) - k`` batches of it, then full epochs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix.pipeline import mixing
from unmix.pipeline.augment import Recipe, eval_train_view, eval_val_view, get_recipe, two_views
from unmix.pipeline.decoding import DecoderOptions
from unmix.pipeline.devices import local_cuda_index
from unmix.pipeline.labels import parse_labels
from unmix.pipeline.mixing import UnmixConfig

DEVICES = ("cpu", "gpu")
AUTO = "auto"  # device_id: LOCAL_RANK's GPU for device="gpu", None for device="cpu"
FLOAT_OUTPUTS = ("view1", "view2", "mixed", "image")  # images; the other outputs are per-sample scalars


@dataclass(frozen=True)
class ShardFiles:
    """The tar and index paths of one shard set, or of several read as one, and the sample count."""

    tars: list[str]
    indexes: list[str]
    total: int
    source: str = ""  # the shard directory or manifest it was read from (for messages)
    labeled: bool = True  # every set has labels (.cls); an unlabeled set serves pretraining only
    #: several sets: the index of each tar's set in the list given (for sample keys), else empty
    tar_sets: tuple[int, ...] = ()
    num_classes: int | None = None  # labels must be below it (None: not checked)


#: What the loaders take as shards: one set (directory or manifest.json), several, or resolved files.
Shards = str | os.PathLike | list | tuple | ShardFiles


def _one_set(shards: str | os.PathLike) -> tuple[list[str], list[str], int, bool, int]:
    """One set's tars, indices, total, labeled and number of classes, after the cheap checks every reader
    needs (:func:`unmix.pipeline.shards.manifest.check_shard_set`: sizes, each ``.idx``'s sha256)."""
    from unmix.pipeline.shards.manifest import check_shard_set

    m = check_shard_set(shards)
    return m.tar_paths, m.index_paths, int(m.total), m.labeled, m.num_classes


def shard_files(shards: Shards) -> ShardFiles:
    """Resolve a shard directory (or its manifest.json), or a list of them, into tar and .idx paths.

    Several sets are read as one training set (STL-10's train + unlabeled): their tars are interleaved,
    each set's spread evenly over the epoch (tar i of a set of n sits at (i + 0.5) / n of the sequence),
    so that the contiguous per-rank ranges and the local shuffle buffer mix the sets as a global shuffle
    of their union would, instead of one set's samples coming first.
    """
    if isinstance(shards, ShardFiles):
        return shards
    if not isinstance(shards, (list, tuple)):
        tars, indexes, total, labeled, num_classes = _one_set(shards)
        return ShardFiles(tars, indexes, total, str(shards), labeled, num_classes=num_classes)
    if not shards:
        raise ValueError("no shard sets given (an empty list)")
    resolved = [Path(str(x)).resolve() for x in shards]
    for j, r in enumerate(resolved):
        if r in resolved[:j] or (r.name == "manifest.json" and r.parent in resolved[:j]):
            raise ValueError(f"shard set {shards[j]} is listed twice")
    sets = [_one_set(x) for x in shards]
    order = sorted(
        ((i + 0.5) / len(tars), j, i) for j, (tars, *_) in enumerate(sets) for i in range(len(tars))
    )
    class_counts = {s[4] for s in sets}
    return ShardFiles(
        tars=[sets[j][0][i] for _, j, i in order],
        indexes=[sets[j][1][i] for _, j, i in order],
        total=sum(s[2] for s in sets),
        source=" + ".join(str(x) for x in shards),
        labeled=all(s[3] for s in sets),
        tar_sets=tuple(j for _, j, _ in order),
        # labels are range-checked when the sets agree on the number of classes (they share a mapping)
        num_classes=class_counts.pop() if len(class_counts) == 1 else None,
    )


def _dist_defaults(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    if shard_id is None:
        shard_id = int(os.environ.get("RANK", 0))
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
    return shard_id, num_shards


def _device_id(device: str) -> int | None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("device='gpu' but no CUDA device is visible; pass device='cpu' (CPU pipeline)")
    return local_cuda_index()


def pipeline_seed(seed: int, shard_id: int) -> int:
    """DALI seed for (seed, rank): deterministic, different for every rank."""
    return int(np.random.SeedSequence([seed, shard_id]).generate_state(1)[0] % (2**31 - 1))


def _read(
    files: ShardFiles,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    shuffle_buffer: int,
    labels: bool = True,
    options: DecoderOptions | None = None,
):
    """The webdataset reader: ``(jpegs, cls)``, or ``jpegs`` alone with ``labels=False`` (pretraining,
    which also reads sets without labels); ``options``: ``dont_use_mmap`` (:class:`DecoderOptions`)."""
    from nvidia.dali import fn

    return fn.readers.webdataset(
        paths=files.tars,
        index_paths=files.indexes,
        ext=["jpg", "cls"] if labels else ["jpg"],
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=max(1, min(shuffle_buffer, files.total)),
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        name="reader",
        **(options or DecoderOptions()).reader_args(),
    )


def _decode(jpegs, device: str, options: DecoderOptions | None = None):
    from nvidia.dali import fn, types

    return fn.decoders.image(
        jpegs,
        device="mixed" if device == "gpu" else "cpu",
        output_type=types.RGB,
        **(options or DecoderOptions()).decoder_args(device),
    )


def sample_key(source_info: bytes, tar_set: Mapping[str, int] | None = None) -> str:
    """The WebDataset key of a sample from DALI's ``source_info`` (``/x/train-000000.tar:OFFSET:KEY.jpg``).

    ``tar_set`` (tar path -> set index, when several sets are read as one): the key is ``"<set>/<key>"``,
    so that keys stay unique across sets (each set numbers its samples from 0).
    """
    text = source_info.decode()
    member = text.rsplit(":", 1)[-1]
    key = member.rsplit(".", 1)[0]
    if tar_set:
        key = f"{tar_set[text.rsplit(':', 2)[0]]}/{key}"
    return key


def _source_info(jpegs):
    from nvidia.dali import fn

    return fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)


class DaliLoader:
    """An epoch-at-a-time iterable over a DALI pipeline, yielding dicts of owned torch tensors.

    Built by :func:`build_pretrain_loader` / :func:`build_eval_loader`; ``len()`` is the number of steps
    in an epoch; iterating again starts the next epoch. See the module docstring for the guarantees.
    """

    def __init__(
        self,
        make_pipeline: Callable[..., Any],
        output_map: list[str],
        last_batch_policy,
        batch_size: int,
        device: str,
        dtype: torch.dtype,
        identity: dict[str, Any],
        state: Mapping | None = None,
        channels_last: bool = False,
        tar_set: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        with_keys: bool = True,
    ) -> None:
        self.num_classes = num_classes  # labels are parsed strictly and checked against it
        self.with_keys = with_keys
        self._make_pipeline = make_pipeline  # make_pipeline(checkpoint=...) -> unbuilt DALI pipeline
        self._output_map = output_map
        self._policy = last_batch_policy
        self.batch_size = batch_size
        self.device = device
        # where labels, lam and partner go: the rank's GPU, or the CPU
        device_id = _device_id(device)
        self._target = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.dtype = dtype
        self.channels_last = channels_last
        self._identity = identity  # arguments a checkpoint must match
        self.tar_set = dict(tar_set or {})  # several shard sets: tar path -> set index (sample keys)
        self.epoch = 0
        self._iterator = None
        self._build(None)
        if state is not None:
            self.load_state_dict(state)

    def _build(self, checkpoint) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = self._make_pipeline(checkpoint=checkpoint)
        pipe.build()
        self.pipeline = pipe
        self._iterator = DALIGenericIterator(
            pipe, self._output_map, reader_name="reader", last_batch_policy=self._policy, auto_reset=False
        )

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # leaving the loop early and iterating again continues the same epoch where it stopped
        for out in self._iterator:
            yield self._convert(out[0])
        self._iterator.reset()
        self.epoch += 1

    def _convert(self, raw: dict[str, torch.Tensor]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for k, t in raw.items():
            if k in FLOAT_OUTPUTS:
                if self.channels_last:  # [B, H, W, C] -> [B, C, H, W] view with channels_last strides
                    t = t.permute(0, 3, 1, 2)
                # zero-copy under the dynamic executor (see _owned); .to() converts into a new tensor
                # (keeping the strides: a channels_last tensor stays channels_last)
                batch[k] = t.to(self.dtype) if t.dtype != self.dtype else self._owned(t)
            elif k == "lam":
                batch[k] = self._to_target(t.reshape(-1).to(torch.float32, copy=True))
            elif k == "cls":  # a bad .cls is an error naming its shard and key (the graph emits "key")
                batch["label"] = self._to_target(parse_labels(t, self.num_classes, raw.get("key")))
            elif k == "key":
                if self.with_keys:
                    batch[k] = [sample_key(bytes(row).rstrip(b"\0"), self.tar_set) for row in t.cpu().numpy()]
            elif k == "partner":
                batch[k] = self._to_target(t.reshape(-1).to(torch.int64, copy=True))
            else:  # pragma: no cover - output_map is ours
                batch[k] = self._owned(t)
        return batch

    def _to_target(self, t: torch.Tensor) -> torch.Tensor:
        """A per-sample host tensor (DALI's CPU outputs ``lam``, ``partner``, ``cls``) on the target device.

        On the GPU the copy is queued without waiting: from pageable memory ``.to(cuda)`` waits for the
        current stream (the previous step's backward), so every batch would stall the host; from pinned
        memory it is an asynchronous DMA (the caching host allocator keeps the pinned block alive until
        the copy is done). On the CPU the host tensor is the result.
        """
        if self._target.type == "cpu":
            return t
        return t.pin_memory().to(self._target, non_blocking=True)

    def _owned(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor the next batch cannot overwrite.

        With DALI's dynamic executor (``exec_dynamic=True``, which these pipelines set) the iterator hands
        out DLPack views of per-iteration output buffers that the torch tensor keeps alive (DALI >= 1.44
        "zero-copy outputs"): nothing is recycled while a tensor refers to it, so no copy is needed.
        Any other executor recycles its output buffers: copy.
        """
        return t if self.pipeline.exec_dynamic else t.clone()

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out: DALI checkpoint + epoch + build arguments."""
        (checkpoint,) = self._iterator.checkpoints()
        return {"dali_checkpoint": checkpoint, "epoch": self.epoch, **self._identity}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader built with the same arguments)."""
        for key, value in self._identity.items():
            if key in state and state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {key}={value!r}")
        if "dali_checkpoint" not in state:
            raise ValueError("loader state has no 'dali_checkpoint' (not from DaliLoader.state_dict())")
        self._build(state["dali_checkpoint"])
        self.epoch = int(state.get("epoch", 0))


def _labeled_files(shards: Shards) -> ShardFiles:
    """:func:`shard_files` for the evaluation loaders, which need labels: an unlabeled set is refused."""
    files = shard_files(shards)
    if not files.labeled:
        raise ValueError(
            f"{files.source}: a shard set without labels (its manifest says labeled: false, e.g. STL-10's "
            "unlabeled split) serves pretraining only; evaluation needs a labelled set"
        )
    return files


def _tar_set(files: ShardFiles) -> dict[str, int]:
    return dict(zip(files.tars, files.tar_sets, strict=True)) if files.tar_sets else {}


def _resolve_device_id(device: str, device_id: int | None | str) -> int | None:
    """``AUTO``: the loaders' rule (:func:`_device_id`); an explicit id (or None) is taken as given, so a
    ``device="gpu"`` graph can be *defined* with ``device_id=None`` where there is no CUDA."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return _device_id(device) if device_id == AUTO else device_id


def _layout(channels_last: bool) -> str:
    return "HWC" if channels_last else "CHW"


def pretrain_outputs(unmix: UnmixConfig | Mapping | bool | None = None, with_keys: bool = False) -> list[str]:
    """Names of :func:`pretrain_pipeline`'s outputs, in order (the loader's ``output_map``)."""
    cfg = UnmixConfig.resolve(unmix)
    names = ["view1", "view2"]
    if cfg.enabled:
        names += ["mixed", "lam"] + (["partner"] if cfg.random_partner else [])
    return names + (["key"] if with_keys else [])


def eval_outputs(with_keys: bool = False) -> list[str]:
    """Names of :func:`eval_pipeline`'s outputs, in order (``cls`` becomes ``label`` in the loader).

    ``key`` always: a label that does not parse is reported with its sample's shard and key; the loader
    hands keys out only when asked (``with_keys``).
    """
    return ["image", "cls", "key"]


def _pipeline_args(
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    shard_id: int,
    prefetch: int,
    checkpoint: str | None,
) -> dict[str, Any]:
    """The pipeline arguments both graphs share: per-rank seed, checkpointing, the dynamic executor (which
    hands out fresh buffers, so batches may be kept)."""
    return {
        "batch_size": batch_size,
        "num_threads": num_threads,
        "device_id": device_id,
        "seed": pipeline_seed(seed, shard_id),
        "prefetch_queue_depth": prefetch,
        "enable_checkpointing": True,
        "checkpoint": checkpoint,
        "exec_dynamic": True,
    }


def pretrain_pipeline(
    shards: Shards,
    batch_size: int,
    recipe: str | Recipe = "moco_v2",
    crop: int = 224,
    unmix: UnmixConfig | Mapping | bool | None = None,
    device: str = "gpu",
    shard_id: int | None = None,
    num_shards: int | None = None,
    seed: int = 0,
    num_threads: int = 4,
    shuffle_buffer: int = 4096,
    prefetch: int = 2,
    with_keys: bool = False,
    channels_last: bool = False,
    device_id: int | None | str = AUTO,
    checkpoint: str | None = None,
    decoder: DecoderOptions | Mapping | None = None,
):
    """The pretraining DALI pipeline of :func:`build_pretrain_loader`: defined, not built.

    Same arguments as the loader (``dtype``/``state`` are the loader's), plus ``device_id`` (``AUTO``:
    ``LOCAL_RANK``'s GPU for ``device="gpu"``; pass ``None`` to define a GPU graph without CUDA, e.g. to
    ``serialize()`` it or check it with :func:`unmix.pipeline.graph_check.device_report`) and
    ``checkpoint`` (a DALI checkpoint to restore). Outputs: :func:`pretrain_outputs`; the images are
    float32 CHW, or HWC with ``channels_last=True``.
    """
    from nvidia.dali import pipeline_def

    files = shard_files(shards)
    shard_id, num_shards = _dist_defaults(shard_id, num_shards)
    device_id = _resolve_device_id(device, device_id)
    rec = get_recipe(recipe)
    cfg = UnmixConfig.resolve(unmix)
    per_shard = files.total // num_shards
    if per_shard < batch_size:
        raise ValueError(
            f"{files.source}: {files.total} samples over {num_shards} shard(s) give {per_shard} per rank, "
            f"fewer than batch_size={batch_size} (pretraining drops incomplete batches)"
        )
    layout = _layout(channels_last)
    options = DecoderOptions.resolve(decoder)

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs = _read(files, shard_id, num_shards, True, shuffle_buffer, labels=False, options=options)
        images = _decode(jpegs, device, options)
        view1, view2 = two_views(images, rec, crop, layout)
        out = {"view1": view1, "view2": view2}
        if cfg.enabled:
            mixed, lam, partner = mixing.unmix(view1, batch_size, cfg, (crop, crop), device, layout)
            out.update(mixed=mixed, lam=lam, partner=partner)
        if with_keys:
            out["key"] = _source_info(jpegs)
        return tuple(out[name] for name in pretrain_outputs(cfg, with_keys))

    return graph(**_pipeline_args(batch_size, num_threads, device_id, seed, shard_id, prefetch, checkpoint))


def eval_pipeline(
    shards: Shards,
    batch_size: int,
    split: str = "train",
    crop: int = 224,
    device: str = "gpu",
    shard_id: int | None = None,
    num_shards: int | None = None,
    seed: int = 0,
    num_threads: int = 4,
    shuffle_buffer: int = 4096,
    prefetch: int = 2,
    with_keys: bool = False,
    channels_last: bool = False,
    device_id: int | None | str = AUTO,
    checkpoint: str | None = None,
    decoder: DecoderOptions | Mapping | None = None,
):
    """The evaluation DALI pipeline of :func:`build_eval_loader`: defined, not built.

    ``device_id`` and ``checkpoint`` as in :func:`pretrain_pipeline`; outputs :func:`eval_outputs`.
    """
    from nvidia.dali import fn, pipeline_def

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = _labeled_files(shards)
    shard_id, num_shards = _dist_defaults(shard_id, num_shards)
    device_id = _resolve_device_id(device, device_id)
    layout = _layout(channels_last)
    options = DecoderOptions.resolve(decoder)

    @pipeline_def
    def graph():
        jpegs, cls = _read(files, shard_id, num_shards, split == "train", shuffle_buffer, options=options)
        images = _decode(jpegs, device, options)
        view = eval_train_view if split == "train" else eval_val_view
        return view(images, crop, layout), fn.pad(cls, fill_value=0), _source_info(jpegs)

    return graph(**_pipeline_args(batch_size, num_threads, device_id, seed, shard_id, prefetch, checkpoint))


def build_pretrain_loader(
    shards: Shards,
    batch_size: int,
    recipe: str | Recipe = "moco_v2",
    crop: int = 224,
    unmix: UnmixConfig | Mapping | bool | None = None,
    device: str = "gpu",
    shard_id: int | None = None,
    num_shards: int | None = None,
    seed: int = 0,
    num_threads: int = 4,
    dtype: torch.dtype = torch.float32,
    shuffle_buffer: int = 4096,
    prefetch: int = 2,
    with_keys: bool = False,
    state: Mapping | None = None,
    channels_last: bool = False,
    decoder: DecoderOptions | Mapping | None = None,
) -> DaliLoader:
    """Self-supervised pretraining loader: two augmented views, plus the Un-Mix mixture when enabled.

    Yields dicts ``{"view1", "view2": [B, 3, crop, crop] dtype}`` and, with Un-Mix enabled,
    ``"mixed"`` (like view1: view1 mixed with its partner, view1 in reversed batch order) and
    ``"lam"`` ([B] float32, the weight of view1 in each mixed sample). With
    ``unmix={"random_partner": True, ...}`` also ``"partner"`` ([B] int64, the partner of each sample).
    With Un-Mix disabled (``None``/``False``/``enabled=False``) no mixture is computed and the dict
    holds only the two views. ``len(loader) == (total // num_shards) // batch_size`` on every rank.
    ``with_keys=True`` adds ``"key"``: the list of the batch's WebDataset sample keys (for debugging).
    ``state``: a :meth:`DaliLoader.state_dict` to resume from. ``channels_last=True``: the images come
    with channels_last strides (same shape and values; no copy). ``decoder``: reader and nvJPEG settings
    (:class:`~unmix.pipeline.decoding.DecoderOptions`, or a dict of its fields; default: its defaults).
    The graph is :func:`pretrain_pipeline`.
    """
    files = shard_files(shards)
    shard_id, num_shards = _dist_defaults(shard_id, num_shards)
    rec = get_recipe(recipe)
    cfg = UnmixConfig.resolve(unmix)
    make = functools.partial(  # make(checkpoint=...): the loader's pipeline
        pretrain_pipeline,
        files,
        batch_size,
        recipe=rec,
        crop=crop,
        unmix=cfg,
        device=device,
        shard_id=shard_id,
        num_shards=num_shards,
        seed=seed,
        num_threads=num_threads,
        shuffle_buffer=shuffle_buffer,
        prefetch=prefetch,
        with_keys=with_keys,
        channels_last=channels_last,
        device_id=_resolve_device_id(device, AUTO),
        decoder=DecoderOptions.resolve(decoder),
    )
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    identity = {
        "kind": "pretrain",
        "batch_size": batch_size,
        "shard_id": shard_id,
        "num_shards": num_shards,
        "seed": seed,
        "recipe": rec.name,
        "crop": crop,
        "samples": files.total,  # the data read (several sets: their union)
    }
    return DaliLoader(
        make,
        pretrain_outputs(cfg, with_keys),
        LastBatchPolicy.DROP,
        batch_size,
        device,
        dtype,
        identity,
        state,
        channels_last,
        _tar_set(files),
    )


def build_eval_loader(
    shards: Shards,
    batch_size: int,
    split: str = "train",
    crop: int = 224,
    device: str = "gpu",
    shard_id: int | None = None,
    num_shards: int | None = None,
    seed: int = 0,
    num_threads: int = 4,
    dtype: torch.dtype = torch.float32,
    shuffle_buffer: int = 4096,
    prefetch: int = 2,
    with_keys: bool = False,
    state: Mapping | None = None,
    channels_last: bool = False,
    decoder: DecoderOptions | Mapping | None = None,
) -> DaliLoader:
    """Linear-evaluation / kNN loader yielding ``{"image": [B, 3, crop, crop], "label": [B] int64}``.

    ``split="train"``: shuffled, RandomResizedCrop(crop) + flip. ``split="val"``: shard order, resize the
    shorter side to crop*256/224 (to crop itself for crops <= 64, the CIFAR convention) and centre crop.
    Every sample is seen exactly once per epoch across the ``num_shards`` ranks (rank r gets the
    contiguous r-th part); the last batch may be smaller. ``with_keys=True`` adds ``"key"`` (list of the
    WebDataset sample keys); ``state`` resumes; ``channels_last`` as in :func:`build_pretrain_loader`.
    The graph is :func:`eval_pipeline`.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = _labeled_files(shards)
    shard_id, num_shards = _dist_defaults(shard_id, num_shards)
    make = functools.partial(  # make(checkpoint=...): the loader's pipeline
        eval_pipeline,
        files,
        batch_size,
        split=split,
        crop=crop,
        device=device,
        shard_id=shard_id,
        num_shards=num_shards,
        seed=seed,
        num_threads=num_threads,
        shuffle_buffer=shuffle_buffer,
        prefetch=prefetch,
        with_keys=with_keys,
        channels_last=channels_last,
        device_id=_resolve_device_id(device, AUTO),
        decoder=DecoderOptions.resolve(decoder),
    )
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    identity = {
        "kind": "eval-" + split,
        "batch_size": batch_size,
        "shard_id": shard_id,
        "num_shards": num_shards,
        "seed": seed,
        "crop": crop,
        "samples": files.total,
    }
    return DaliLoader(
        make,
        eval_outputs(with_keys),
        LastBatchPolicy.PARTIAL,
        batch_size,
        device,
        dtype,
        identity,
        state,
        channels_last,
        _tar_set(files),
        num_classes=files.num_classes,
        with_keys=with_keys,
    )
