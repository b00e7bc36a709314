"""The reference linear probe (``unmix linear ... protocol=logreg``): CLIP's linear-probe protocol.

Features are extracted once with the eval transform (no augmentation), standardised with the training
split's per-dimension mean and standard deviation, and a multinomial logistic regression is fitted to
convergence by L-BFGS (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Appendix A.3). Objective, on ``n`` training rows::

    x^     = (x - mu) / sigma                      # x: D, mu/sigma from the training rows
    logits = W x^ + b                              # W: C x D, b: C
    J(W,b) = 1/n sum_i CE(logits_i, y_i) + l2/2 ||W||^2     # b not penalised

which is scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` (lbfgs, multinomial) on the same
standardised features. The L2 strength ``l2`` is chosen from a log grid by top-1 on a held-out part of the
training split (10 %, stratified by class, seeded; ties go to the lower held-out loss), fitted from the
strongest to the weakest ``l2`` each warm-started from the previous solution, then refitted on the whole
training split. Every full-batch loss/gradient is a sum over row chunks (``chunk_rows`` rows at a time), so
ImageNet's 1.28 M x 2048 features never materialise a 1.28 M x 1000 logit matrix.

Distributed: each rank keeps its own part of the features, computes the loss and gradient sums of its rows,
and all-reduces them, so every rank takes the same L-BFGS steps on the whole data's objective (the result
equals one process's up to the order of floating-point sums); the held-out split is drawn on the labels
of all ranks in rank order, as one process with the same rows would. Val hits are all-reduced: each val
image is counted once. Deterministic: no randomness beyond the seeded split, reductions in a fixed order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from unmix.eval.distributed import all_gather_rows, all_reduce_sum

DEFAULT_GRID = tuple(10.0**e for e in range(-6, 1))  # l2 on the mean loss: 1e-6 ... 1
DEFAULT_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class Standardiser:
    """Per-dimension ``mu`` and ``sigma`` (1 for a constant dimension): ``x^ = (x - mu) / sigma``."""

    mu: torch.Tensor  # mu: D
    sigma: torch.Tensor  # sigma: D

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / self.sigma  # x: B x D

    @classmethod
    def fit(cls, f: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Standardiser:
        """Mean and (population) standard deviation of the rows of ``f`` over every rank (float64 sums)."""
        d = f.shape[1]
        s1 = torch.zeros(d, dtype=torch.float64, device=f.device)
        s2 = torch.zeros(d, dtype=torch.float64, device=f.device)
        for i in range(0, f.shape[0], chunk_rows):
            x = f[i : i + chunk_rows].double()
            s1 += x.sum(0)
            s2 += (x * x).sum(0)
        n = torch.tensor([float(f.shape[0])], dtype=torch.float64, device=f.device)
        tot = all_reduce_sum(torch.cat([s1, s2, n]))
        s1, s2, n = tot[:d], tot[d : 2 * d], tot[2 * d]
        if n < 1:
            raise RuntimeError("logreg: no training features")
        mu = s1 / n
        var = (s2 / n - mu * mu).clamp(min=0.0)
        sigma = var.sqrt()
        sigma = torch.where(sigma > 1e-6 * (mu.abs() + 1.0), sigma, torch.ones_like(sigma))
        return cls(mu.float(), sigma.float())


class Objective:
    """The regularised mean cross-entropy ``J`` over this rank's rows ``(f [n, D], y [n])`` and every other
    rank's (all-reduced), and its gradient, computed chunk by chunk.

    Parameters are one tensor ``theta [C, D + 1]`` = ``[W | b]``; features are standardised on the fly.
    """

    def __init__(
        self,
        f: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        std: Standardiser,
        l2: float,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self.f, self.y, self.C, self.std, self.l2, self.chunk = f, y, num_classes, std, l2, chunk_rows
        n = torch.tensor([float(f.shape[0])], dtype=torch.float64, device=f.device)
        self.n = float(all_reduce_sum(n).item())
        if self.n < 1:
            raise RuntimeError("logreg: no training rows")

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J, dJ/dtheta)``: a float64 scalar and a float32 tensor shaped like ``theta``."""
        D = theta.shape[1] - 1
        W, b = theta[:, :D], theta[:, D]  # W: C x D, b: C
        grad = torch.zeros(theta.shape, dtype=torch.float64, device=theta.device)  # [dW | db] sums
        ce = torch.zeros(1, dtype=torch.float64, device=theta.device)
        for i in range(0, self.f.shape[0], self.chunk):
            x = self.std(self.f[i : i + self.chunk])  # x: B x D
            y = self.y[i : i + self.chunk]  # y: B
            logits = torch.addmm(b, x, W.t())  # logits: B x C
            logp = logits.log_softmax(1)
            ce -= logp.gather(1, y.view(-1, 1)).double().sum()
            g = logp.exp_()  # dCE/dlogits = softmax - onehot: B x C
            g[torch.arange(y.numel(), device=g.device), y] -= 1.0
            grad[:, :D] += (g.t() @ x).double()
            grad[:, D] += g.sum(0).double()
        tot = all_reduce_sum(torch.cat([ce, grad.flatten()]))
        ce, grad = tot[0] / self.n, tot[1:].view_as(grad) / self.n
        Wd = W.double()
        loss = ce + 0.5 * self.l2 * (Wd * Wd).sum()
        grad[:, :D] += self.l2 * Wd
        return loss, grad.float()

    def cross_entropy(self, theta: torch.Tensor) -> float:
        """Mean cross-entropy (no penalty) of ``theta`` on the rows."""
        saved, self.l2 = self.l2, 0.0
        try:
            return float(self(theta)[0])
        finally:
            self.l2 = saved


@dataclass
class FitInfo:
    """How one L-BFGS fit ended."""

    l2: float
    iterations: int
    evaluations: int
    loss: float  # J at the end (cross-entropy + penalty)
    grad_max: float  # max |dJ/dtheta| at the end
    converged: bool
    seconds: float


def lbfgs(
    objective: Objective,
    theta: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-6,
    history: int = 20,
) -> tuple[torch.Tensor, FitInfo]:
    """Minimise ``objective`` from ``theta`` with ``torch.optim.LBFGS`` (strong-Wolfe line search).

    Stops when ``max |grad| <= tol`` or ``max_iter`` iterations are done (``converged`` says which; a
    change of the loss below 1e-12 relative also counts as converged). Returns ``(theta, info)``.
    """
    t0 = time.perf_counter()
    theta = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=history,
        line_search_fn="strong_wolfe",
    )
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        loss, grad = objective(theta.detach())
        theta.grad = grad
        return loss  # float64: the line search compares losses at full precision

    opt.step(closure)
    iterations = int(opt.state[theta].get("n_iter", 0))
    loss, grad = objective(theta.detach())
    gmax = float(grad.abs().max())
    info = FitInfo(
        l2=objective.l2,
        iterations=iterations,
        evaluations=evaluations,
        loss=float(loss),
        grad_max=gmax,
        converged=gmax <= tol or (iterations < max_iter and evaluations < max_iter * 5 // 4),
        seconds=time.perf_counter() - t0,
    )
    return theta.detach(), info


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask over ``labels [N]``: per class ``round(n_c * fraction)`` seeded random rows are held out
    (at least one where the class has two or more rows, so every class is seen on both sides)."""
    y = labels.cpu().numpy()
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(len(idx) * fraction))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1) if len(idx) else 0
        mask[rng.choice(idx, size=k, replace=False)] = True
    return torch.from_numpy(mask)


def local_holdout(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """This rank's part of the held-out mask drawn on every rank's labels in rank order."""
    all_y = all_gather_rows(y)
    sizes = all_gather_rows(torch.tensor([y.shape[0]], device=y.device))
    rank = 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    lo = int(sizes[:rank].sum())
    return stratified_holdout(all_y, fraction, seed)[lo : lo + y.shape[0]].to(y.device)


@torch.no_grad()
def count_hits(
    theta: torch.Tensor, std: Standardiser, f: torch.Tensor, y: torch.Tensor, chunk_rows: int
) -> tuple[int, int, int, float]:
    """(top-1 hits, top-5 hits, rows, summed cross-entropy) of ``theta`` over every rank's ``(f, y)``."""
    from unmix.eval.linear import topk_correct

    D = theta.shape[1] - 1
    hits = torch.zeros(2, dtype=torch.int64, device=f.device)
    ce = torch.zeros(1, dtype=torch.float64, device=f.device)
    for i in range(0, f.shape[0], chunk_rows):
        logits = torch.addmm(theta[:, D], std(f[i : i + chunk_rows]), theta[:, :D].t())
        yy = y[i : i + chunk_rows]
        hits += topk_correct(logits, yy).to(f.device)
        ce += torch.nn.functional.cross_entropy(logits, yy, reduction="sum").double()
    n = torch.tensor([f.shape[0]], dtype=torch.int64, device=f.device)
    counts = all_reduce_sum(torch.cat([hits, n]))
    ce = all_reduce_sum(ce)
    return int(counts[0]), int(counts[1]), int(counts[2]), float(ce)


@dataclass
class LogregResult:
    """Val accuracy of the refitted probe, the chosen ``l2`` and how the search went."""

    top1: float
    top5: float
    val_samples: int
    l2: float
    train_loss: float  # mean cross-entropy of the final fit on all training rows (no penalty)
    fit: FitInfo  # the refit on all training rows
    search: list[dict[str, float]] = field(default_factory=list)  # per grid value: l2, holdout top1/loss
    head: nn.Linear | None = None  # the probe folded onto raw features: logits = head(f)
    seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return 0


def fold(theta: torch.Tensor, std: Standardiser) -> nn.Linear:
    """One ``nn.Linear`` on raw features equal to ``theta`` on standardised ones."""
    D = theta.shape[1] - 1
    W = theta[:, :D] / std.sigma  # W': C x D
    b = theta[:, D] - W @ std.mu
    fc = nn.Linear(D, theta.shape[0]).to(theta.device)
    with torch.no_grad():
        fc.weight.copy_(W)
        fc.bias.copy_(b)
    return fc


def _broadcast(theta: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        theta = theta.contiguous()
        dist.broadcast(theta, src=0)
    return theta


def logreg_eval(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    grid: Sequence[float] = DEFAULT_GRID,
    holdout: float = 0.1,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    on_fit: object = None,
) -> LogregResult:
    """CLIP's linear probe on this rank's part of cached features (see the module docstring).

    ``grid`` holds the candidate ``l2`` values (one value: no search). ``on_fit(record)``, if given, is
    called after each fit with ``{"l2", "holdout_top1", "holdout_loss", "iterations", "seconds"}`` (the
    refit has no holdout keys). Returns the val top-1/top-5 (%) over every rank.
    """
    t0 = time.perf_counter()
    if not grid:
        raise ValueError("logreg: the l2 grid is empty")
    if any(not (v >= 0 and math.isfinite(v)) for v in grid):
        raise ValueError(f"logreg: l2 values must be finite and >= 0, got {list(grid)}")
    y_train = y_train.long()
    std = Standardiser.fit(f_train, chunk_rows)
    D = f_train.shape[1]
    theta0 = torch.zeros(num_classes, D + 1, device=f_train.device)
    search: list[dict[str, float]] = []
    grid = sorted(set(float(v) for v in grid), reverse=True)  # strongest first: warm starts get easier
    chosen = grid[0]
    if len(grid) > 1:
        held = local_holdout(y_train, holdout, seed)
        fit_f, fit_y = f_train[~held], y_train[~held]
        ho_f, ho_y = f_train[held], y_train[held]
        best: tuple[float, float] | None = None
        theta = theta0
        for l2 in grid:
            obj = Objective(fit_f, fit_y, num_classes, std, l2, chunk_rows)
            theta, info = lbfgs(obj, theta, max_iter=max_iter, tol=tol)
            top1_hits, _, n_ho, ce_ho = count_hits(theta, std, ho_f, ho_y, chunk_rows)
            rec = {
                "l2": l2,
                "holdout_top1": 100.0 * top1_hits / max(n_ho, 1),
                "holdout_loss": ce_ho / max(n_ho, 1),
                "iterations": float(info.iterations),
                "seconds": info.seconds,
            }
            search.append(rec)
            if on_fit is not None:
                on_fit(rec)
            key = (rec["holdout_top1"], -rec["holdout_loss"])
            if best is None or key > best:
                best, chosen, theta0 = key, l2, theta
    obj = Objective(f_train, y_train, num_classes, std, chosen, chunk_rows)
    theta, info = lbfgs(obj, theta0, max_iter=max_iter, tol=tol)
    theta = _broadcast(theta)
    if on_fit is not None:
        on_fit({"l2": chosen, "iterations": float(info.iterations), "seconds": info.seconds})
    train_loss = obj.cross_entropy(theta)
    top1, top5, total, _ = count_hits(theta, std, f_val, y_val.long(), chunk_rows)
    if total == 0:
        raise RuntimeError("validation set is empty")
    return LogregResult(
        top1=100.0 * top1 / total,
        top5=100.0 * top5 / total,
        val_samples=total,
        l2=chosen,
        train_loss=train_loss,
        fit=info,
        search=search,
        head=fold(theta, std),
        seconds=time.perf_counter() - t0,
    )
