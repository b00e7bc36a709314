"""The DeepSpeed engine, configured from our config.

Precision: ``bf16`` uses DeepSpeed's ``torch_autocast`` mode (bf16 compute, fp32 weights in the module):
the weights the EMA target reads stay fp32, batch norm runs in fp32, and a client optimizer such as
LARS sees whole parameter tensors at ZeRO 0. Gradients are reduced across ranks in fp32 under ZeRO 1/2
too (DeepSpeed's default would reduce Conv/Linear gradients in bf16; see :func:`deepspeed_config`).
``fp16`` uses DeepSpeed's fp16 mode with dynamic loss
scaling (the module is cast to fp16, inputs are cast to match). ``fp32`` is plain.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

from unmix.training import lars
from unmix.training.config import Config, merge


def deepspeed_config(cfg: Config, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config dict; ``deepspeed.config`` entries are merged last (they win)."""
    ds: dict[str, Any] = {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        # DeepSpeed >= 0.19.3 defaults to clipping at 1.0; the papers' recipes do not clip.
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        # SGD and LARS are not DeepSpeed's own optimizers; ZeRO 1/2 only shard their (momentum) state.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.precision == "bf16":
        # DeepSpeed tags the parameters of Linear/Conv ("lower precision safe modules") to be reduced in
        # bf16 under ZeRO 1/2: 8 mantissa bits for a sum over every rank. An empty list keeps the
        # gradient reduction in fp32 (the parameters' dtype); compute stays bf16. A run that wants
        # DeepSpeed's default (half the reduce traffic) sets deepspeed.config.torch_autocast
        # .lower_precision_safe_modules to ["torch.nn.Linear", "torch.nn.Conv2d"].
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif cfg.deepspeed.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return merge(ds, copy.deepcopy(cfg.deepspeed.config))  # a copy: DeepSpeed may edit its config


def build_optimizer(cfg: Config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD (MoCo: weight decay on every parameter, as the original) or LARS (BYOL: not on biases/norms)."""
    o = cfg.optim
    if o.optimizer == "lars":
        groups = lars.param_groups(model, o.weight_decay, o.lars_exclude_bias_norm)
        return lars.LARS(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.lars_eta)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


def input_dtype(cfg: Config) -> torch.dtype:
    """The dtype the engine's module expects its inputs in (fp16 mode casts the module)."""
    return torch.float16 if cfg.deepspeed.precision == "fp16" else torch.float32


def build_engine(cfg: Config, model: nn.Module, micro_batch: int, lr: float):
    """``deepspeed.initialize`` on ``model`` with our optimizer; returns ``(engine, ds_config)``."""
    import deepspeed

    ds_config = deepspeed_config(cfg, micro_batch)
    optimizer = build_optimizer(cfg, model, lr)
    # DeepSpeed would set_device(LOCAL_RANK), an invalid ordinal when a task sees only its own GPU
    # (srun --gpus-per-task); ``device_rank`` makes it use the device the model is already on.
    device = next(model.parameters()).device
    args = argparse.Namespace(device_rank=device.index or 0) if device.type == "cuda" else None
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config


def set_lr(engine, lr: float) -> None:
    """Write this step's learning rate into every parameter group (the loop owns the schedule)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
