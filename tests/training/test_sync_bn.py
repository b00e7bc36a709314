"""SyncBatchNorm goes into the query/online encoder after the target copy: MoCo's key encoder keeps
per-rank BN (Shuffle-BN), BYOL's target syncs like its online network, SimCLR has no target. Module
types on CPU, built through the method registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unmix.training import methods, sync_bn
from unmix.training.backbones import build_backbone
from unmix.training.config import load_config


def _kinds(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


SMALL = [
    "model.arch=resnet10",
    "model.width=8",
    "data.crop=16",
    "method.moco.K=16",
    "method.moco.dim=8",
    "method.moco.hidden_dim=16",
    "method.byol.proj_hidden_dim=16",
    "method.byol.proj_dim=8",
    "method.byol.pred_hidden_dim=16",
    "method.simclr.proj_hidden_dim=16",
    "method.simclr.proj_dim=8",
]
# what each method's reference does with its target's BN (None: no target network)
TARGET_BN = {"moco_v2": nn.BatchNorm2d, "byol": nn.SyncBatchNorm, "simclr": None}


@pytest.mark.parametrize("method", sorted(TARGET_BN))
def test_conversion_after_the_target_copy(method):
    torch.manual_seed(0)
    cfg = load_config(None, [f"method.name={method}", *SMALL])
    backbone = build_backbone("resnet10", crop=16, width=8)
    online, m = methods.build(cfg, backbone, world=2, micro_batch=8, device="cpu")
    params = {id(p) for p in online.parameters()}
    online, m.target = sync_bn.convert(online, m.target, sync_target=m.sync_target)

    assert _kinds(online) == {nn.SyncBatchNorm}
    if TARGET_BN[method] is None:
        assert m.target is None
    else:
        assert _kinds(m.target) == {TARGET_BN[method]}  # MoCo's key encoder is not synchronised
        assert all(b.momentum == 0.0 for b in m.target.modules() if isinstance(b, nn.SyncBatchNorm))
        assert all(not p.requires_grad for p in m.target.parameters())
    assert {id(p) for p in online.parameters()} == params  # same tensors: the engine trains them


def test_wanted_only_on_several_cuda_processes():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert sync_bn.wanted(True, 2, cuda)
    assert not sync_bn.wanted(True, 1, cuda)
    assert not sync_bn.wanted(True, 2, cpu)
    assert not sync_bn.wanted(False, 8, cuda)
