"""SyncBatchNorm goes into the query/online encoder after the target copy: MoCo's key encoder keeps
per-rank BN (Shuffle-BN), BYOL's target syncs like its online network. Module types on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unmix.training import byol, moco, sync_bn
from unmix.training.backbones import build_backbone
from unmix.training.config import ByolConfig, MocoConfig


def _kinds(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("method", ["moco_v2", "byol"])
def test_conversion_after_the_target_copy(method):
    torch.manual_seed(0)
    backbone = build_backbone("resnet10", crop=16, width=8)
    if method == "byol":
        cfg = ByolConfig(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)
        online = byol.build_online(backbone, cfg)
        m = byol.BYOL(online, cfg, seed=0)
    else:
        cfg = MocoConfig(K=16, dim=8, hidden_dim=16, mlp=True, T=0.2)
        online = moco.build_online(backbone, cfg)
        m = moco.MoCo(online, cfg, seed=0)
    params = {id(p) for p in online.parameters()}
    online, m.target = sync_bn.convert(online, m.target, sync_target=sync_bn.sync_target_for(method))

    assert _kinds(online) == {nn.SyncBatchNorm}
    if method == "byol":
        assert _kinds(m.target) == {nn.SyncBatchNorm}
        assert all(b.momentum == 0.0 for b in m.target.modules() if isinstance(b, nn.SyncBatchNorm))
    else:
        assert _kinds(m.target) == {nn.BatchNorm2d}  # the key encoder is not synchronised
    assert {id(p) for p in online.parameters()} == params  # same tensors: the engine trains them
    assert all(not p.requires_grad for p in m.target.parameters())


def test_wanted_only_on_several_cuda_processes():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert sync_bn.wanted(True, 2, cuda)
    assert not sync_bn.wanted(True, 1, cuda)
    assert not sync_bn.wanted(True, 2, cpu)
    assert not sync_bn.wanted(False, 8, cuda)
