"""Linear evaluation: a linear classifier trained on the features of a frozen backbone.

The math works on feature batches ``(f [B, D], y [B])`` from any iterable, so it is tested on plain
tensors; :func:`run_linear` wires it to the DALI eval loaders, the process group and MLflow.

Per step (one rank's local batch, DDP averages the gradient over ranks)::

    f^    = (f - mu_B) / sqrt(var_B + eps)   # head_norm=bn only: BatchNorm1d without affine parameters
    logits = W f^ + b            # logits: B x C  (head_norm=none: f^ = f)
    loss   = CE(logits, y)       # mean over the batch
    W, b  <- SGD(lr(epoch), momentum, nesterov, weight_decay)

Validation counts top-1/top-5 hits per rank and all-reduces (hits, total), so with the eval loader's
exactly-once val sharding every sample is counted once. Training stops with
:class:`~unmix.eval.divergence.ProbeDivergedError` when the probe diverges or ends with a training loss
above 3 ln C (:mod:`unmix.eval.divergence`). ``protocol=logreg`` does not train here: it is
:mod:`unmix.eval.logreg`, on the features :func:`cached_features` extracts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from unmix.eval.distributed import DistContext, all_reduce_max, all_reduce_sum
from unmix.eval.divergence import DivergenceGuard, ProbeDivergedError
from unmix.eval.features import embed, extract_features, freeze
from unmix.eval.protocols import LinearProtocol, fixed

Batch = tuple[torch.Tensor, torch.Tensor]  # (features [B, D] float32, labels [B] int64)


class LinearClassifier(nn.Module):
    """``fc``: D -> C, weights N(0, 0.01), bias 0 (MoCo's ``main_lincls.py`` initialisation).

    ``head_norm="bn"`` puts ``BatchNorm1d(D, affine=False, eps=1e-6)`` in front of ``fc`` (MAE's linear
    probe): ``fc`` then acts on normalised features, batch statistics in training and the running
    statistics in eval mode. :meth:`folded` gives the equivalent single linear layer on raw features.
    """

    def __init__(self, feature_dim: int, num_classes: int, head_norm: str = "none") -> None:
        super().__init__()
        if head_norm not in ("bn", "none"):
            raise ValueError(f"head_norm={head_norm!r}: choose bn or none")
        self.head_norm = head_norm
        self.norm = (
            nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6) if head_norm == "bn" else nn.Identity()
        )
        self.fc = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(f))  # f: B x D -> logits: B x C

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """One ``nn.Linear`` on raw features equal to this head in eval mode (BN's running stats folded in).

        ``W' = W / sqrt(var + eps)``, ``b' = b - W' mu``: what to export or save as "the probe", so a
        consumer that applies only a linear layer to backbone features gets the evaluated classifier.
        """
        fc = nn.Linear(self.fc.in_features, self.fc.out_features).to(self.fc.weight.device)
        w, b = self.fc.weight.clone(), self.fc.bias.clone()
        if isinstance(self.norm, nn.BatchNorm1d):
            scale = (self.norm.running_var + self.norm.eps).rsqrt()  # scale: D
            w = w * scale
            b = b - w @ self.norm.running_mean
        fc.weight.copy_(w)
        fc.bias.copy_(b)
        return fc


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k capped at C): ``[len(ks)]``."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # top: B x kmax
    hit = top.eq(labels.view(-1, 1))  # hit: B x kmax
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).to(torch.int64)


class HeadScore(NamedTuple):
    """A head's score on a labelled set, over every rank's rows."""

    top1: float  # %
    top5: float  # %
    total: int  # rows counted, each once
    loss: float  # mean cross-entropy


@torch.no_grad()
def evaluate_head(head: nn.Module, batches: Iterable[Batch]) -> HeadScore:
    """Top-1 and top-5 accuracy (%), the sample count and the mean cross-entropy of ``head`` over every
    rank's batches."""
    was_training = head.training
    head.eval()
    device = next(head.parameters()).device
    # top-1 hits, top-5 hits, rows, summed cross-entropy: on the device, no sync; one all-reduce at the end
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for f, y in batches:
        logits = head(f)
        sums[:2] += topk_correct(logits, y).to(device)
        sums[2] += y.numel()
        sums[3] += F.cross_entropy(logits, y, reduction="sum").double()
    head.train(was_training)
    top1, top5, total, loss_sum = all_reduce_sum(sums).tolist()
    total = int(total)
    if total == 0:
        raise RuntimeError("validation set is empty")
    return HeadScore(100.0 * top1 / total, 100.0 * top5 / total, total, loss_sum / total)


def cached_batches(
    f: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[Batch]:
    """``steps`` shuffled batches of ``batch_size`` rows from cached features, wrapping around the end.

    Every rank runs the same ``steps`` (DDP needs equal step counts), so a rank with fewer rows wraps.
    """
    n = f.shape[0]
    if n == 0:
        raise RuntimeError("no training features on this rank")
    order = torch.randperm(n, generator=generator)
    need = steps * batch_size
    order = order.repeat(math.ceil(need / n))[:need].to(f.device)
    for s in range(steps):
        idx = order[s * batch_size : (s + 1) * batch_size]
        yield f[idx], y[idx]


def backbone_batches(
    backbone: nn.Module, loader: Iterable[dict[str, torch.Tensor]], device: torch.device, steps: int | None
) -> Iterator[Batch]:
    """Features of a frozen backbone on the loader's (augmented) image batches; at most ``steps`` batches.

    The loader is always run to the end of its epoch (batches past ``steps`` are read but not embedded),
    so that it resets cleanly for the next epoch.
    """
    for i, batch in enumerate(loader):
        if steps is None or i < steps:
            x = batch["image"].to(device, non_blocking=True)
            yield embed(backbone, x), batch["label"].to(device).long()


def check_labels(y: torch.Tensor, num_classes: int, where: str) -> None:
    """ValueError naming ``where`` when a label lies outside [0, num_classes) (before it reaches the loss,
    where CUDA would fail with a device-side assert and the CPU with an IndexError)."""
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"{where}: label {int(bad[0])} is outside the manifest's classes [0, {num_classes - 1}]"
        )


def checked(batches: Iterable[Batch], num_classes: int, where: str) -> Iterator[Batch]:
    """``batches`` with every label checked by :func:`check_labels` (one small sync per batch)."""
    for f, y in batches:
        check_labels(y, num_classes, where)
        yield f, y


@torch.no_grad()
def average_running_stats(head: nn.Module) -> None:
    """Average the head's BatchNorm running statistics over ranks, so every rank evaluates the same head."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in head.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(all_reduce_sum(m.running_mean) / dist.get_world_size())
            m.running_var.copy_(all_reduce_sum(m.running_var) / dist.get_world_size())


@dataclass
class LinearResult:
    """Final val accuracy and per-epoch history."""

    top1: float
    top5: float
    val_samples: int
    epochs: int
    val_loss: float = float("nan")  # mean cross-entropy on val
    history: list[dict[str, float]] = field(default_factory=list)
    head: nn.Module | None = None  # the trained classifier (unwrapped from DDP)
    lr: float | None = None  # the lr (per 256) the head trained with
    weight_decay: float | None = None  # the weight decay the head trained with
    # (lr, weight_decay) -> the held-out score of the search (None: the guard stopped it); empty: no search
    search: dict[tuple[float, float], HeadScore | None] = field(default_factory=dict)


def train_linear_head(
    head: nn.Module,
    proto: LinearProtocol,
    train_epoch: Callable[[int], Iterable[Batch]],
    steps_per_epoch: int,
    val_batches: Callable[[], Iterable[Batch]],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    num_classes: int | None = None,
) -> LinearResult:
    """Train ``head`` (wrapped in DDP by the caller when distributed) for ``proto.epochs`` epochs.

    ``train_epoch(e)`` yields the feature batches of epoch ``e`` (``steps_per_epoch`` of them);
    ``val_batches()`` yields this rank's val feature batches. Val is evaluated every
    ``proto.eval_every`` epochs and after the last; ``on_epoch`` receives each epoch's record.
    A diverging probe (:class:`~unmix.eval.divergence.DivergenceGuard`, ``num_classes`` defaults to the
    head's output width) raises :class:`~unmix.eval.divergence.ProbeDivergedError`.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params,
        lr=proto.lr_at(0),
        momentum=proto.momentum,
        nesterov=proto.nesterov,
        weight_decay=proto.weight_decay,
    )
    if num_classes is None:
        num_classes = getattr(head, "module", head).fc.out_features
    guard = DivergenceGuard(proto, num_classes)
    history: list[dict[str, float]] = []
    top1 = top5 = val_loss = float("nan")
    total = 0
    head.train()
    for epoch in range(proto.epochs):
        t0 = time.perf_counter()
        device = next(head.parameters()).device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of loss x batch size
        seen = 0
        for step, (f, y) in enumerate(train_epoch(epoch)):
            lr = proto.lr_at(epoch + step / max(steps_per_epoch, 1))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double() * y.numel()  # stays on the device: no sync per step
            seen += y.numel()
        n = torch.tensor(float(seen), dtype=torch.float64, device=device)
        loss_sum = all_reduce_sum(torch.stack([loss_sum, n]))
        train_loss = float(loss_sum[0] / loss_sum[1].clamp(min=1))
        guard.check_finite(epoch + 1, train_loss)  # before val: no accuracy of a non-finite head
        record = {
            "epoch": float(epoch + 1),
            "train_loss": train_loss,
            "lr": proto.lr_at(epoch),
            "epoch_s": time.perf_counter() - t0,
        }
        if (epoch + 1) % proto.eval_every == 0 or epoch + 1 == proto.epochs:
            average_running_stats(head)
            top1, top5, total, val_loss = evaluate_head(head, val_batches())
            record.update(val_top1=top1, val_top5=top5, val_loss=val_loss)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)  # logged and printed first: the curve of a diverging probe stays visible
        guard.check(epoch + 1, train_loss, record.get("val_top1"))
    guard.check_final(history[-1]["train_loss"], top1)
    return LinearResult(
        top1=top1,
        top5=top5,
        val_samples=total,
        val_loss=val_loss,
        epochs=proto.epochs,
        history=history,
        head=getattr(head, "module", head),
        lr=proto.lr,
        weight_decay=proto.weight_decay,
    )


def _wrap_ddp(head: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return head
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(head, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _loader_factory(
    proto: LinearProtocol, ctx: DistContext, make_loader: Callable[..., Any]
) -> Callable[[str, str], Any]:
    local_batch = max(1, proto.batch_size // ctx.world_size)

    def loader(shards: str, split: str) -> Any:
        return make_loader(
            shards,
            batch_size=local_batch,
            split=split,
            crop=proto.crop,
            device=proto.device,
            shard_id=ctx.rank,
            num_shards=ctx.world_size,
            seed=proto.seed,
            num_threads=proto.num_threads,
        )

    return loader


def cached_features(
    backbone: nn.Module,
    proto: LinearProtocol,
    ctx: DistContext,
    make_loader: Callable[..., Any],
    train_dir: str,
    val_dir: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(f_train, y_train, f_val, y_val)``: both splits through the val transform, once."""
    freeze(backbone).to(ctx.device)
    loader = _loader_factory(proto, ctx, make_loader)
    f_train, y_train = extract_features(backbone, loader(train_dir, "val"), ctx.device)
    f_val, y_val = extract_features(backbone, loader(val_dir, "val"), ctx.device)
    return f_train, y_train, f_val, y_val


def choose_hparams(
    f_train: torch.Tensor, y_train: torch.Tensor, num_classes: int, proto: LinearProtocol, ctx: DistContext
) -> tuple[LinearProtocol, dict[tuple[float, float], HeadScore | None]]:
    """``proto`` at the (lr, weight_decay) of ``proto.candidates()`` whose head, trained on train less a
    stratified, seeded held-out ``proto.holdout`` (logreg's split), has the lowest cross-entropy on the
    held-out rows (ties: the larger lr, then the larger decay), and each pair's held-out score (None: the
    guard stopped it). Raises ProbeDivergedError when the guard stopped every pair.

    The cross-entropy, not the top-1: a 10 % held-out part of a small train split moves top-1 in steps of
    one image, and among nine candidates the highest of those noisy numbers picks worse heads (0.2-0.6
    points lower on val on average on the digits sample, 2.2 at a seed: ``unmix bench probe --selection``,
    docs/benchmarks.md "Choosing lr and weight decay on held-out train")."""
    from unmix.eval.logreg import local_holdout

    held = local_holdout(y_train, proto.holdout, proto.seed)  # held: [N] bool, this rank's rows
    fit = (f_train[~held], y_train[~held])
    scores: dict[tuple[float, float], HeadScore | None] = {}
    for lr, wd in proto.candidates():
        candidate = fixed(proto, lr=lr, weight_decay=wd)
        try:
            r = sgd_probe(*fit, f_train[held], y_train[held], num_classes, candidate, ctx)
            scores[lr, wd] = HeadScore(r.top1, r.top5, r.val_samples, r.val_loss)
        except ProbeDivergedError:
            scores[lr, wd] = None
    trained = {pair: score for pair, score in scores.items() if score is not None}
    if not trained:
        lrs, wds = ({pair[i] for pair in scores} for i in (0, 1))
        raise ProbeDivergedError(
            f"linear probe diverged at every lr of lr_grid={','.join(f'{v:g}' for v in sorted(lrs))} "
            f"(weight_decay {','.join(f'{v:g}' for v in sorted(wds))}) on the held-out part of train: give "
            "smaller values (lr_grid=...). No accuracy is reported."
        )
    lr, wd = lowest_loss_pair({pair: score.loss for pair, score in trained.items()})
    return fixed(proto, lr=lr, weight_decay=wd), scores


def lowest_loss_pair(losses: dict[tuple[float, float], float]) -> tuple[float, float]:
    """The search's rule: the (lr, weight_decay) with the lowest held-out cross-entropy; ties: the larger
    lr, then the larger decay."""
    return max(losses, key=lambda pair: (-losses[pair], *pair))


def sgd_probe(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    proto: LinearProtocol,
    ctx: DistContext | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LinearResult:
    """An SGD protocol on this rank's cached ``f_train [N, D]``, scored on every rank's ``f_val``: the
    (lr, weight_decay) chosen on held-out train first (:func:`choose_hparams`) when ``proto`` has a grid,
    then the head trained on all of train with them. ``ctx``: None for one process on the features' device."""
    if ctx is None:
        ctx = DistContext.single(f_train.device)
    search: dict[tuple[float, float], HeadScore | None] = {}
    if proto.searches:
        proto, search = choose_hparams(f_train, y_train, num_classes, proto, ctx)
    local_batch = max(1, proto.batch_size // ctx.world_size)
    torch.manual_seed(proto.seed)  # same head initialisation on every rank (DDP also broadcasts it)
    head = LinearClassifier(f_train.shape[1], num_classes, proto.head_norm).to(ctx.device)
    steps = all_reduce_max(math.ceil(f_train.shape[0] / local_batch), ctx.device)
    gen = torch.Generator().manual_seed(proto.seed * 1000003 + ctx.rank)

    def train_epoch(epoch: int) -> Iterable[Batch]:
        return cached_batches(f_train, y_train, local_batch, steps, gen)

    def val_batches() -> Iterable[Batch]:
        return (
            (f_val[i : i + local_batch], y_val[i : i + local_batch])
            for i in range(0, f_val.shape[0], local_batch)
        )

    model = _wrap_ddp(head, ctx)
    result = train_linear_head(model, proto, train_epoch, steps, val_batches, on_epoch, num_classes)
    result.search = search
    return result


def linear_eval(
    backbone: nn.Module,
    num_classes: int,
    proto: LinearProtocol,
    ctx: DistContext,
    make_loader: Callable[..., Any],
    train_dir: str,
    val_dir: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LinearResult:
    """Linear evaluation of a frozen ``backbone`` on shards ``train_dir``/``val_dir`` (moco, byol).

    ``make_loader(shards, batch_size, split, ...)`` is :func:`unmix.pipeline.build_eval_loader` (injected so
    tests can pass another loader). ``features=augmented`` runs the backbone on augmented train batches
    every epoch (the paper's protocol); ``features=cached`` extracts train and val features once with the
    val transform and trains on those.
    """
    if not proto.is_sgd:
        raise ValueError(f"linear_eval trains the SGD protocols; protocol={proto.protocol} is eval.logreg")
    freeze(backbone).to(ctx.device)
    if proto.features == "cached":
        f_train, y_train, f_val, y_val = cached_features(
            backbone, proto, ctx, make_loader, train_dir, val_dir
        )
        check_labels(y_train, num_classes, train_dir)
        check_labels(y_val, num_classes, val_dir)
        return sgd_probe(f_train, y_train, f_val, y_val, num_classes, proto, ctx, on_epoch)

    loader = _loader_factory(proto, ctx, make_loader)
    torch.manual_seed(proto.seed)  # same head initialisation on every rank (DDP also broadcasts it)
    head = LinearClassifier(backbone.feature_dim, num_classes, proto.head_norm).to(ctx.device)
    model = _wrap_ddp(head, ctx)
    train_loader = loader(train_dir, "train")
    val_loader = loader(val_dir, "val")
    # DDP needs the same number of steps on every rank: the smallest loader length bounds the epoch
    steps = -all_reduce_max(-len(train_loader), ctx.device)

    def train_epoch(epoch: int) -> Iterable[Batch]:
        return checked(backbone_batches(backbone, train_loader, ctx.device, steps), num_classes, train_dir)

    def val_batches() -> Iterable[Batch]:
        return checked(backbone_batches(backbone, val_loader, ctx.device, None), num_classes, val_dir)

    return train_linear_head(model, proto, train_epoch, steps, val_batches, on_epoch, num_classes)
