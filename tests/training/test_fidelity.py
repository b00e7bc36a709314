"""Lockstep fidelity: ``unmix train``'s step against the authors' step, transcribed (training/fidelity.py).

The same initial weights go into the trainer (``loop.setup`` + ``loop.train_step``: the DeepSpeed engine,
fp32, on gloo) and into the plain-PyTorch transcription; both get the same batches — views, mixture, lam,
mode and box drawn by the authors' mixing code — the same learning rate and momentum per step and, with
SplitBatchNorm, the same key shuffle. For a few dozen steps their losses and their online and target
parameters must stay equal to float tolerance. Each mutant (a known way to get Un-Mix wrong, patched into
the trainer's code path) must make that comparison fail: the test can fail.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from unmix.pipeline.torch_mixing import MixDraw, mix
from unmix.training import byol, ema, loop, moco
from unmix.training.bench_train import MemoryLoader
from unmix.training.config import load_config
from unmix.training.fidelity import AuthorsMoCo, Embed, PaperBYOL, authors_mix, byol_tau

STEPS = 24
MUTANT_STEPS = 6  # each mutant shows by step 2; the clean pairs stay equal over STEPS
WD = 0.0005
CROP, SEED = 8, 3
# Float tolerance: fp32 sums in another order drift apart slowly (measured: losses to 1e-6..1e-4 relative,
# parameters to ~2e-4 of their largest entry after 24 steps); every mutant moves the losses by >= 7 % and
# the parameters by >= 50 % of their largest entry.
LOSS_RTOL, PARAM_RTOL = 1e-3, 1e-3


@dataclass(frozen=True)
class Case:
    name: str
    method: str  # moco_v2 | byol
    symmetric: bool = True
    bn_splits: int = 1
    batch: int = (
        8  # 16 where BN sees few samples (BYOL's heads, splits): small BN batches amplify float noise
    )
    # BYOL: 8. On 16 random 8x8 images its BatchNorms (a near-constant channel divides by a tiny batch
    # variance) amplify fp32 order differences chaotically after ~8 steps, by an amount that depends on the
    # CPU: max parameter difference 4.4e-6 at 8 steps, then 1e-2 at 10 and 16, 1e-3 at 24 on one 2-core
    # Xeon VM; 2e-4 at 24 on another. Every mutant shows by step 2 (MUTANT_STEPS).
    steps: int = STEPS


CASES = {
    c.name: c
    for c in (
        Case("moco_symmetric", "moco_v2", True),  # unmix_c10.py
        Case("moco_asymmetric", "moco_v2", False),  # the ImageNet builder + main_moco_unmix.py
        Case(
            "moco_symmetric_split_bn", "moco_v2", True, bn_splits=2, batch=16
        ),  # the same key shuffle on both
        Case("byol", "byol", batch=16, steps=8),
    )
}


def _batches(N: int) -> list[dict]:
    """Random views; the mixture, lam, mode and box by the authors' code (all modes occur)."""
    g, rng = torch.Generator().manual_seed(0), np.random.RandomState(0)
    out = []
    for _ in range(STEPS):
        v1, v2 = torch.randn(N, 3, CROP, CROP, generator=g), torch.randn(N, 3, CROP, CROP, generator=g)
        mixed, lam, mode, box = authors_mix(v1, rng)
        out.append({"view1": v1, "view2": v2, "mixed": mixed, "lam": torch.full((N,), lam), "mode": mode})
    assert {b["mode"] for b in out} == {"mixup", "cutmix"}
    return out


def _overrides(case: Case) -> list[str]:
    common = [
        "unmix.enabled=true", "data.device=cpu", f"data.crop={CROP}", "model.arch=resnet10", "model.width=8",
        f"optim.batch_size={case.batch}", "optim.lr=0.3", f"optim.weight_decay={WD}", "optim.optimizer=sgd",
        "mlflow.enabled=false", "deepspeed.precision=fp32", f"seed={SEED}", f"method.name={case.method}",
    ]  # fmt: skip
    if case.method == "byol":
        return common + [
            "method.byol.proj_hidden_dim=32", "method.byol.proj_dim=16", "method.byol.pred_hidden_dim=32",
            "method.byol.tau_base=0.9",
        ]  # fmt: skip
    return common + [
        "method.moco.K=64", "method.moco.dim=16", "method.moco.hidden_dim=32", "method.moco.m=0.9",
        "method.moco.T=0.2", f"method.moco.symmetric={str(case.symmetric).lower()}",
        f"method.moco.bn_splits={case.bn_splits}",
    ]  # fmt: skip


def lockstep(case: Case, steps: int | None = None) -> dict:
    """Run both for ``steps`` steps (default: the case's); return their losses and final parameters."""
    steps = case.steps if steps is None else steps
    batches = _batches(case.batch)[:steps]
    cfg = load_config(None, _overrides(case))
    run = loop.setup(cfg, loader_factory=lambda *a: MemoryLoader(batches))
    net = copy.deepcopy(run.engine.module)  # the same initial weights (the trainer's are untouched so far)
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    if case.method == "byol":
        ref = PaperBYOL(Embed(net), Embed(net, predictor=False))
    else:
        ref = AuthorsMoCo(Embed(net), run.method.queue.queue.clone(), cfg.method.moco.m, 0.2, case.symmetric)
    opt = torch.optim.SGD(ref.parameters(), lr=0.0, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    ours, theirs = [], []
    for step, batch in enumerate(batches):
        lr = run.base_lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # the same lr for both
        m = run.method.momentum(step, steps)
        loss, _, _ = loop.train_step(run, {k: v for k, v in batch.items() if k != "mode"}, step, lr, m)
        ours.append(float(loss))
        if case.method == "byol":
            assert m == pytest.approx(byol_tau(step, steps, cfg.method.byol.tau_base))
        else:  # the trainer's key-shuffle draws: generator seeded by (seed, step)
            ref.generator = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = lr
        ref_loss = ref(batch["view1"], batch["view2"], batch["mixed"], float(batch["lam"][0]))
        opt.zero_grad()
        ref_loss.backward()
        opt.step()
        if case.method == "byol":
            ref.update_target(m)
        theirs.append(float(ref_loss.detach()))
    if case.method == "byol":
        ref_target = ref.target
    else:  # theirs moves the key encoder at the start of a step, the trainer at the end: one more update
        ref._momentum_update_key_encoder()
        ref_target = ref.encoder_k
    return {
        "start": start,
        "losses": (ours, theirs),
        "online": (dict(run.engine.module.named_parameters()), dict(net.named_parameters())),
        "target": (dict(run.method.target.named_parameters()), dict(ref_target.net.named_parameters())),
    }


def assert_lockstep(result: dict) -> None:
    ours, theirs = result["losses"]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=LOSS_RTOL, atol=1e-5)
    for side in ("online", "target"):
        a, b = result[side]
        assert set(a) <= set(b), sorted(set(a) - set(b))
        for name, p in a.items():
            diff, scale = (p.detach() - b[name].detach()).abs().max().item(), b[name].abs().max().item()
            assert diff <= PARAM_RTOL * scale, (
                f"{side} {name}: differs by {diff:.3g} (largest entry {scale:.3g})"
            )


@pytest.mark.parametrize("name", sorted(CASES))
def test_trainer_step_equals_the_authors_step(name, one_process):
    result = lockstep(CASES[name])
    assert_lockstep(result)
    # and the tolerance is small against how far training moved the weights (not two frozen copies)
    online, _ = result["online"]
    moved = max((p.detach() - result["start"][k]).abs().max() / p.abs().max() for k, p in online.items())
    assert moved > 20 * PARAM_RTOL


def test_authors_mixing_equals_the_pipeline_rule():
    """The batches above follow the authors' mixing; the pipeline's torch rule makes the same mixture
    from the same draw (their box is ``[bbx1:bbx2, bby1:bby2]`` over (H, W): our (y1, x1, y2, x2))."""
    rng, x = np.random.RandomState(1), torch.randn(6, 3, 12, 12)
    for _ in range(40):
        mixed, lam, mode, box = authors_mix(x, rng)
        ours_box = None if box is None else (box[1], box[0], box[3], box[2])
        ours, ours_lam = mix(x, MixDraw(mode, lam, ours_box))
        torch.testing.assert_close(ours, mixed)
        torch.testing.assert_close(ours_lam, torch.full((6,), lam))


def _swap_views(mp):
    orig = {cls: cls.targets for cls in (moco.MoCo, byol.BYOL)}
    for cls, f in orig.items():
        mp.setattr(
            cls,
            "targets",
            lambda self, b, g, f=f: f(self, {**b, "view1": b["view2"], "view2": b["view1"]}, g),
        )


def _drop_reversed_mixture(mp):
    for mod in (moco, byol):
        mp.setattr(mod, "unmix_weighted", lambda loss_mix, loss_rev, lam: (lam.float() * loss_mix).mean())


def _ema_wrong_direction(mp):
    mp.setattr(loop, "update_momentum", lambda online, target, m: ema.update_momentum(online, target, 1 - m))


def _detach_mixture(mp):
    f = moco.info_nce_mixed_keys
    mp.setattr(moco, "info_nce_mixed_keys", lambda z_m, keys, queue, T: f(z_m.detach(), keys, queue, T))


def _enqueue_one_view(mp):
    mp.setattr(moco.MoCo, "gathered", lambda self, keys: keys[0])


MUTANTS = {
    "swapped_key": (_swap_views, ("moco_symmetric", "byol")),
    "missing_mixture_term": (_drop_reversed_mixture, ("moco_asymmetric", "byol")),
    "ema_wrong_direction": (_ema_wrong_direction, ("moco_symmetric", "byol")),
    "detached_gradient": (_detach_mixture, ("moco_asymmetric",)),
    "queue_enqueues_wrong_keys": (_enqueue_one_view, ("moco_symmetric",)),
}


PAIRS = [(m, c) for m, (_, cases) in sorted(MUTANTS.items()) for c in cases]


@pytest.mark.parametrize("mutant,case", PAIRS, ids=[f"{m}-{c}" for m, c in PAIRS])
def test_each_mutant_breaks_the_lockstep(mutant, case, one_process, monkeypatch):
    MUTANTS[mutant][0](monkeypatch)
    result = lockstep(CASES[case], steps=MUTANT_STEPS)
    with pytest.raises(AssertionError):
        assert_lockstep(result)
