"""SimCLR + Un-Mix held to references written from the paper (Chen et al. 2020, Algorithm 1 / eq. 1):

- NT-Xent against a naive per-anchor loop (loss and gradients, several temperatures) and an analytic value;
- the Un-Mix term against a naive reference at lam = 0, 0.37, 1 and per sample;
- two gloo ranks (gradient-carrying gather, gradients averaged as DeepSpeed does) against one process on
  the concatenated batch, loss and gradients; a plain (gradient-cutting) gather fails the same check;
- the trainer's step in lockstep with a plain-PyTorch SimCLR + Un-Mix step (same weights, same batches);
- the SimCLR recipes and configs.
"""

from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unmix.training.fidelity import paper_simclr_loss
from unmix.training.losses import nt_xent, nt_xent_unmix

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ------------------------------------------------------------------------------------ naive references


def naive_anchor_loss(anchor: torch.Tensor, positive: int, candidates: torch.Tensor, own: int, T: float):
    """``-log(exp(s(anchor, c_pos) / T) / sum_{k != own} exp(s(anchor, c_k) / T))``, cosine similarity."""
    terms = []
    for k in range(candidates.shape[0]):
        if k == own:
            continue
        terms.append(torch.exp(F.cosine_similarity(anchor, candidates[k], dim=0) / T))
    pos = torch.exp(F.cosine_similarity(anchor, candidates[positive], dim=0) / T)
    return -torch.log(pos / torch.stack(terms).sum())


def naive_pair_losses(a: torch.Tensor, b: torch.Tensor, T: float, partner=None) -> torch.Tensor:
    """Per pair i: mean of l(a[i] -> b[j]) and l(b[j] -> a[i]) with j = partner[i] (default i), over the
    2N candidates ``[a; b]`` (the anchor itself excluded): the paper's eq. 1, one anchor at a time."""
    n = a.shape[0]
    cand = torch.cat([a, b])
    out = []
    for i in range(n):
        j = i if partner is None else int(partner[i])
        la = naive_anchor_loss(a[i], n + j, cand, i, T)
        lb = naive_anchor_loss(b[j], i, cand, n + j, T)
        out.append((la + lb) / 2)
    return torch.stack(out)


def naive_nt_xent(a, b, T):
    """The paper's L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    return naive_pair_losses(a, b, T).mean()


def naive_unmix(z_m, z2, lam, T, partner=None):
    """``mean_i(lam_i L_i(z_m, z2) + (1 - lam_{p(i)}) L_i(z_m[p], z2))``: the reversed mixtures computed as
    their own NT-Xent over ``(z_m[p], z2)`` (p = the partner map, default the reversal)."""
    n = z_m.shape[0]
    p = torch.arange(n - 1, -1, -1) if partner is None else partner
    first = naive_pair_losses(z_m, z2, T)
    second = naive_pair_losses(z_m[p], z2, T)
    return (lam * first + (1 - lam[p]) * second).mean()


def _embeddings(n=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]


# -------------------------------------------------------------------------------------- NT-Xent itself


@pytest.mark.parametrize("T", [0.1, 0.5, 1.0])
def test_nt_xent_equals_a_naive_per_anchor_loop_loss_and_gradients(T):
    a, b, _ = _embeddings()
    ours = nt_xent(a, b, T).mean()
    ga, gb = torch.autograd.grad(ours, (a, b))
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = naive_nt_xent(a2, b2, T)
    ra, rb = torch.autograd.grad(ref, (a2, b2))
    # the loss computes in fp32 (as under autocast): compare at fp32 precision
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T", [0.1, 0.5])
def test_nt_xent_analytic_value_for_orthogonal_pairs(T):
    """Each pair identical, all pairs orthogonal: s_pos = 1, the 2N - 2 negatives 0, so every anchor's
    loss is log(1 + (2N - 2) exp(-1/T))."""
    n = 4
    e = torch.eye(n, 8)
    loss = nt_xent(e, e.clone(), T).mean()
    # fp32 logits of size 1/T: absolute precision ~1e-6
    assert float(loss) == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / T)), rel=1e-5, abs=1e-6)
    # and invariant to the embeddings' scale (cosine similarity)
    assert float(nt_xent(3 * e, 0.5 * e, T).mean()) == pytest.approx(float(loss), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("lam_value", [0.0, 0.37, 1.0])
def test_unmix_term_equals_naive_reference(lam_value):
    z_m, z2, _ = _embeddings(seed=1)
    lam = torch.full((6,), lam_value, dtype=torch.float64)
    ours = nt_xent_unmix(z_m, z2, lam, 0.2)
    g_ours = torch.autograd.grad(ours, (z_m, z2))
    zm2, z22 = z_m.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    ref = naive_unmix(zm2, z22, lam, 0.2)
    g_ref = torch.autograd.grad(ref, (zm2, z22))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for x, y in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    # with one lam per batch it is literally lam * L(z_m, z2) + (1 - lam) * L(z_m.flip(0), z2)
    literal = lam_value * naive_nt_xent(z_m, z2, 0.2) + (1 - lam_value) * naive_nt_xent(z_m.flip(0), z2, 0.2)
    assert ours.item() == pytest.approx(literal.item(), rel=1e-5)


def test_unmix_term_per_sample_lambda_pairs_each_mixture_with_its_partner():
    z_m, z2, _ = _embeddings(seed=2)
    lam = torch.tensor([0.1, 0.9, 0.37, 0.5, 0.0, 1.0], dtype=torch.float64)
    ours = nt_xent_unmix(z_m, z2, lam, 0.5)
    ref = naive_unmix(z_m, z2, lam, 0.5)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    wrong = naive_unmix(z_m, z2, lam.flip(0), 0.5)  # a mispairing would be visible
    assert abs(wrong.item() - ref.item()) > 1e-3


# ---------------------------------------------------------------------------------- two gloo ranks


W, N, D, C = 2, 4, 12, 6


def _global_inputs():
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(W * N, D, generator=g), torch.randn(W * N, D, generator=g)
    lam = torch.full((W * N,), 0.37)
    return x1, x2, lam


def _model():
    torch.manual_seed(3)
    return torch.nn.Linear(D, C)


def _local_mix(x1: torch.Tensor) -> torch.Tensor:
    """Each rank mixes view 1 with its own reversed batch (the pipeline's rule, per rank)."""
    return 0.37 * x1 + 0.63 * x1.flip(0)


def _rank_main(rank: int, port: int, out: str, gather_kind: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        from unmix.training.config import SimclrConfig
        from unmix.training.simclr import SimCLR

        x1, x2, lam = _global_inputs()
        mine = slice(rank * N, (rank + 1) * N)
        f = _model()
        outs = (f(x1[mine]), f(x2[mine]), f(_local_mix(x1[mine])))
        method = SimCLR(SimclrConfig(T=0.2))
        if gather_kind == "plain":  # a gather that cuts the gradient: what the tests must catch

            def plain(x):
                parts = [torch.empty_like(x) for _ in range(W)]
                dist.all_gather(parts, x.detach())
                return torch.cat(parts)

            import unmix.training.simclr as simclr_module

            simclr_module.gather_with_grad = plain
        loss, clean, mix = method.loss(outs, (), lam[mine])
        loss.backward()
        grads = [p.grad.clone() for p in f.parameters()]
        for gr in grads:  # DeepSpeed's data-parallel average
            dist.all_reduce(gr)
            gr /= W
        losses = torch.stack([loss.detach(), clean, mix])
        dist.all_reduce(losses)
        if rank == 0:
            torch.save({"losses": losses / W, "grads": grads}, out)
        dist.barrier()  # as unmix train's dist.shutdown: no rank leaves while another's collective runs
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path, gather_kind: str) -> dict:
    import torch.multiprocessing as mp

    out = str(tmp_path / f"{gather_kind}.pt")
    mp.spawn(_rank_main, args=(_free_port(), out, gather_kind), nprocs=W, join=True)
    return torch.load(out)


def _one_process_reference():
    """One process holding the whole batch: NT-Xent over all 2WN views; the reversed-mixture term pairs
    within each rank's slice (the pipeline's partner is per rank), computed by the naive loop."""
    x1, x2, lam = _global_inputs()
    f = _model()
    z1, z2 = f(x1), f(x2)
    z_m = f(torch.cat([_local_mix(x1[r * N : (r + 1) * N]) for r in range(W)]))
    partner = torch.cat([torch.arange(N - 1, -1, -1) + r * N for r in range(W)])
    clean = naive_nt_xent(z1, z2, 0.2)
    mix = naive_unmix(z_m, z2, lam, 0.2, partner)
    (clean + mix).backward()
    return torch.stack([clean + mix, clean, mix]).detach(), [p.grad for p in f.parameters()]


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    got = _two_ranks(tmp_path, "autograd")
    losses, grads = _one_process_reference()
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6)
    for g, r in zip(got["grads"], grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_a_gradient_cutting_gather_is_caught(tmp_path):
    got = _two_ranks(tmp_path, "plain")
    losses, grads = _one_process_reference()
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6)  # same forward
    assert any(
        not torch.allclose(g, r, rtol=1e-3, atol=1e-5) for g, r in zip(got["grads"], grads, strict=True)
    )


# ------------------------------------------------------------------- lockstep with a plain SimCLR step


def _tiny_simclr_cfg(extra=()):
    from unmix.training.config import load_config

    return load_config(
        None,
        [
            "method.name=simclr",
            "unmix.enabled=true",
            "deepspeed.precision=fp32",
            "data.device=cpu",
            "data.crop=16",
            "model.arch=resnet10",
            "model.width=8",
            "optim.batch_size=8",
            "optim.optimizer=sgd",
            "optim.weight_decay=1.0e-4",
            "mlflow.enabled=false",
            "method.simclr.T=0.5",
            "method.simclr.proj_dim=16",
            *extra,
        ],
    )


def _batches(n: int):
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(40 + s)
        x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
        lam = float(torch.rand((), generator=g))
        out.append(
            {
                "view1": x1,
                "view2": x2,
                "mixed": lam * x1 + (1 - lam) * x1.flip(0),
                "lam": torch.full((8,), lam),
            }
        )
    return out


def test_trainer_step_in_lockstep_with_a_plain_simclr_step(one_process):
    from unmix.training.bench_train import MemoryLoader
    from unmix.training.loop import setup, train_step

    cfg = _tiny_simclr_cfg()
    batches = _batches(8)
    run = setup(cfg, loader_factory=lambda *a: MemoryLoader(batches))
    plain = copy.deepcopy(run.engine.module).float()
    # lr 0.003: this width-8 network on noise images amplifies fp32 rounding differences step by step
    # (at 0.05 a 1e-7 difference grows 1000x in one step; at 0.01, one thread, it reaches 1e-4 by step 7),
    # which would test the chaos, not the step; a wrong term or gradient moves the loss by percents
    lr = 0.003
    opt = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    for step, b in enumerate(batches):
        loss, _, _ = train_step(run, b, step, lr, 0.0)
        z1, z2, z_m = plain(b["view1"], b["view2"], b["mixed"])
        ref = paper_simclr_loss(z1, z2, z_m, float(b["lam"][0]), 0.5)
        opt.zero_grad()
        ref.backward()
        opt.step()
        assert float(loss) == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), step
    for (name, p), q in zip(run.engine.module.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert run.method.target is None and run.method.state_dict() == {}


# -------------------------------------------------------------------------------- recipes and configs


def test_simclr_recipes():
    from unmix.pipeline.augment import RECIPES

    imagenet, cifar = RECIPES["simclr"].view1, RECIPES["simclr_cifar"].view1
    assert RECIPES["simclr"].view2 == imagenet and RECIPES["simclr_cifar"].view2 == cifar  # symmetric
    assert (imagenet.scale, imagenet.jitter, imagenet.p_jitter, imagenet.p_gray) == (
        (0.08, 1.0),
        (0.8, 0.8, 0.8, 0.2),
        0.8,
        0.2,
    )
    assert (imagenet.p_blur, imagenet.blur_sigma, imagenet.p_flip) == (0.5, (0.1, 2.0), 0.5)
    assert cifar.p_blur == 0.0 and cifar.jitter == (0.4, 0.4, 0.4, 0.1) and cifar.scale == (0.08, 1.0)


SIMCLR_IMAGENET = {
    "method.name": "simclr",
    "model.arch": "resnet50",
    "data.recipe": "simclr",
    "method.simclr.T": 0.1,
    "method.simclr.proj_hidden_dim": 2048,
    "method.simclr.proj_dim": 128,
    "optim.batch_size": 4096,
    "optim.lr": 0.3,
    "optim.optimizer": "lars",
    "optim.weight_decay": 1e-6,
    "optim.warmup_epochs": 10.0,
    "optim.schedule": "cosine",
    "optim.lars_exclude_bias_norm": True,
    "deepspeed.zero_stage": 0,
}
SIMCLR_CIFAR = {
    "method.name": "simclr",
    "model.arch": "resnet18",
    "data.crop": 32,
    "data.recipe": "simclr_cifar",
    "method.simclr.T": 0.5,
    "method.simclr.proj_hidden_dim": 512,
    "optim.batch_size": 512,
    "optim.lr": 1.0,
    "optim.epochs": 1000,
    "optim.optimizer": "lars",
    "optim.weight_decay": 1e-4,
    "optim.warmup_epochs": 10.0,
}
MOCOV1_IMAGENET = {
    "method.name": "moco_v1",
    "method.moco.T": 0.07,
    "method.moco.mlp": False,
    "data.recipe": "moco_v1",
    "optim.lr": 0.03,
    "optim.batch_size": 256,
    "optim.epochs": 200,
    "optim.schedule": "step",
    "optim.milestones": [120, 160],
    "optim.weight_decay": 1e-4,
}


@pytest.mark.parametrize(
    "stem, values",
    [
        ("imagenet_simclr", SIMCLR_IMAGENET),
        ("cifar10_simclr", SIMCLR_CIFAR),
        ("imagenet_mocov1", MOCOV1_IMAGENET),
    ],
)
def test_config_pairs_hold_their_recipes_and_differ_only_in_unmix(stem, values):
    from unmix.training.config import diff, flatten, load_config, to_dict

    base, mixed = load_config(CONFIGS / f"{stem}.yaml"), load_config(CONFIGS / f"{stem}_unmix.yaml")
    for cfg, enabled in ((base, False), (mixed, True)):
        flat = flatten(to_dict(cfg))
        assert {k: flat[k] for k in values} == values
        assert cfg.unmix.enabled is enabled and (cfg.unmix.p_mixup, cfg.unmix.alpha) == (0.5, 1.0)
    assert diff(to_dict(base), to_dict(mixed), ignore=("output_dir",)) == ["unmix.enabled"]
    text = (CONFIGS / f"{stem}_unmix.yaml").read_text()
    assert text.startswith("#") and "Where each value comes from" in text


# ------------------------------------------------------------------------- one Un-Mix settings object


def test_trainer_unmix_section_is_the_pipeline_settings_object():
    from unmix.pipeline.mix_config import UnmixConfig
    from unmix.training.config import ConfigError, load_config

    cfg = load_config(None, [])
    assert type(cfg.unmix) is UnmixConfig and cfg.unmix.enabled is False  # the trainer's default: off
    assert load_config(None, ["unmix.p_mixup=0.3"]).unmix == UnmixConfig(enabled=False, p_mixup=0.3)
    with pytest.raises(ConfigError, match="unmix.random_partner: not supported by the trainer"):
        load_config(None, ["unmix.enabled=true", "unmix.random_partner=true"])
    with pytest.raises(ConfigError, match="unmix.alpha: invalid value 0.0; must be > 0"):
        load_config(None, ["unmix.alpha=0"])
    with pytest.raises(ConfigError, match="unmix.per_sample_lambda: data.source=synthetic"):
        load_config(None, ["unmix.enabled=true", "unmix.per_sample_lambda=true", "data.source=synthetic"])


def test_per_sample_lambda_from_a_training_config_reaches_the_loss(sample_train):
    """unmix.per_sample_lambda=true: the DALI loader gives one lam per sample and the SimCLR step's
    mixture term equals the naive per-sample reference on the step's own embeddings."""
    from unmix.training.backbones import build_backbone
    from unmix.training.loop import build_loader
    from unmix.training.simclr import SimCLR, build_online

    cfg = _tiny_simclr_cfg(
        [f"data.train={sample_train}", "unmix.per_sample_lambda=true", "unmix.p_mixup=1.0", "data.threads=1"]
    )
    batch = next(iter(build_loader(cfg, 8, 0, 1)))
    lam = batch["lam"].float()
    assert lam.shape == (8,) and len(set(lam.tolist())) > 1  # one lam per sample
    torch.manual_seed(0)
    net = build_online(build_backbone("resnet10", crop=16, width=8), cfg.method.simclr)
    z1, z2, z_m = net(batch["view1"], batch["view2"], batch["mixed"])
    _, _, mix = SimCLR(cfg.method.simclr).loss((z1, z2, z_m), (), lam)
    ref = naive_unmix(z_m.detach().double(), z2.detach().double(), lam.double(), 0.5)
    assert mix.item() == pytest.approx(ref.item(), rel=1e-5)
