"""The pretraining configuration: typed dataclasses, YAML files, dotted ``key=value`` overrides.

Every key has a default, so a YAML holding only the interface keys (``data.train``, ``model.arch``,
``method.name``, ...) is a valid config. Unknown keys and invalid values raise :class:`ConfigError`
naming the key and what is allowed, before any work starts: every number must be finite and inside its
key's range (:data:`NUMBER_RANGES`; ``1e-3`` is read as a number), ``deepspeed.config`` may only set the
DeepSpeed tuning keys of :data:`DEEPSPEED_PASS_THROUGH`, and a YAML document is capped in size and in
what its aliases expand to. ``resolve`` fills the values that depend on others (MoCo v1/v2 defaults,
the data recipe) so the written ``config.yaml`` says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from unmix.pipeline.mix_config import UnmixConfig, for_trainer
from unmix.training import methods

# Backbones :func:`unmix.training.backbones.build_backbone` builds; here so reading a config imports no torch.
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
_BOTTLENECK_ARCHS = ("resnet50", "resnet101", "resnet152", "wide_resnet50_2")  # block expansion 4


def feature_dim(arch: str, width: int = 64) -> int:
    """Width of ``arch``'s pooled feature (torchvision's ``fc.in_features``) at ``width`` base channels."""
    return 8 * width * (4 if arch in _BOTTLENECK_ARCHS else 1)


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds an invalid value."""


# A YAML config is a page of keys: far larger documents, or aliases that expand to many nodes (a few
# hundred bytes of nested anchors can expand to billions), are refused before anything is built.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


@dataclass
class DataConfig:
    # shard directory (or manifest.json) of the training split, or a list of them read as one training set
    # (same crop and recipe; e.g. STL-10's [train, unlabeled]); only the labelled ones feed the kNN bank
    train: str | list[str] = ""
    val: str = ""  # shard directory of the validation split (the kNN monitor's queries; "" = no monitor)
    device: Literal["gpu", "cpu"] = "gpu"  # where DALI decodes and augments
    crop: int = 224  # side of the square views; <= 64 selects the small-image ResNet stem
    threads: int = 4  # DALI CPU threads per process
    # loader augmentation (pipeline/augment.py RECIPES); "" = the method's own (moco_v2, moco_v1, byol,
    # simclr); moco_cifar: the MoCo/Un-Mix CIFAR recipe (crop scale 0.08-1, no blur); simclr_cifar: SimCLR's
    # CIFAR-10 recipe (jitter strength 0.5, no blur)
    recipe: str = ""
    # synthetic: random normalised images made on data.device, mixed by the Un-Mix rule; no shards, no DALI
    # (benchmarks, `unmix bench gpu`)
    source: Literal["dali", "synthetic"] = "dali"
    synthetic_samples: int = 1_281_167  # epoch size of data.source=synthetic (ImageNet-1k train)
    # reader / nvJPEG decoder (unmix.pipeline.decoding.DecoderOptions; paddings: DALI's ImageNet example)

    # share of each batch decoded by the GPU's hardware JPEG engines (data.device gpu; DALI's default 0.65
    # predates Hopper's seven engines; lower it if `unmix bench gpu` shows data wait on your GPUs)
    hw_decoder_load: float = 0.9
    # bytes nvJPEG's device buffers grow by (GPU decoder), as in DALI's ImageNet example (DALI's default:
    # 16 MB)
    device_memory_padding: int = 211_025_920
    # bytes nvJPEG's pinned host buffers grow by (GPU decoder), as in DALI's ImageNet example (DALI's
    # default: 8 MB)
    host_memory_padding: int = 140_544_512
    # the reader read()s the tars instead of memory-mapping them: for network filesystems (Lustre, GPFS, NFS)
    dont_use_mmap: bool = False


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # backbone: resnet10/18/34/50/101/152 or wide_resnet50_2 (ARCHS; torchvision's)
    small_images: bool | None = None  # force the CIFAR stem on/off; null = automatic from data.crop
    width: int = 64  # base channels of the ResNet (torchvision: 64); narrower trunks for CPU runs
    # null = on for CUDA, off on the CPU; the loader then emits channels_last batches (the weights stay
    # contiguous)
    channels_last: bool | None = None


@dataclass
class MocoConfig:
    K: int = 65536  # queue length (negatives)
    m: float = 0.999  # momentum of the key encoder
    T: float | None = None  # InfoNCE temperature; null = 0.2 (v2) or 0.07 (v1)
    mlp: bool | None = None  # MLP projection head; null = true (v2) or false (v1)
    dim: int = 128  # embedding dimension
    # hidden width of the MLP head; null = the backbone's feature width (2048 for ResNet-50, 512 for
    # ResNet-18: the authors' fc.in_features)
    hidden_dim: int | None = None
    # loss in both directions, the mixture scored against both clean keys (the paper's CIFAR runs)
    symmetric: bool = False
    # Shuffle-BN for the key encoder: across ranks, or on one process SplitBatchNorm + shuffle
    shuffle_bn: bool = True
    # one process with shuffle_bn: BN groups per batch in both encoders (as 8 GPUs); null = 8, or for a batch
    # 8 does not divide the most groups of >= 2 images below 8 (printed at start); 0 or 1 = off; an explicit
    # value must divide the per-process batch
    bn_splits: int | None = None
    # SyncBatchNorm in the query encoder only, on several CUDA processes (the key encoder keeps per-rank BN)
    sync_bn: bool = False


@dataclass
class ByolConfig:
    proj_hidden_dim: int = 4096  # projector hidden width
    proj_dim: int = 256  # projector (and predictor) output dimension
    pred_hidden_dim: int = 4096  # predictor hidden width
    tau_base: float = 0.996  # EMA momentum at step 0; cosine schedule to 1 at the end
    sync_bn: bool = True  # SyncBatchNorm in the online and target networks on several CUDA processes
    # target projections the mixture is regressed onto: both clean views (the symmetric form, our derivation:
    # the authors released no BYOL code), or view 2's only (the one-target form of unmix 0.1.0)
    mix_targets: Literal["both", "view2"] = "both"


@dataclass
class SimclrConfig:
    T: float = 0.1  # NT-Xent temperature (SimCLR ImageNet: 0.1; CIFAR-10: 0.5)
    proj_hidden_dim: int | None = None  # hidden width of the projection MLP; null = the backbone's width
    proj_dim: int = 128  # embedding dimension (SimCLR: 128)
    sync_bn: bool = True  # SyncBatchNorm on several CUDA processes (SimCLR's global BN)


@dataclass
class MethodConfig:
    # moco_v2 / moco_v1 (linear head, T 0.07) / byol / simclr: a name in training/methods.py METHODS
    name: str = "moco_v2"
    moco: MocoConfig = field(default_factory=MocoConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)


@dataclass
class OptimConfig:
    epochs: int = 200  # epochs; raising it on a finished output_dir extends the run
    batch_size: int = 256  # global batch, over all processes and accumulation steps
    grad_accum: int = 1  # gradient accumulation steps per optimizer step
    lr: float = 0.03  # per 256 images; the run uses lr * batch_size / 256
    optimizer: Literal["sgd", "lars"] = "sgd"  # sgd (MoCo) / lars (BYOL, SimCLR; deepspeed.zero_stage 0 only)
    momentum: float = 0.9  # SGD/LARS momentum
    weight_decay: float = 1e-4  # weight decay
    warmup_epochs: float = 0.0  # linear warm-up from 0, then the schedule
    # after the warm-up: cosine to 0 / step (x0.1 at each milestone, MoCo v1) / constant
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list = field(default_factory=lambda: [120, 160])  # epochs, for schedule: step
    lars_eta: float = 0.001  # LARS trust coefficient
    lars_exclude_bias_norm: bool = True  # biases and norm parameters: no LARS adaptation, no weight decay


@dataclass
class MlflowConfig:
    enabled: bool = True  # false: no MLflow at all
    experiment: str = "unmix"  # experiment name
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir parent>/mlflow.db
    run_name: str = ""  # "" = the output directory's name
    system_metrics: bool = True  # log_system_metrics (psutil; pynvml on GPUs)


@dataclass
class DeepspeedConfig:
    # bf16: DeepSpeed torch_autocast, fp32 weights / fp16: loss scaling / fp32 (CPU runs)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: int = 0  # 0, 1 or 2; 3 is refused (it partitions parameters, breaking the EMA target)
    gradient_clipping: float = 0.0  # 0 = off, as in the papers (DeepSpeed's own default is 1.0)
    config: dict = field(default_factory=dict)  # DeepSpeed tuning keys passed through (win): see below


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_epochs: int = 1  # 0 = off; a checkpoint is also written at the end and on SIGUSR1/SIGTERM
    keep: int = 2  # verified complete checkpoints kept (the newest ones)
    # steps between the ranks' agreement on a SIGUSR1/SIGTERM (an all-reduce; also at every epoch end);
    # 1 = every step
    signal_check_every: int = 10


@dataclass
class LogConfig:
    every_steps: int = 10  # metrics to MLflow and the progress line
    progress: Literal["auto", "tqdm", "lines", "off"] = "auto"  # auto: tqdm on a terminal, lines otherwise


@dataclass
class EvalConfig:
    """The kNN monitor during pretraining (:mod:`unmix.training.knn_monitor`); it reads ``data.val``."""

    knn_every_epochs: int = 0  # weighted-kNN top-1 on data.val every N epochs and at the last; 0 = off
    knn_at_start: bool = False  # monitor on: also the initial weights (BN stats of data.train) at step 0
    knn_calibrate_bn: bool = False  # every score on a copy with BN stats of data.train (as the floor's)
    knn_k: int = 200  # neighbours (the authors' CIFAR code: 200)
    knn_t: float = 0.1  # temperature of the exp(sim / t) vote weights (authors: 0.1)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    # the pipeline's own settings object (pipeline/mix_config.py); off unless the config turns it on
    unmix: UnmixConfig = field(default_factory=lambda: UnmixConfig(enabled=False))
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # model init, queue init, Shuffle-BN permutations, loader seed
    output_dir: str = "runs/pretrain"  # config.yaml, deepspeed_config.json, checkpoints/, backbone.pt
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    deepspeed: DeepspeedConfig = field(default_factory=DeepspeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# The range of every numeric key: (low, high, low excluded). Every int and float field of Config must
# appear here (a test checks), so no number reaches the run unchecked; floats must also be finite.
# The ceilings are far above any published recipe; they stop typos (1e12) before set-up allocates.
NUMBER_RANGES: dict[str, tuple[float, float, bool]] = {
    "data.crop": (0, 4096, True),
    "data.threads": (0, 1024, True),
    "data.synthetic_samples": (0, 10**10, True),
    "data.hw_decoder_load": (0, 1, False),
    "data.device_memory_padding": (0, 1 << 40, False),  # bytes
    "data.host_memory_padding": (0, 1 << 40, False),  # bytes
    "model.width": (0, 1024, True),  # and a multiple of 8
    "method.moco.K": (0, 1 << 24, True),  # 256x ImageNet's 65536; the queue is K x dim fp32
    "method.moco.m": (0, 1, False),
    "method.moco.T": (0, 100, True),
    "method.moco.dim": (0, 65536, True),
    "method.moco.hidden_dim": (0, 65536, True),
    "method.moco.bn_splits": (0, 4096, False),
    "method.byol.proj_hidden_dim": (0, 65536, True),
    "method.byol.proj_dim": (0, 65536, True),
    "method.byol.pred_hidden_dim": (0, 65536, True),
    "method.byol.tau_base": (0, 1, False),
    "method.simclr.T": (0, 100, True),
    "method.simclr.proj_hidden_dim": (0, 65536, True),
    "method.simclr.proj_dim": (0, 65536, True),
    "unmix.p_mixup": (0, 1, False),
    "unmix.alpha": (0, 1000, False),  # > 0 when unmix.enabled
    "optim.epochs": (0, 10**6, True),
    "optim.batch_size": (0, 1 << 24, True),
    "optim.grad_accum": (0, 65536, True),
    "optim.lr": (0, math.inf, False),  # no natural ceiling (a test provokes divergence with 1e38)
    "optim.momentum": (0, 1, False),
    "optim.weight_decay": (0, 10, False),
    "optim.warmup_epochs": (0, 10**6, False),  # and <= optim.epochs
    "optim.milestones": (0, 10**6, False),  # each entry
    "optim.lars_eta": (0, 10, False),
    "seed": (0, 2**31 - 1, False),
    "deepspeed.zero_stage": (0, 3, False),  # 3 refused below with the reason
    "deepspeed.gradient_clipping": (0, 1e6, False),
    "checkpoint.every_steps": (0, 2**31 - 1, False),
    "checkpoint.every_epochs": (0, 10**6, False),
    "checkpoint.keep": (0, 1000, True),
    "checkpoint.signal_check_every": (0, 10**6, True),
    "log.every_steps": (0, 2**31 - 1, True),
    "eval.knn_every_epochs": (0, 10**6, False),
    "eval.knn_k": (0, 10**6, True),
    "eval.knn_t": (0, 100, True),
}

# The DeepSpeed keys ``deepspeed.config`` may set (None: a scalar; a set: a section with these scalar
# keys): tuning knobs only. Keys that make DeepSpeed write files at paths they name (tensorboard,
# csv_monitor, wandb, comms_logger, flops_profiler, autotuning, nebula, checkpoint, aio/nvme offload, data
# efficiency) are refused, as are those this config sets itself (batch sizes, clipping, ZeRO stage).
DEEPSPEED_PASS_THROUGH: dict[str, frozenset[str] | None] = {
    "steps_per_print": None,
    "wall_clock_breakdown": None,
    "memory_breakdown": None,
    "prescale_gradients": None,
    "gradient_predivide_factor": None,
    "communication_data_type": None,
    "zero_optimization": frozenset(
        {
            "reduce_bucket_size",
            "allgather_bucket_size",
            "overlap_comm",
            "contiguous_gradients",
            "reduce_scatter",
            "allgather_partitions",
            "round_robin_gradients",
            "use_multi_rank_bucket_allreduce",
        }
    ),
    "fp16": frozenset(
        {
            "enabled",
            "loss_scale",
            "initial_scale_power",
            "loss_scale_window",
            "hysteresis",
            "consecutive_hysteresis",
            "min_loss_scale",
        }
    ),
    # lower_precision_safe_modules: the documented opt-in to DeepSpeed's bf16 gradient reduction
    # (training/engine.py sets it to [] so ZeRO-1/2 reduce in fp32)
    "torch_autocast": frozenset({"enabled", "dtype", "lower_precision_safe_modules"}),
}


# Keys whose change does not change what the run computes: allowed to differ on resume.
RESUME_SAFE_KEYS = (
    "optim.epochs",  # raising it extends a finished run (the cosine schedules stretch to the new end)
    "data.threads",
    "data.hw_decoder_load",  # decoding performance knobs (the reader and nvJPEG settings)
    "data.device_memory_padding",
    "data.host_memory_padding",
    "data.dont_use_mmap",
    "data.val",
    "output_dir",
    "mlflow.tracking_uri",
    "mlflow.system_metrics",
    "log.",
    "checkpoint.",
    "eval.",  # the kNN monitor only reads the backbone
)


# ---------------------------------------------------------------------------------------------- parsing


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and ("off" if value is False else "on") in allowed:
            value = "off" if value is False else "on"  # YAML 1.1 reads a bare off / on as a boolean
        if value not in allowed:
            raise ConfigError(f"{key}: invalid value {value!r}; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                if "finite" in str(exc):  # a number of the right type, out of range: say so
                    raise
        names = " or ".join("null" if a is type(None) else a.__name__ for a in args)
        raise ConfigError(f"{key}: invalid value {value!r}; expected {names}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: invalid value {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: invalid value {value!r}; expected an integer")
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: invalid value {value!r}; must be a finite number")
            return float(value)
        raise ConfigError(f"{key}: invalid value {value!r}; expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: invalid value {value!r}; expected a string")
    if tp is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ConfigError(f"{key}: invalid value {value!r}; expected a list of integers")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: invalid value {value!r}; expected a mapping")
    if tp == list[str]:
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise ConfigError(f"{key}: invalid value {value!r}; expected a non-empty list of non-empty strings")
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, recursing into nested dataclasses.

    Keys the mapping leaves out take their values from ``base`` (the field's default in the parent:
    ``unmix`` defaults to ``enabled: false`` although the pipeline's ``UnmixConfig()`` mixes), else
    from ``cls``'s defaults. A ``ValueError`` of the dataclass itself becomes a :class:`ConfigError`.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<top level>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed keys"
            f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", _field_default(fields[name]))
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], open_: set[int], where: str) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (memoised: linear time)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise ConfigError(f"{where}: a YAML alias refers to itself (recursive document)")
    open_.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_nodes(child, memo, open_, where)
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"{where}: the YAML expands to more than {MAX_YAML_NODES} values (aliases of aliases?); "
                "refused"
            )
    open_.discard(id(node))
    memo[id(node)] = total
    return total


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` with caps: at most :data:`MAX_YAML_BYTES`, aliases expanding to at most
    :data:`MAX_YAML_NODES` values, no recursive aliases. ``where`` names the source in errors."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} bytes of YAML; a config is at most {MAX_YAML_BYTES} bytes")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, {}, set(), where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply") from None
    finally:
        loader.dispose()


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=0.1", "unmix.enabled=true"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.epochs=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_dotted(tree, key, safe_yaml(raw, f"override {key}") if raw != "" else "")
    return tree


def merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into ``base`` recursively (dicts merged, other values replaced); a new dict."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate and resolve."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_file() and path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(
                f"{path}: {path.stat().st_size} bytes; a config is at most {MAX_YAML_BYTES} bytes"
            )
        try:
            text = path.read_text()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        tree = safe_yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        tree = merge(tree, parse_overrides(overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    try:
        return resolve(_build(Config, tree, ""))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def from_dict(tree: dict) -> Config:
    """A Config from a nested dict (e.g. a resolved config stored in a checkpoint)."""
    return resolve(_build(Config, tree, ""))


# ------------------------------------------------------------------------------------------- resolving


def resolve(cfg: Config) -> Config:
    """Fill the values that depend on others and check cross-key constraints (world-size-free)."""
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: invalid value {cfg.model.arch!r}; allowed: {', '.join(ARCHS)}")
    if not 8 <= cfg.model.width <= 1024 or cfg.model.width % 8:
        raise ConfigError(
            f"model.width: invalid value {cfg.model.width!r}; must be a positive multiple of 8, at most 1024"
        )
    if cfg.method.name not in methods.METHODS:
        raise ConfigError(
            f"method.name: invalid value {cfg.method.name!r}; allowed: {', '.join(methods.names())}"
        )
    spec = methods.spec(cfg.method.name)
    for key, value in spec.section_defaults.items():  # MoCo v1 / v2: T and the head
        if getattr(methods.section(cfg), key) is None:
            setattr(methods.section(cfg), key, value)
    moco, simclr = cfg.method.moco, cfg.method.simclr
    if moco.T is None:  # a MoCo section in a run of another method: MoCo v2's values
        moco.T = methods.spec("moco_v2").section_defaults["T"]
    if moco.mlp is None:
        moco.mlp = methods.spec("moco_v2").section_defaults["mlp"]
    if moco.hidden_dim is None:
        moco.hidden_dim = feature_dim(cfg.model.arch, cfg.model.width)
    if simclr.proj_hidden_dim is None:
        simclr.proj_hidden_dim = feature_dim(cfg.model.arch, cfg.model.width)
    if not cfg.data.recipe:
        cfg.data.recipe = spec.recipe
    if cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            "deepspeed.zero_stage: 3 is not supported: ZeRO-3 partitions the parameters across ranks, so "
            "the momentum (EMA) update of the target network cannot read the online weights; use 0, 1 or 2"
        )
    if cfg.deepspeed.zero_stage not in (0, 1, 2):
        raise ConfigError(
            f"deepspeed.zero_stage: invalid value {cfg.deepspeed.zero_stage!r}; allowed: 0, 1, 2"
        )
    if cfg.optim.optimizer == "lars" and (cfg.deepspeed.zero_stage > 0 or cfg.deepspeed.precision == "fp16"):
        raise ConfigError(
            "optim.optimizer: lars needs each parameter tensor whole (its trust ratio is a per-tensor norm), "
            "but DeepSpeed's ZeRO and fp16 optimizer wrappers hand it flattened partitions; "
            "use deepspeed.zero_stage=0 with precision bf16 or fp32"
        )
    check_numbers(cfg)
    check_deepspeed_pass_through(cfg.deepspeed.config)
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise ConfigError(
            f"optim.warmup_epochs: invalid value {cfg.optim.warmup_epochs!r}; must be <= optim.epochs "
            f"({cfg.optim.epochs})"
        )
    _check_train_sets(cfg.data.train)
    try:
        for_trainer(cfg.unmix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.unmix.enabled and cfg.unmix.per_sample_lambda and cfg.data.source == "synthetic":
        raise ConfigError(
            "unmix.per_sample_lambda: data.source=synthetic draws one lam per batch; "
            "use data.source=dali or unmix.per_sample_lambda=false"
        )
    return cfg


def _range_text(lo: float, hi: float, lo_open: bool) -> str:
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if math.isinf(hi):
        return f"> {num(lo)}" if lo_open else f">= {num(lo)}"
    return f"> {num(lo)} and <= {num(hi)}" if lo_open else f"in [{num(lo)}, {num(hi)}]"


def check_numbers(cfg: Config) -> None:
    """Every numeric key within :data:`NUMBER_RANGES` (floats finite); the error names key and value."""
    values = flatten(to_dict(cfg))
    for key, (lo, hi, lo_open) in NUMBER_RANGES.items():
        value = values[key]
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
                shown = f"{value!r} (entry {v!r})" if isinstance(value, list) else f"{v!r}"
                raise ConfigError(f"{key}: invalid value {shown}; must be {_range_text(lo, hi, lo_open)}")


# The pass-through keys whose value is a list of short names (module classes), not a scalar.
_DEEPSPEED_LIST_KEYS = frozenset({("torch_autocast", "lower_precision_safe_modules")})


def check_deepspeed_pass_through(extra: dict, prefix: str = "deepspeed.config") -> None:
    """``deepspeed.config`` may set only :data:`DEEPSPEED_PASS_THROUGH`, with finite scalar values.

    Numbers written in exponent notation (``5e8``, a string to YAML 1.1) are made numbers in place.
    """

    def scalar(key: str, value: Any) -> Any:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            number = float(value)
            value = int(number) if number.is_integer() else number
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: invalid value {value!r}; must be a finite number")
        if not isinstance(value, (bool, int, float, str)) or (isinstance(value, str) and len(value) > 64):
            raise ConfigError(
                f"{key}: invalid value {value!r}; expected a number, true/false or a short name"
            )
        return value

    for name, value in extra.items():
        key = f"{prefix}.{name}"
        if name not in DEEPSPEED_PASS_THROUGH:
            raise ConfigError(
                f"{key}: not passed through to DeepSpeed (only tuning keys are; keys that write files or "
                f"that this config sets itself are refused); allowed: {', '.join(DEEPSPEED_PASS_THROUGH)}"
            )
        sub = DEEPSPEED_PASS_THROUGH[name]
        if sub is None:
            extra[name] = scalar(key, value)
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: invalid value {value!r}; expected a mapping")
        for subname, subvalue in value.items():
            if subname not in sub:
                hint = (
                    " (set deepspeed.zero_stage)" if (name, subname) == ("zero_optimization", "stage") else ""
                )
                raise ConfigError(
                    f"{key}.{subname}: not passed through to DeepSpeed{hint}; allowed under {key}: "
                    f"{', '.join(sorted(sub))}"
                )
            if (name, subname) in _DEEPSPEED_LIST_KEYS and isinstance(subvalue, list):
                if len(subvalue) > 16:
                    raise ConfigError(f"{key}.{subname}: {len(subvalue)} entries; at most 16")
                value[subname] = [scalar(f"{key}.{subname}[{i}]", v) for i, v in enumerate(subvalue)]
            else:
                value[subname] = scalar(f"{key}.{subname}", subvalue)


def train_sets(cfg: Config) -> list[str]:
    """``data.train`` as a list of shard directories (one, or the several read as one training set)."""
    return list(cfg.data.train) if isinstance(cfg.data.train, list) else [cfg.data.train]


def _check_train_sets(train: str | list[str]) -> None:
    if not isinstance(train, list):
        return
    seen: dict[str, int] = {}
    for i, path in enumerate(train):
        norm = str(Path(path))
        norm = str(Path(norm).parent) if Path(norm).name == "manifest.json" else norm
        if norm in seen:
            raise ConfigError(f"data.train[{i}]: {path} is data.train[{seen[norm]}] again (listed twice)")
        seen[norm] = i


def check_world(cfg: Config, world_size: int) -> int:
    """The per-process micro-batch for ``world_size`` processes; errors name the keys at fault."""
    per_step = world_size * cfg.optim.grad_accum
    if cfg.optim.batch_size % per_step:
        raise ConfigError(
            f"optim.batch_size: {cfg.optim.batch_size} is not divisible by world size {world_size} x "
            f"optim.grad_accum {cfg.optim.grad_accum}; choose a multiple of {per_step}"
        )
    micro = cfg.optim.batch_size // per_step
    if cfg.unmix.enabled and micro < 2:
        raise ConfigError(f"optim.batch_size: {micro} image(s) per process cannot be mixed with a partner")
    return micro


# ---------------------------------------------------------------------------------------------- output


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    from unmix.training.atomic import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def diff(old: dict, new: dict, ignore: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[str]:
    """Flattened keys whose values differ between two resolved configs, skipping ``ignore`` prefixes."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if a.get(k) != b.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in ignore)
    ]
