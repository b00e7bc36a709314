"""``model.channels_last``: the trainer sets up with DeepSpeed and takes steps on channels_last inputs
(straight from the loader, not copied again) and on NCHW inputs (converted by the loop).

Runs in a subprocess: ``setup`` initialises a process group and sets RANK/WORLD_SIZE in the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import math, torch
from unmix.training.bench_train import MemoryLoader
from unmix.training.config import load_config
from unmix.training.loop import _to_device, setup, train_step

g = torch.Generator().manual_seed(0)
x1, x2 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
nchw = {"view1": x1, "view2": x2, "mixed": 0.3 * x1 + 0.7 * x1.flip(0), "lam": torch.full((4,), 0.3)}
cl = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in nchw.items()}
overrides = [
    "unmix.enabled=true", "data.device=cpu", "data.crop=16", "model.arch=resnet10", "model.width=16",
    "optim.batch_size=4", "mlflow.enabled=false", "method.moco.K=64", "method.moco.dim=16",
    "method.moco.hidden_dim=32", "model.channels_last=true", "deepspeed.precision=fp32",
]
run = setup(load_config(None, overrides), loader_factory=lambda *a: MemoryLoader([cl]))
images = ("view1", "view2", "mixed")
moved = _to_device(cl, run)
assert all(moved[k] is cl[k] for k in images), "a channels_last input was copied again"
moved = _to_device(nchw, run)
assert all(moved[k].is_contiguous(memory_format=torch.channels_last) for k in images)
assert all(torch.equal(moved[k], nchw[k]) for k in images)
losses = [float(train_step(run, b, i, 0.1, 0.99)[0]) for i, b in enumerate([cl, nchw, cl])]
assert all(math.isfinite(v) for v in losses), losses
print("ok", losses)
"""


def test_channels_last_model_sets_up_and_steps():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
