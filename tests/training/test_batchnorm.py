"""SplitBatchNorm (Shuffle-BN on one process): per-split statistics equal a naive per-split loop, the key
encoder's output for a sample depends only on its own split, the shuffle spreads samples over splits,
and the conversions back to plain BatchNorm2d keep a torchvision state_dict."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from unmix.training import moco
from unmix.training.backbones import build_backbone
from unmix.training.batchnorm import SplitBatchNorm2d, num_splits, plain_batchnorm, split_batchnorm
from unmix.training.config import ConfigError, MocoConfig, load_config
from unmix.training.heads import Network


def _bn(C: int = 3, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, 0.0, None])
def test_split_bn_equals_a_naive_per_split_loop(channels_last, momentum):
    N, C, S = 12, 3, 4
    bn = _bn(C, momentum)
    split = split_batchnorm(copy.deepcopy(bn), S)
    assert isinstance(split, SplitBatchNorm2d) and split.num_splits == S
    x = torch.randn(N, C, 5, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_in = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = split(x_in)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last

    # Reference: split s = samples s, s+S, ... (the authors' view(-1, C*S, H, W)); each split normalised
    # by its own BatchNorm2d; the running statistics are the mean of the splits' updated copies.
    ref, means, vars_ = torch.empty_like(x), [], []
    for s in range(S):
        bn_s = copy.deepcopy(bn)
        ref[s::S] = bn_s(x[s::S])
        means.append(bn_s.running_mean)
        vars_.append(bn_s.running_var)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(vars_).mean(0))
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)

    split.eval()  # eval: the running statistics, exactly BatchNorm2d
    bn_eval = copy.deepcopy(bn).eval()
    bn_eval.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), bn_eval(x))


@pytest.mark.gpu
def test_split_bn_on_cuda_channels_last_matches_the_cpu():
    split = split_batchnorm(_bn(), 4)
    x = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    cpu = copy.deepcopy(split)
    y_cpu = cpu(x)
    gpu = copy.deepcopy(split).cuda()
    y = gpu(x.cuda().contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.running_mean.cpu(), cpu.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, rtol=1e-4, atol=1e-5)


def test_split_bn_refuses_a_batch_it_cannot_split():
    with pytest.raises(
        ValueError, match=r"batch of 6 is not divisible by 4 splits \(method.moco.bn_splits\)"
    ):
        split_batchnorm(_bn(), 4)(torch.randn(6, 3, 2, 2))


def _key_encoder(splits: int) -> Network:
    torch.manual_seed(0)
    cfg = MocoConfig(K=16, dim=8, hidden_dim=16)
    return split_batchnorm(moco.build_online(build_backbone("resnet10", crop=16, width=8), cfg), splits)


@torch.no_grad()
def test_key_encoder_output_depends_only_on_its_split():
    N, S = 8, 4
    enc = _key_encoder(S).train()
    x = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    k = enc.embed(x)
    # the reversed batch keeps every group's members (group s <-> S-1-s), so z_m.flip(0) is a forward of
    # the reversed mixtures, as with plain BN
    torch.testing.assert_close(enc.embed(x.flip(0)), k.flip(0), rtol=1e-5, atol=1e-5)
    same_split, other = x.clone(), x.clone()
    other[[1, 2, 3, 5, 6, 7]] = torch.randn(6, 3, 16, 16)  # every sample outside sample 0's split {0, 4}
    torch.testing.assert_close(enc.embed(other)[[0, 4]], k[[0, 4]], rtol=1e-5, atol=1e-5)
    same_split[4] = torch.randn(3, 16, 16)  # a sample inside it: sample 0's key changes
    assert not torch.allclose(enc.embed(same_split)[0], k[0], atol=1e-4)
    # and a plain BatchNorm encoder (no splits) mixes every sample's statistics into every key
    plain = plain_batchnorm(copy.deepcopy(enc))
    assert num_splits(plain) == 1
    assert not torch.allclose(plain.embed(other)[0], plain.embed(x)[0], atol=1e-4)


@torch.no_grad()
def test_one_process_shuffle_equals_a_naive_shuffled_per_split_loop():
    N, S = 8, 4
    enc = _key_encoder(S).train()
    plain = plain_batchnorm(copy.deepcopy(enc)).train()
    x = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    k = moco.shuffled_embed(enc, x, torch.Generator().manual_seed(7))

    perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))  # the same draw
    ref = torch.empty(N, 8)
    for s in range(S):
        members = perm[s::S]  # split s of the shuffled batch holds these input samples
        ref[members] = plain.embed(x[members])  # a plain BN over exactly that group
    torch.testing.assert_close(k, ref, rtol=1e-4, atol=1e-5)
    # the shuffle really regroups: the shuffled splits are not the unshuffled ones, and keys differ
    assert {frozenset(perm[s::S].tolist()) for s in range(S)} != {frozenset(range(N)[s::S]) for s in range(S)}
    assert not torch.allclose(k, enc.embed(x), atol=1e-4)


def test_bn_splits_chosen_on_one_process_with_shuffle_bn_only():
    cfg = MocoConfig()
    assert cfg.bn_splits is None and moco.bn_splits(cfg, world=1, micro_batch=64) == 8  # automatic
    # automatic: 8 groups where 8 divides the batch, else the most groups of >= 2 images below 8, else off
    assert [moco.bn_splits(cfg, 1, b) for b in (12, 8, 4, 6, 2, 7)] == [6, 4, 2, 3, 1, 1]
    assert moco.bn_splits(cfg, world=2, micro_batch=64) == 1  # several ranks: the real Shuffle-BN
    assert moco.bn_splits(MocoConfig(shuffle_bn=False), world=1, micro_batch=64) == 1
    for off in (0, 1):
        assert moco.bn_splits(MocoConfig(bn_splits=off), world=1, micro_batch=6) == 1
    with pytest.raises(ConfigError, match="method.moco.bn_splits: a batch of 12 image"):
        moco.bn_splits(MocoConfig(bn_splits=8), world=1, micro_batch=12)  # explicit: divides or fails
    with pytest.raises(ConfigError, match="method.moco.bn_splits: invalid value -1"):
        load_config(None, ["method.moco.bn_splits=-1"])
    # the multi-rank path keeps plain BatchNorm2d (the query encoder is untouched)
    online = moco.build_online(build_backbone("resnet10", crop=16, width=8), MocoConfig(hidden_dim=16))
    assert moco.split_bn(online, cfg, world=2, micro_batch=64) is online
    assert num_splits(online) == 1


def test_conversions_keep_a_torchvision_state_dict():
    backbone = build_backbone("resnet18", crop=32, width=8)
    reference = copy.deepcopy(backbone.state_dict())
    split = split_batchnorm(copy.deepcopy(backbone), 8)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in split.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in backbone.modules()
    )
    back = plain_batchnorm(split)
    assert all(type(m) is not SplitBatchNorm2d for m in back.modules())
    state = back.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(backbone))
    assert all(type(m) is not nn.SyncBatchNorm for m in plain_batchnorm(sync).modules())
    assert split_batchnorm(backbone, 1) is backbone and split_batchnorm(backbone, 0) is backbone


_ONE_PROCESS_RUN = """
import json, sys, types
import torch
from unmix.training.batchnorm import SplitBatchNorm2d, num_splits
from unmix.training.bench_train import MemoryLoader
from unmix.training.config import load_config
from unmix.training.loop import _export_backbone, setup, train_step
from pathlib import Path

cfg = load_config(None, [
    "data.device=cpu", "data.crop=16", "model.arch=resnet10", "model.width=8", "optim.batch_size=8",
    "deepspeed.precision=fp32", "mlflow.enabled=false", "method.moco.K=32", "method.moco.dim=8",
    "method.moco.bn_splits=4", "unmix.enabled=true", "method.moco.symmetric=true",
])
g = torch.Generator().manual_seed(0)
x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
batch = {"view1": x1, "view2": x2, "mixed": 0.3 * x1 + 0.7 * x1.flip(0), "lam": torch.full((8,), 0.3)}
run = setup(cfg, loader_factory=lambda *a: MemoryLoader([batch]))
loss, _, _ = train_step(run, batch, 0, 0.01, 0.9)
out = Path(sys.argv[1])
path = _export_backbone(run, out, types.SimpleNamespace(run_id=None, uri=""))
saved = torch.load(path, weights_only=True)
json.dump({
    "online_splits": num_splits(run.engine.module), "target_splits": num_splits(run.method.target),
    "hidden_dim": run.engine.module.head[0].out_features, "loss": float(loss),
    "exported_keys": sorted(saved["state_dict"]), "meta_feature_dim": saved["meta"]["feature_dim"],
}, open(out / "result.json", "w"))
"""


def test_one_process_run_uses_split_bn_and_exports_a_plain_resnet(tmp_path):
    """The loop's wiring: both encoders split, a step runs, backbone.pt loads as a plain ResNet."""
    import json
    import os
    import subprocess
    import sys

    from unmix.training.backbone_file import load_backbone

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", _ONE_PROCESS_RUN, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["online_splits"] == r["target_splits"] == 4
    assert r["hidden_dim"] == r["meta_feature_dim"] == 64  # null = the backbone's width (resnet10, width 8)
    reference = build_backbone("resnet10", crop=16, width=8).state_dict()
    assert r["exported_keys"] == sorted(reference)
    net, _ = load_backbone(tmp_path / "backbone.pt")
    assert all(type(m) is nn.BatchNorm2d for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert math.isfinite(r["loss"])
