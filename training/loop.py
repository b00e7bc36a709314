"""The pretraining loop: ``unmix train`` runs :func:`train`.

Read it top to bottom: set up (processes, model, target, engine, loader, resume, MLflow), then per step
(1) targets of the clean views, no gradient, (2) the engine's forward of the online network, (3) the
loss, backward, optimizer step, (4) the momentum update of the target, (5) the enqueue of the gathered
keys. The learning rate and the momentum come from per-step schedules computed here and passed in.

Host-device syncs stay out of the step: losses accumulate on the device
(:class:`~unmix.training.step_metrics.StepMetrics`) and are read (one sync) every ``log.every_steps``,
which is also when a non-finite loss is detected (the error names the first bad step, recorded on the
device). Every random draw of the loop (Shuffle-BN's permutation) comes from a generator seeded by
(seed, step), and the loader's own state is checkpointed beside the run's typed, versioned record
(:class:`~unmix.training.checkpoint_state.ClientState`), so a resumed run repeats an uninterrupted one
bitwise (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmix.pipeline.devices import local_cuda_device
from unmix.training import checkpoint, dist, methods, sync_bn
from unmix.training.atomic import write_text
from unmix.training.backbone_file import BackboneMeta, save_backbone
from unmix.training.backbones import build_backbone
from unmix.training.batchnorm import plain_batchnorm
from unmix.training.checkpoint_state import ClientState
from unmix.training.config import Config, ConfigError, check_world, diff, dump, flatten, from_dict, to_dict
from unmix.training.ema import update_momentum
from unmix.training.engine import build_engine, input_dtype, set_lr
from unmix.training.knn_monitor import KnnMonitor
from unmix.training.preemption import EXIT_REQUEUE, Preemption
from unmix.training.schedules import learning_rate
from unmix.training.step_metrics import StepMetrics
from unmix.training.tracking import Tracker


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class Run:
    """Everything :func:`setup` builds; :func:`train_step` and the benchmark use it."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    micro_batch: int
    engine: Any
    method: methods.Method
    loader: Any
    ds_config: dict
    steps_per_epoch: int = 0
    total_steps: int = 0
    base_lr: float = 0.0
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "pos": 0})


def backend_for(cfg: Config) -> str:
    """NCCL when the batches live on the GPU, gloo otherwise (CPU tensors)."""
    return "nccl" if cfg.data.device == "gpu" and torch.cuda.is_available() else "gloo"


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    """The CPU, or the visible CUDA device of this local rank (see :mod:`unmix.pipeline.devices`).

    On CUDA also turns on ``torch.backends.cudnn.benchmark``: every step has the same shapes (fixed crops,
    fixed micro-batch), so cuDNN's one-time search for the fastest convolution kernels pays off.
    """
    if cfg.data.device == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("data.device: gpu, but no CUDA device is visible; set data.device=cpu")
        torch.backends.cudnn.benchmark = True
        return local_cuda_device(local_rank)
    return torch.device("cpu")


def build_loader(cfg: Config, micro_batch: int, rank: int, world: int):
    if cfg.data.source == "synthetic":  # random images made on the device: no shards, no DALI
        from unmix.training.synthetic import build_synthetic_loader

        return build_synthetic_loader(cfg, micro_batch, rank, world)
    from unmix.pipeline.loaders import build_pretrain_loader

    return build_pretrain_loader(
        cfg.data.train,
        micro_batch,
        recipe=cfg.data.recipe,
        crop=cfg.data.crop,
        unmix=cfg.unmix,  # the pipeline's own settings object (off unless unmix.enabled)
        device=cfg.data.device,
        shard_id=rank,
        num_shards=world,
        seed=cfg.seed,
        num_threads=cfg.data.threads,
        # the model's layout straight from DALI (HWC viewed as NCHW): _to_device then copies nothing
        channels_last=_channels_last(cfg, torch.device("cuda" if cfg.data.device == "gpu" else "cpu")),
        decoder=decoder_options(cfg),
    )


def decoder_options(cfg: Config) -> dict:
    """The reader / nvJPEG settings of the data section (``data.hw_decoder_load`` etc.), by name."""
    from unmix.pipeline.decoding import DecoderOptions

    return {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(DecoderOptions)}


def setup(cfg: Config, loader_factory=None) -> Run:
    """Processes, model, target network, DeepSpeed engine and loader (nothing loaded from disk yet)."""
    rank, world, local_rank = dist.init(backend_for(cfg))
    micro = check_world(cfg, world)
    device = pick_device(cfg, local_rank)

    # The same seed on every rank gives the same initial weights (DeepSpeed broadcasts them anyway).
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(
        cfg.model.arch, small_images=cfg.model.small_images, crop=cfg.data.crop, width=cfg.model.width
    )
    # The online network on the device, and the method around it: its target (MoCo's key encoder, BYOL's
    # target) is copied before DeepSpeed may cast the module; it and the queue stay fp32. MoCo on one
    # process with Shuffle-BN puts SplitBatchNorm in both encoders (the authors' CIFAR code).
    # channels_last comes from the inputs (convolutions follow a channels_last input); the weights stay
    # contiguous: DeepSpeed broadcasts them as byte views (impossible for channels_last conv weights)
    # and ZeRO re-lays them out into flat contiguous buffers anyway.
    online, method = methods.build(cfg, backbone, world, micro, device)
    # SyncBatchNorm after the copy: MoCo's key encoder keeps per-rank BN (Shuffle-BN needs it).
    if sync_bn.wanted(method.sync_bn, world, device):
        online, method.target = sync_bn.convert(online, method.target, sync_target=method.sync_target)
    dist.broadcast_(method.replicated())  # rank 0's target and queue: every rank starts identical

    base_lr = cfg.optim.lr * cfg.optim.batch_size / 256
    engine, ds_config = build_engine(cfg, online, micro, base_lr)
    loader = (loader_factory or build_loader)(cfg, micro, rank, world)
    steps_per_epoch = len(loader) // cfg.optim.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.train: {len(loader)} batch(es) of {micro} per process is less than one optimizer step "
            f"(optim.grad_accum={cfg.optim.grad_accum}); lower optim.batch_size"
        )
    return Run(
        cfg,
        rank,
        world,
        device,
        micro,
        engine,
        method,
        loader,
        ds_config,
        steps_per_epoch,
        steps_per_epoch * cfg.optim.epochs,
        base_lr,
    )


def _channels_last(cfg: Config, device: torch.device) -> bool:
    """``model.channels_last``, or by default on CUDA only."""
    return cfg.model.channels_last if cfg.model.channels_last is not None else device.type == "cuda"


def _to_device(batch: dict[str, torch.Tensor], run: Run) -> dict[str, torch.Tensor]:
    dtype = input_dtype(run.cfg)
    channels_last = _channels_last(run.cfg, run.device)
    out = {}
    for k, v in batch.items():
        v = v.to(run.device, non_blocking=True)
        if v.ndim == 4:
            v = v.to(dtype)
            if channels_last:  # a no-op (the same tensor) for the loader's channels_last batches
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _autocast(run: Run):
    p = run.cfg.deepspeed.precision
    if p == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)


def train_step(run: Run, batch: dict[str, torch.Tensor], micro_step: int, lr: float, m: float):
    """One micro-step; returns ``(loss, loss_clean, loss_mix)`` as device tensors (no sync).

    At a gradient-accumulation boundary the optimizer steps and the target follows it.
    """
    engine, method, unmix = run.engine, run.method, run.cfg.unmix.enabled
    batch = _to_device(batch, run)
    generator = torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + micro_step)  # same on all ranks
    lam = batch["lam"] if unmix else None  # lam: N, weight of view 1 in each mixture

    with _autocast(run):
        targets = method.targets(batch, generator)  # (1) keys / target projections, no grad
    outs = engine(*method.online_inputs(batch, unmix))  # (2) online embeddings; separate BN passes
    loss, loss_clean, loss_mix = method.loss(outs, targets, lam)  # (3)
    boundary = engine.is_gradient_accumulation_boundary()
    set_lr(engine, lr)
    engine.backward(loss)
    engine.step()
    if boundary and method.target is not None:
        update_momentum(engine.module, method.target, m)  # (4) target <- m * target + (1 - m) * online
    mine = method.gathered(targets)  # MoCo: this rank's keys
    if mine is not None:
        method.after_step(dist.all_gather(mine))  # (5) the same global keys enter every rank's queue
    return loss.detach(), loss_clean, loss_mix


class Progress:
    """Rank-0 progress: a tqdm bar on a terminal, else one line every ``log.every_steps``."""

    def __init__(self, cfg: Config, total: int, start: int, active: bool):
        mode = cfg.log.progress
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "lines"
        self.mode = mode if active else "off"
        self.total, self.epochs, self.bar = total, cfg.optim.epochs, None
        if self.mode == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, n: int, loss: float, images_per_s: float, eta_s: float, epoch: int) -> None:
        if self.mode == "tqdm":
            self.bar.update(n)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}")
        elif self.mode == "lines":
            eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0))) if math.isfinite(eta_s) else "?"
            print(
                f"[unmix] step {step}/{self.total} epoch {epoch}/{self.epochs} loss {loss:.4f} "
                f"images/s {images_per_s:.1f} eta {eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _export_backbone(run: Run, out: Path, tracker: Tracker) -> Path:
    backbone = plain_batchnorm(copy.deepcopy(run.engine.module.backbone).float().cpu())  # torchvision BN
    meta = BackboneMeta.of(
        backbone,
        crop=run.cfg.data.crop,
        method=run.cfg.method.name,
        unmix=run.cfg.unmix.enabled,
        epochs=run.cfg.optim.epochs,
        steps=run.state["step"],
        seed=run.cfg.seed,
        mlflow_run_id=tracker.run_id,
        mlflow_tracking_uri=tracker.uri if tracker.run_id else None,
        mlflow_experiment=run.cfg.mlflow.experiment,
    )
    return save_backbone(out / "backbone.pt", backbone, meta)


def check_resume_config(cfg: Config, stored: dict, path: Path, force_config: bool) -> None:
    """Refuse to continue a checkpoint whose config differs in keys that change the run."""
    changed = diff(stored, to_dict(cfg))
    if changed and not force_config:
        old, new = flatten(to_dict(from_dict(copy.deepcopy(stored)))), flatten(to_dict(cfg))
        detail = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
        raise ConfigError(
            f"{path}: the config differs from the checkpoint's in {detail}; this would change the run. "
            "Use a new output_dir, or pass --force-config to continue with the new values"
        )


def _resume(run: Run, ckpt_dir: Path, force_config: bool) -> str | None:
    """Load the newest intact checkpoint, if any; returns the MLflow run id stored in it."""
    path = checkpoint.find_resumable(ckpt_dir, run.world)
    if path is None:
        return None
    client, rank_state = checkpoint.load(run.engine, path)
    check_resume_config(run.cfg, client.config, path, force_config)
    run.method.load_state_dict(client.method)
    run.loader.load_state_dict(rank_state["loader"])
    run.state.update(step=client.step, epoch=client.epoch, pos=client.pos)
    if run.rank == 0:
        print(
            f"[unmix] resumed from {path} (step {client.step}, epoch {client.epoch}, "
            f"{client.pos} steps into it)",
            file=sys.stderr,
            flush=True,
        )
    return client.mlflow_run_id


def train(cfg: Config, *, force_config: bool = False, loader_factory=None) -> int:
    """Pretrain according to ``cfg``; resumes from ``output_dir/checkpoints`` when it holds one.

    Returns 0 when the run is complete, :data:`EXIT_REQUEUE` (75) after a signal-triggered checkpoint.
    Raises :class:`NonFiniteLossError` (naming the step) on a NaN/inf loss.
    """
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    stored = checkpoint.newest_config(ckpt_dir)
    if stored is not None:  # fail before any work; _resume checks again against what it loads
        check_resume_config(cfg, stored[1], stored[0], force_config)
    run = setup(cfg, loader_factory)
    if run.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    run_id = _resume(run, ckpt_dir, force_config)
    resumed = run_id is not None or run.state["step"] > 0

    tracker = Tracker(cfg, active=run.rank == 0)
    if run.rank == 0:
        dump(cfg, out / "config.yaml")
        write_text(out / "deepspeed_config.json", json.dumps(run.ds_config, indent=1))
    tracker.start(run_id, run.world, {"steps_per_epoch": run.steps_per_epoch, "micro_batch": run.micro_batch})
    if run.rank == 0 and not resumed:
        tracker.log_artifact(out / "config.yaml")
        tracker.log_artifact(out / "deepspeed_config.json")
    if resumed:
        tracker.set_tags({"resumed_at_step": run.state["step"]})

    preempt = Preemption(check_every=cfg.checkpoint.signal_check_every)
    status = "FAILED"
    try:
        code = _loop(run, tracker, preempt, ckpt_dir)
        status = "FINISHED" if code == 0 else "KILLED"
        if code == 0 and run.rank == 0:
            path = _export_backbone(run, out, tracker)
            print(f"[unmix] wrote {path}", file=sys.stderr, flush=True)
        dist.barrier()
        return code
    finally:
        preempt.restore()
        tracker.end(status)


def _loop(run: Run, tracker: Tracker, preempt: Preemption, ckpt_dir: Path) -> int:
    """Train from ``run.state`` to the last epoch; 0 when done, :data:`EXIT_REQUEUE` after a signal."""
    cfg, st, accum, spe = run.cfg, run.state, run.cfg.optim.grad_accum, run.steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * spe)
    milestone_steps = tuple(m * spe for m in cfg.optim.milestones)
    every_e, every_s = cfg.checkpoint.every_epochs, cfg.checkpoint.every_steps
    progress = Progress(cfg, run.total_steps, st["step"], run.rank == 0)
    metrics = StepMetrics(run.device, run.world, accum, cfg.optim.batch_size, cfg.unmix.enabled)
    knn = KnnMonitor(cfg, run.rank, run.world, run.device, run.micro_batch)  # eval.knn_every_epochs
    knn.at_start(st["step"], run.engine.module.backbone, tracker)  # eval.knn_at_start: the run's floor
    micro_step = st["step"] * accum
    stop = False
    while st["epoch"] < cfg.optim.epochs and not stop:
        micro_in_epoch = st["pos"] * accum
        for batch in metrics.timed(run.loader):
            if micro_in_epoch >= spe * accum or stop:
                continue  # drain the epoch's leftover micro-batches so the loader starts the next epoch
            lr = learning_rate(
                st["step"], run.total_steps, run.base_lr, warmup_steps, cfg.optim.schedule, milestone_steps
            )
            m = run.method.momentum(st["step"], run.total_steps)
            loss, loss_clean, loss_mix = train_step(run, batch, micro_step, lr, m)
            micro_step += 1
            micro_in_epoch += 1
            lam = batch["lam"] if cfg.unmix.enabled else None  # lam: N
            metrics.add(st["step"] + 1, loss, loss_clean, loss_mix, lam)
            if micro_in_epoch % accum:
                continue
            st["step"] += 1
            st["pos"] += 1
            metrics.stepped(lr, m)
            last_of_epoch = st["pos"] == spe
            if st["step"] % cfg.log.every_steps == 0:
                _log(run, metrics, tracker, progress, ckpt_dir)
            signalled = preempt.agreed(st["step"], force=last_of_epoch)
            if last_of_epoch:
                stop = signalled  # checkpoint after the epoch ends (the loader then sits at the next one)
                continue
            if signalled or (every_s and st["step"] % every_s == 0):
                _log(run, metrics, tracker, progress, ckpt_dir)
                _save(run, metrics, tracker, ckpt_dir)
            if signalled:
                progress.close()
                return EXIT_REQUEUE
        # End of the epoch: the loader has rolled over to the next one.
        st["epoch"] += 1
        st["pos"] = 0
        _log(run, metrics, tracker, progress, ckpt_dir)
        if (epoch_loss := metrics.epoch_loss()) is not None:
            tracker.log_metrics({"epoch_loss": epoch_loss}, step=st["step"])
        last = st["epoch"] >= cfg.optim.epochs
        if (
            stop
            or last
            or (every_e and st["epoch"] % every_e == 0)
            or (every_s and st["step"] % every_s == 0)
        ):
            _save(run, metrics, tracker, ckpt_dir)
        knn.after_epoch(st["epoch"], st["step"], run.engine.module.backbone, tracker)  # after the checkpoint
        if stop:
            progress.close()
            return EXIT_REQUEUE
    _check_finite(run, metrics, ckpt_dir)
    if st["step"] > 0 and not (ckpt_dir / checkpoint.tag_for(st["step"]) / checkpoint.COMPLETE).exists():
        _save(run, metrics, tracker, ckpt_dir)
    progress.close()
    return 0


def _log(run: Run, metrics: StepMetrics, tracker: Tracker, progress: Progress, ckpt_dir: Path) -> None:
    """Check the losses are finite, then log the interval's means (one host sync) and show progress."""
    _check_finite(run, metrics, ckpt_dir)
    window = metrics.window()
    if window is None:
        return
    values, steps, seconds = window
    st, spe = run.state, run.steps_per_epoch
    tracker.log_metrics({**values, "epoch": st["epoch"] + st["pos"] / spe}, step=st["step"])
    eta = (run.total_steps - st["step"]) * seconds / steps
    epoch = st["epoch"] + (st["pos"] > 0)  # 1-based
    progress.update(st["step"], steps, values["loss"], values["images_per_s"], eta, epoch)


def _save(run: Run, metrics: StepMetrics, tracker: Tracker, ckpt_dir: Path) -> None:
    """Checkpoint where the run stands (collective); never one holding a non-finite loss."""
    _check_finite(run, metrics, ckpt_dir)
    st = run.state
    client = ClientState(
        step=st["step"],
        epoch=st["epoch"],
        pos=st["pos"],
        config=to_dict(run.cfg),
        method=run.method.state_dict(),
        mlflow_run_id=tracker.run_id,
    )
    checkpoint.save(
        run.engine, ckpt_dir, client, {"loader": run.loader.state_dict()}, run.cfg.checkpoint.keep
    )


def _check_finite(run: Run, metrics: StepMetrics, ckpt_dir: Path) -> None:
    """Raise :class:`NonFiniteLossError` (diagnostics written beside the checkpoints) if any rank's loss
    was NaN/inf since the start. Collective."""
    bad_step = metrics.first_nonfinite()
    if bad_step is None:
        return
    latest = ckpt_dir / "latest"
    info = {
        "step": bad_step,
        "detected_at_step": run.state["step"],
        "epoch": run.state["epoch"],
        "lr": metrics.lr,
        "momentum": metrics.momentum,
        "last_good_checkpoint": latest.read_text().strip() if latest.exists() else None,
        "nonfinite_params": [
            n for n, p in run.engine.module.named_parameters() if not torch.isfinite(p).all()
        ][:50],
    }
    path = checkpoint.write_diagnostics(ckpt_dir, bad_step, info) if run.rank == 0 else None
    raise NonFiniteLossError(
        f"non-finite loss at step {bad_step} (optimizer step, 1-based; "
        f"detected at step {run.state['step']}); diagnostics: {path or ckpt_dir}; "
        f"last good checkpoint: {info['last_good_checkpoint']}"
    )
