"""The DeepSpeed config we generate, read by DeepSpeed itself: under bf16 autocast and ZeRO 1/2 the
gradients are reduced in fp32 (DeepSpeed's default reduces Conv/Linear gradients in bf16)."""

from __future__ import annotations

import torch
from torch import nn

from unmix.training import dist
from unmix.training.config import load_config
from unmix.training.engine import deepspeed_config


def _ds(stage: int, extra: list[str] = ()) -> dict:
    cfg = load_config(
        None, ["deepspeed.precision=bf16", f"deepspeed.zero_stage={stage}", "optim.batch_size=8", *extra]
    )
    return deepspeed_config(cfg, 8)


def test_bf16_config_keeps_the_reduction_in_fp32_as_deepspeed_reads_it():
    from deepspeed.runtime.config import DeepSpeedConfig

    for stage in (0, 1, 2):
        ds = DeepSpeedConfig(_ds(stage))
        assert ds.torch_autocast_enabled and ds.torch_autocast_dtype == torch.bfloat16
        assert ds.torch_autocast_lower_precision_safe_modules == []  # no module reduced in bf16
        assert ds.communication_data_type is None  # fp32 (engine: not fp16/bf16 mode)
    # the documented opt-in to DeepSpeed's bf16 reduction still works through deepspeed.config
    opt_in = '{"torch_autocast": {"lower_precision_safe_modules": ["torch.nn.Linear"]}}'
    ds = DeepSpeedConfig(_ds(2, [f"deepspeed.config={opt_in}"]))
    assert ds.torch_autocast_lower_precision_safe_modules == ["torch.nn.Linear"]


def test_zero_engine_reduces_gradients_in_fp32(monkeypatch):
    """A real ZeRO engine (one gloo rank) built from our config: its reduce buckets are fp32 only, and no
    parameter carries DeepSpeed's bf16 communication tag."""
    import deepspeed

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(dist._free_port()))
    try:
        dist.init("gloo")  # one group for both engines (DeepSpeed caches its groups per process group)
        for stage in (1, 2):
            model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds(stage))
            assert engine.zero_optimization_stage() == stage
            assert not any(hasattr(p, "comm_dtype") for p in engine.module.parameters())
            assert set(engine.optimizer.ipg_buckets) == {torch.float32}
            before = [p.detach().clone() for p in engine.module.parameters()]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = engine(torch.randn(8, 3, 8, 8)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
            assert any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters(), strict=True))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
