"""The kNN monitor: weighted-kNN top-1 of the current backbone on ``data.val`` during pretraining.

What the authors' CIFAR code (``unmix_c10.py``'s ``test()``, after MoCo's CIFAR demo) and solo-learn do
every epoch: the backbone in eval mode embeds the training split (the memory bank, with the evaluation
transform, no augmentation) and the validation split; each validation image is classified by its
``eval.knn_k`` nearest training features, weighted exp(sim / ``eval.knn_t``) (k = 200, t = 0.1); the
top-1 accuracy is logged to MLflow as ``knn_top1`` at the current optimizer step. With
``eval.knn_at_start`` a fresh run also scores its initial (random) weights and logs them at step 0: the
run's own floor, from the same initialisation, that the curve has to rise above (a resumed run does not
repeat it). The floor is taken on a copy whose BatchNorm statistics are measured on the training images
through the evaluation transform (:func:`calibrate_batchnorm`): a trained network is evaluated with
statistics of its data, and the initial ones (mean 0, variance 1) describe no data. (On the
shifted-digits sample's 359 val digits, seeds 0-3, the calibrated floor read -3.6 to +1.7 points from
the uncalibrated one.)
With ``eval.knn_calibrate_bn`` every later score is taken the same way, so the curve and its floor differ
only in the weights (the running statistics of a trained network follow the augmented views, not the
evaluation transform; ``unmix bench learning`` and CI's learning guard score both ends so). Off by
default, as the authors' monitor reads the running statistics; it costs one more pass over the bank.

The same code computes ``unmix knn`` (:func:`unmix.training.knn.knn_evaluate`, data through
``build_eval_loader(split="val")``), so the monitor's value on a backbone equals ``unmix knn``'s on it.
It embeds in the dtype of the engine's parameters, without autocast: fp32 on fp32 and bf16 runs
(DeepSpeed's bf16 mode autocasts an fp32 module), like ``unmix knn`` on the exported backbone; fp16 on an
fp16 run (that mode casts the module).

Every rank embeds its own part of both splits and every validation image is counted once (checked
against the manifest), as in ``unmix knn``. The monitor never touches the training loader, the global
torch RNG or any parameter or BatchNorm statistic (eval mode, no gradient), and it keeps no state, so a
resumed run repeats an uninterrupted one bitwise. It runs every ``eval.knn_every_epochs`` epochs and
after the last; it is off when that is 0 or ``data.val`` is empty.

With ``data.train`` a list of shard sets, the memory bank is the labelled ones among them, read as one
(STL-10's ``[train, unlabeled]``: the 5,000 labelled training images, as in the data set's protocol); they
must share ``data.val``'s classes.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unmix.training.config import Config
from unmix.training.knn import KnnResult, knn_evaluate


class KnnMonitor:
    """Runs the kNN evaluation at the end of due epochs; loaders are built once, on first use."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world: int,
        device: torch.device,
        batch_size: int,
        make_loader: Callable[..., Any] | None = None,
    ):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.batch_size = batch_size
        self.every = cfg.eval.knn_every_epochs if cfg.data.val else 0
        self._make_loader = make_loader
        self._loaders: dict[str, Any] = {}
        if cfg.eval.knn_every_epochs and not cfg.data.val and rank == 0:
            print("[unmix] kNN monitor off: eval.knn_every_epochs is set, data.val is empty", file=sys.stderr)

    def bank_sets(self) -> str | list[str]:
        """The kNN memory bank: ``data.train``, or the labelled sets of a ``data.train`` list."""
        from unmix.pipeline.shards.manifest import read_manifest

        if not isinstance(self.cfg.data.train, list):
            return self.cfg.data.train
        labelled = [p for p in self.cfg.data.train if read_manifest(p).labeled]
        if not labelled:
            raise ValueError(
                "data.train: none of its shard sets has labels, so the kNN monitor has no memory bank; "
                "add a labelled set or set eval.knn_every_epochs=0"
            )
        return labelled if len(labelled) > 1 else labelled[0]

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, epoch: int) -> bool:
        """Whether the monitor runs after ``epoch`` (1-based count of finished epochs)."""
        return self.enabled and epoch > 0 and (epoch % self.every == 0 or epoch == self.cfg.optim.epochs)

    def at_start(self, step: int, backbone: nn.Module, tracker: Any) -> KnnResult | None:
        """With ``eval.knn_at_start``, on a fresh run (``step`` 0): the initial weights' kNN, logged at
        step 0 like :meth:`after_epoch`'s."""
        if not (self.enabled and self.cfg.eval.knn_at_start and step == 0):
            return None
        return self._report("init", step, self._calibrated(backbone), tracker)

    def after_epoch(self, epoch: int, step: int, backbone: nn.Module, tracker: Any) -> KnnResult | None:
        """If due: evaluate, log ``knn_top1`` (and ``knn_top5``) at ``step``, print it on rank 0."""
        if not self.due(epoch):
            return None
        if self.cfg.eval.knn_calibrate_bn:  # scored as the floor is
            backbone = self._calibrated(backbone)
        return self._report(f"epoch {epoch}", step, backbone, tracker)

    def _calibrated(self, backbone: nn.Module) -> nn.Module:
        """A copy with BatchNorm statistics of the bank, eval transform (:func:`calibrate_batchnorm`)."""
        return calibrate_batchnorm(backbone, self._loader("train"), self.device)

    def _report(self, when: str, step: int, backbone: nn.Module, tracker: Any) -> KnnResult:
        result = self.evaluate(backbone)
        tracker.log_metrics({"knn_top1": result.top1, "knn_top5": result.top5}, step=step)
        if self.rank == 0:
            print(
                f"[unmix] {when} knn top-1 {result.top1:.2f}% (k={self.cfg.eval.knn_k}, "
                f"t={self.cfg.eval.knn_t}, {result.total} val images)",
                file=sys.stderr,
                flush=True,
            )
        return result

    def _loader(self, split: str) -> Any:
        if split not in self._loaders:
            make = self._make_loader
            if make is None:
                from unmix.pipeline.loaders import build_eval_loader as make
            self._loaders[split] = make(
                self.bank_sets() if split == "train" else self.cfg.data.val,
                batch_size=self.batch_size,
                split="val",  # the evaluation transform for the bank too (the authors' memory_loader)
                crop=self.cfg.data.crop,
                device=self.cfg.data.device,
                shard_id=self.rank,
                num_shards=self.world,
                seed=self.cfg.seed,
                num_threads=self.cfg.data.threads,
            )
        return self._loaders[split]

    @torch.no_grad()
    def _features(self, backbone: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[n, D]`` float32 and labels ``[n]`` of this rank's part of ``split``."""
        dtype = next(backbone.parameters()).dtype  # fp16 on an fp16 run (module cast), else fp32
        feats, labels = [], []
        for batch in self._loader(split):
            x = batch["image"].to(self.device, dtype=dtype, non_blocking=True)
            feats.append(backbone(x).float().flatten(1))
            labels.append(batch["label"].to(self.device).long().reshape(-1))
        if not feats:
            return torch.zeros((0, backbone.feature_dim), device=self.device), torch.zeros(
                0, dtype=torch.long, device=self.device
            )
        return torch.cat(feats), torch.cat(labels)

    def evaluate(self, backbone: nn.Module) -> KnnResult:
        """kNN top-1/top-5 (%) of ``backbone`` (put in eval mode, restored after) on ``data.val``."""
        from unmix.pipeline.shards.manifest import read_manifest

        val = read_manifest(self.cfg.data.val)
        bank = self.bank_sets()
        bank = bank if isinstance(bank, list) else [bank]
        train = read_manifest(bank[0])
        for path in bank:
            if read_manifest(path).classes != val.classes:
                raise ValueError(
                    f"{path}: its classes differ from data.val's ({self.cfg.data.val}); the kNN bank and the "
                    "queries must share one class list"
                )
        was_training = backbone.training
        backbone.eval()  # BatchNorm: running statistics, which therefore do not move
        try:
            bank, bank_labels = self._features(backbone, "train")
            queries, labels = self._features(backbone, "val")
        finally:
            backbone.train(was_training)
        k, t = self.cfg.eval.knn_k, self.cfg.eval.knn_t
        result = knn_evaluate(queries, labels, bank, bank_labels, train.num_classes, k=k, t=t)
        if result.total != val.total:
            raise RuntimeError(
                f"{self.cfg.data.val}: the kNN monitor counted {result.total} samples, the manifest lists "
                f"{val.total}"
            )
        return result


@torch.no_grad()
def calibrate_batchnorm(backbone: nn.Module, loader: Any, device: torch.device) -> nn.Module:
    """A copy of ``backbone`` whose BatchNorm running statistics are the average over ``loader``'s batches
    (PyTorch's cumulative mode, ``momentum=None``; SplitBatchNorm as plain BatchNorm), averaged over ranks;
    ``backbone`` itself is not touched. The copy is returned in eval mode."""
    net = copy.deepcopy(backbone)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        if hasattr(m, "num_splits"):
            m.num_splits = 1  # SplitBatchNorm2d: the statistics of the whole batch
    dtype = next(net.parameters()).dtype
    net.train()
    for batch in loader:
        net(batch["image"].to(device, dtype=dtype, non_blocking=True))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for m in norms:
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf /= world
    return net.eval()
