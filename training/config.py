"""The pretraining configuration: typed dataclasses, YAML files, dotted ``key=value`` overrides.

Every key has a default, so a YAML holding only the interface keys (``data.train``, ``model.arch``,
``method.name``, ...) is a valid config. Unknown keys and invalid values raise :class:`ConfigError`
naming the key and what is allowed, before any work starts. ``resolve`` fills the values that depend
on others (MoCo v1/v2 defaults, the data recipe) so the written ``config.yaml`` says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from unmix.pipeline.mix_config import UnmixConfig, for_trainer
from unmix.training import methods

# Backbones :func:`training.backbones.build_backbone` builds; here so that reading a config imports no torch.
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
_BOTTLENECK_ARCHS = ("resnet50", "resnet101", "resnet152", "wide_resnet50_2")  # block expansion 4


def feature_dim(arch: str, width: int = 64) -> int:
    """Width of ``arch``'s pooled feature (torchvision's ``fc.in_features``) at ``width`` base channels."""
    return 8 * width * (4 if arch in _BOTTLENECK_ARCHS else 1)


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds an invalid value."""


@dataclass
class DataConfig:
    # shard directory (or manifest.json) of the training split, or a list of them read as one training set
    # (same crop and recipe; e.g. STL-10's [train, unlabeled]); only the labelled ones feed the kNN bank
    train: str | list[str] = ""
    val: str = ""  # shard directory of the validation split (the kNN monitor's queries; "" = no monitor)
    device: Literal["gpu", "cpu"] = "gpu"  # where DALI decodes and augments
    crop: int = 224  # side of the square views; <= 64 selects the small-image ResNet stem
    threads: int = 4  # DALI CPU threads per process
    recipe: str = ""  # loader augmentation (pipeline/augment.py RECIPES); "" = the method's own
    source: Literal["dali", "synthetic"] = "dali"  # synthetic: random images made on the device (benchmarks)
    synthetic_samples: int = 1_281_167  # epoch size of data.source=synthetic (ImageNet-1k train)
    # reader / nvJPEG decoder (unmix.pipeline.decoding.DecoderOptions; paddings: DALI's ImageNet example)
    hw_decoder_load: float = 0.9  # share of each batch decoded by the GPU's hardware JPEG engines (gpu)
    device_memory_padding: int = 211_025_920  # bytes nvJPEG's device buffers grow by (gpu)
    host_memory_padding: int = 140_544_512  # bytes nvJPEG's pinned host buffers grow by (gpu)
    dont_use_mmap: bool = False  # read() the tars instead of mmap: for network filesystems


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # torchvision ResNet name or resnet10
    small_images: bool | None = None  # force the CIFAR stem on/off; None = automatic from data.crop
    width: int = 64  # base channels of the ResNet (torchvision: 64); narrower trunks for CPU runs
    channels_last: bool | None = None  # None = on for CUDA, off on the CPU


@dataclass
class MocoConfig:
    K: int = 65536  # queue length (negatives)
    m: float = 0.999  # momentum of the key encoder
    T: float | None = None  # InfoNCE temperature; None = 0.2 (v2) or 0.07 (v1)
    mlp: bool | None = None  # MLP projection head; None = True (v2) or False (v1)
    dim: int = 128  # embedding dimension
    hidden_dim: int | None = None  # hidden width of the MLP head; None = the backbone's feature width
    symmetric: bool = False  # loss in both directions (the paper's CIFAR runs)
    shuffle_bn: bool = True  # Shuffle-BN across ranks for the key encoder
    bn_splits: int | None = (
        None  # one process with shuffle_bn: BN groups of the batch; None = auto (8), 0/1 off
    )
    sync_bn: bool = False  # SyncBatchNorm in the query encoder instead (CUDA only)


@dataclass
class ByolConfig:
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    tau_base: float = 0.996  # EMA momentum at step 0; cosine schedule to 1 at the end
    sync_bn: bool = True  # SyncBatchNorm on several CUDA processes
    mix_targets: Literal["both", "view2"] = "both"  # clean targets the mixture is regressed onto


@dataclass
class SimclrConfig:
    T: float = 0.1  # NT-Xent temperature (SimCLR ImageNet: 0.1; CIFAR-10: 0.5)
    proj_hidden_dim: int | None = None  # hidden width of the projection MLP; None = the backbone's width
    proj_dim: int = 128  # embedding dimension (SimCLR: 128)
    sync_bn: bool = True  # SyncBatchNorm on several CUDA processes (SimCLR's global BN)


@dataclass
class MethodConfig:
    name: str = "moco_v2"  # a name in training/methods.py METHODS: moco_v2, moco_v1, byol, simclr
    moco: MocoConfig = field(default_factory=MocoConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch, over all processes and accumulation steps
    grad_accum: int = 1  # gradient accumulation steps per optimizer step
    lr: float = 0.03  # per 256 images; the run uses lr * batch_size / 256
    optimizer: Literal["sgd", "lars"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0  # linear warm-up from 0, then cosine to 0
    schedule: Literal["cosine", "step", "constant"] = "cosine"  # step: x0.1 at each milestone (MoCo v1)
    milestones: list = field(default_factory=lambda: [120, 160])  # epochs, for schedule: step
    lars_eta: float = 0.001  # LARS trust coefficient
    lars_exclude_bias_norm: bool = True  # biases and norm parameters: no LARS adaptation, no weight decay


@dataclass
class MlflowConfig:
    enabled: bool = True
    experiment: str = "unmix"
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir parent>/mlflow.db
    run_name: str = ""  # "" = the output directory's name
    system_metrics: bool = True


@dataclass
class DeepspeedConfig:
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: int = 0  # 0, 1 or 2; 3 is refused (it partitions parameters, breaking the EMA target)
    gradient_clipping: float = 0.0  # 0 = off, as in the papers (DeepSpeed's own default is 1.0)
    config: dict = field(default_factory=dict)  # passed through into the DeepSpeed config (wins)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_epochs: int = 1  # 0 = off; a checkpoint is also written at the end and on SIGUSR1/SIGTERM
    keep: int = 2  # complete checkpoints kept (the newest ones)
    signal_check_every: int = 10  # steps between the ranks' all-reduce of a SIGUSR1/SIGTERM flag (1 = every)


@dataclass
class LogConfig:
    every_steps: int = 10  # metrics to MLflow and the progress line
    progress: Literal["auto", "tqdm", "lines", "off"] = "auto"  # auto: tqdm on a terminal, lines otherwise


@dataclass
class EvalConfig:
    """The kNN monitor during pretraining (:mod:`training.knn_monitor`); it reads ``data.val``."""

    knn_every_epochs: int = 0  # weighted-kNN top-1 on data.val every N epochs and at the last; 0 = off
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
    seed: int = 0
    output_dir: str = "runs/pretrain"
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    deepspeed: DeepspeedConfig = field(default_factory=DeepspeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
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
            except ConfigError:
                pass
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=0.1", "unmix.enabled=true"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.epochs=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else "")
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
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    tree = merge(tree, parse_overrides(overrides or []))
    try:
        cfg = _build(Config, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    return resolve(cfg)


def from_dict(tree: dict) -> Config:
    """A Config from a nested dict (e.g. a resolved config stored in a checkpoint)."""
    return resolve(_build(Config, tree, ""))


# ------------------------------------------------------------------------------------------- resolving


def resolve(cfg: Config) -> Config:
    """Fill the values that depend on others and check cross-key constraints (world-size-free)."""
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: invalid value {cfg.model.arch!r}; allowed: {', '.join(ARCHS)}")
    if cfg.model.width < 8 or cfg.model.width % 8:
        raise ConfigError(f"model.width: invalid value {cfg.model.width!r}; must be a positive multiple of 8")
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
    positive = {
        "data.crop": cfg.data.crop,
        "data.threads": cfg.data.threads,
        "data.synthetic_samples": cfg.data.synthetic_samples,
        "optim.epochs": cfg.optim.epochs,
        "optim.batch_size": cfg.optim.batch_size,
        "optim.grad_accum": cfg.optim.grad_accum,
        "method.moco.K": moco.K,
        "method.moco.dim": moco.dim,
        "method.moco.hidden_dim": moco.hidden_dim,
        "method.byol.proj_hidden_dim": cfg.method.byol.proj_hidden_dim,
        "method.byol.proj_dim": cfg.method.byol.proj_dim,
        "method.byol.pred_hidden_dim": cfg.method.byol.pred_hidden_dim,
        "method.simclr.T": simclr.T,
        "method.simclr.proj_hidden_dim": simclr.proj_hidden_dim,
        "method.simclr.proj_dim": simclr.proj_dim,
        "log.every_steps": cfg.log.every_steps,
        "checkpoint.keep": cfg.checkpoint.keep,
        "checkpoint.signal_check_every": cfg.checkpoint.signal_check_every,
        "eval.knn_k": cfg.eval.knn_k,
        "eval.knn_t": cfg.eval.knn_t,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: invalid value {value!r}; must be > 0")
    nonneg = {
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
        "deepspeed.gradient_clipping": cfg.deepspeed.gradient_clipping,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.every_epochs": cfg.checkpoint.every_epochs,
        "data.device_memory_padding": cfg.data.device_memory_padding,
        "data.host_memory_padding": cfg.data.host_memory_padding,
        "eval.knn_every_epochs": cfg.eval.knn_every_epochs,
        "method.moco.bn_splits": moco.bn_splits or 0,
    }
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{key}: invalid value {value!r}; must be >= 0")
    unit = {
        "data.hw_decoder_load": cfg.data.hw_decoder_load,
        "method.moco.m": moco.m,
        "method.byol.tau_base": cfg.method.byol.tau_base,
        "optim.momentum": cfg.optim.momentum,
    }
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: invalid value {value!r}; must be in [0, 1]")
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
    if moco.T <= 0:
        raise ConfigError(f"method.moco.T: invalid value {moco.T!r}; must be > 0")
    return cfg


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
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def diff(old: dict, new: dict, ignore: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[str]:
    """Flattened keys whose values differ between two resolved configs, skipping ``ignore`` prefixes."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if a.get(k) != b.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in ignore)
    ]
