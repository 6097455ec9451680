"""The one training loop for every steering method: plain PyTorch, seeded, cancellable.

Every method trains the same way (warmup + cosine, AdamW or SGD, clipping, CUDA-only mixed
precision), so comparisons between methods measure the methods, not their loops. Data comes either
as an in-memory `LabeledImages` (seeded epoch-wise permutation) or as a callable batch source for
streaming data. Integer targets use cross-entropy, float multi-hot targets BCE-with-logits.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from toast_core.data.base import LabeledImages
from toast_core.methods.base import MethodOutput, SteeringMethod, seed_global
from toast_core.training import distributed
from toast_core.training.evaluation import (  # the loop's per-batch pieces; re-exported for train's callers
    cls_attention_grid,
    correct_count,
    evaluate,
    method_device,
    predict,
    prepare_batch,
    resolve_device,
    task_loss,
    view_over,
)
from toast_core.training.feature_cache import CacheStats, FrozenCache, plan_cache

#: (step, batch_size, generator) -> (uint8 images (B, 3, H, W), targets (B,) long or (B, C) float)
BatchSource = Callable[[int, int, torch.Generator], tuple[Tensor, Tensor]]
#: (uint8 images (B, 3, H, W), the run's augmentation generator) -> uint8 images of the same shape
Augment = Callable[[Tensor, torch.Generator], Tensor]

OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train. `min_lr` is a ratio of `lr` reached at the end of the cosine; `eval_every` /
    `snapshot_every` = 0 means only at the end / never. `amp`: auto = bf16 (or fp16) on CUDA, off
    elsewhere. Weight decay applies to tensors with >= 2 dims (weights, prompts), not to biases/norms.
    `cache_mb`: memory bound of the run's frozen-stage cache (toast_core.training.feature_cache; 0 = off).
    `head_lr_scale`: the classification head's learning rate as a multiple of `lr`, on the same schedule
    (a fresh head on a pre-tuned steering module wants a larger step than the module: benchmarks/toast_study.py)."""

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    snapshot_every: int = 0
    eval_batch_size: int = 64
    device: str = "auto"
    amp: str = "auto"
    num_threads: int | None = None
    cache_mb: float = 1024.0
    head_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("steps must be >= 0 and batch sizes >= 1.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}.")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {self.amp!r}.")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ValueError(f"min_lr is a ratio of lr in [0, 1]; got {self.min_lr}.")
        if self.lr <= 0 or self.warmup_steps < 0 or self.eval_every < 0 or self.snapshot_every < 0:
            raise ValueError("lr must be > 0; warmup_steps, eval_every, snapshot_every must be >= 0.")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0 (0 = no cache); got {self.cache_mb}.")
        if self.head_lr_scale <= 0:
            raise ValueError(f"head_lr_scale must be > 0; got {self.head_lr_scale}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainCallback(Protocol):
    """Anything with some of these methods can listen to a run (missing ones are skipped)."""

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_snapshot(self, step: int, attention: np.ndarray) -> None: ...


@dataclass
class Callbacks:
    """A ready-made callback holder: pass plain functions for the events you care about."""

    on_step: Callable[[int, int, dict[str, float]], None] | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_snapshot: Callable[[int, np.ndarray], None] | None = None


@dataclass
class TrainResult:
    """What a run produced. `memory["kind"]` says what `peak_mb` measures (CUDA allocator peak or
    CPU process-RSS growth)."""

    history: list[dict[str, float]]
    final: dict[str, float]
    timings: dict[str, float]
    memory: dict[str, Any]
    cancelled: bool
    steps_done: int
    device: str
    amp: str
    config: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # the frozen-stage cache: used / why not, size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- small shared helpers -------------------------------------------------------------------------
def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine down to `min_lr · lr` at the last step (step is 0-based)."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    ratio = config.min_lr + (1.0 - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * ratio


def build_optimizer(method: SteeringMethod, config: TrainConfig) -> torch.optim.Optimizer:
    params = method.trainable_parameters()
    if not params:
        raise ValueError(f"Method '{method.name}' has no trainable parameters.")
    # the head gets its own groups only when its lr differs (a resumed run's optimizer state keeps its layout)
    head: set[int] = set()
    if config.head_lr_scale != 1.0:
        if not isinstance(getattr(method, "head", None), torch.nn.Module):
            raise ValueError(f"head_lr_scale needs a method with a classification head; '{method.name}' has none.")
        head = {id(p) for p in method.head.parameters()}
    groups = []
    for scale, mine in ((1.0, [p for p in params if id(p) not in head]),
                        (config.head_lr_scale, [p for p in params if id(p) in head])):
        groups.append({"params": [p for p in mine if p.ndim >= 2], "weight_decay": config.weight_decay, "lr_scale": scale})
        groups.append({"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale})
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if device.type != "cuda":
        if mode == "auto":
            return None
        raise ValueError(f"Mixed precision ({mode}) is CUDA only; the run is on {device}.")
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _EpochSampler:
    """Index batches from seeded epoch-wise permutations (every item once per epoch)."""

    def __init__(self, n: int, generator: torch.Generator):
        if n < 1:
            raise ValueError("The training set is empty.")
        self.n, self.generator = n, generator
        self.order = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self, batch: int) -> Tensor:
        taken: list[Tensor] = []
        need = batch
        while need > 0:
            if self.pos >= self.n:
                self.order = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            chunk = self.order[self.pos : self.pos + need]
            self.pos += len(chunk)
            need -= len(chunk)
            taken.append(chunk)
        return torch.cat(taken)


def _emit(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)


# --- training -------------------------------------------------------------------------------------
def train(
    method: SteeringMethod,
    train_data: LabeledImages | BatchSource,
    val_data: LabeledImages | None = None,
    config: TrainConfig | None = None,
    *,
    callbacks: Any | Sequence[Any] | None = None,
    probe_image: Tensor | None = None,
    cancel: threading.Event | None = None,
    features: Tensor | None = None,
    augment: Augment | None = None,
) -> TrainResult:
    """Train `method` in place and return its history, final metrics, timings and memory peak.

    `probe_image` (uint8 (3, H, W)) enables attention snapshots every `snapshot_every` steps (and at
    step 0). `cancel` is checked before every step, so a run stops within one step of it being set.
    Frozen stage: a method that declares one (`frozen_stage_kind`: the linear probe's features,
    TOAST's pass 1) trains on in-memory images from a per-run cache of it (`feature_cache`), filled
    in the first epoch: same batches, optimiser and schedule, the same numbers within float
    rounding, without recomputing the frozen backbone per step. `features`: the caller's pooled
    features of every `train_data` image (fills a head-only cache at once). `augment`: a per-step
    transform of the uint8 batch (images, run generator) -> images; such a run caches nothing.
    `result.cache` says whether the cache was used, or why not, and its size.
    """
    config = config or TrainConfig()
    frozen = plan_cache(method, train_data, config.cache_mb, augmented=augment is not None, features=features)
    if callbacks is None:
        cbs: list[Any] = []
    else:
        cbs = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    device = resolve_device(method, config.device)
    amp_dtype = _resolve_amp(config.amp, device)
    amp_name = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    old_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _run(
            method, train_data, val_data, config, cbs, probe_image, cancel, device, amp_dtype, amp_name,
            (*frozen, augment),
        )  # fmt: skip
    finally:
        if config.num_threads:
            torch.set_num_threads(old_threads)


class _Loop:
    """One run's state: optimiser, scaler, sampler, timers and history (the loop in `run`)."""

    def __init__(
        self,
        method: SteeringMethod,
        train_data: LabeledImages | BatchSource,
        val_data: LabeledImages | None,
        config: TrainConfig,
        cbs: list[Any],
        probe_image: Tensor | None,
        cancel: threading.Event | None,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        frozen: tuple[FrozenCache | None, CacheStats, Augment | None],
    ):
        self.method, self.train_data, self.val_data = method, train_data, val_data
        self.cache, self.cache_stats, self.augment = frozen
        self.config, self.cbs, self.probe_image, self.cancel = config, cbs, probe_image, cancel
        self.device, self.amp_dtype = device, amp_dtype
        self.is_cuda = device.type == "cuda"
        seed_global(config.seed)  # a fine-tuned backbone's own dropout / drop-path, if enabled
        method.seed_streams(config.seed)  # prompt dropout, random prompt locations (per run, thread-safe)
        self.world = distributed.ensure_joined(device)  # several processes (torchrun): toast_core.training.distributed
        if self.world is not None:
            distributed.broadcast_module(method, self.world)
        self.generator = torch.Generator().manual_seed(config.seed)  # batch order
        self.aug_generator = torch.Generator().manual_seed(config.seed + 1)  # augmentation draws
        self.sampler = (
            _EpochSampler(len(train_data), self.generator) if isinstance(train_data, LabeledImages) else None
        )
        self.optimizer = build_optimizer(method, config)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        # the loss reads the pooled feature (and what the method's own losses capture): see Capture.all_tokens
        self.capture = replace(method.capture_for_loss(), all_tokens=False)
        self.params = method.trainable_parameters()
        self.history: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self.step_images: list[int] = []
        self.last_val: dict[str, float] = {}
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.mem_start = torch.cuda.memory_allocated(device)
        self.rss_start = self.rss_peak = _rss_bytes()

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(images, labels, their indices in an in-memory training set) of this step's batch."""
        if self.sampler is not None:
            idx = self.sampler.next(self.config.batch_size)
            data: LabeledImages = self.train_data  # type: ignore[assignment]
            images = data.images[idx]
            if self.augment is not None:  # on the global batch: every rank makes one process's draws
                images = self.augment(images, self.aug_generator)
            if self.world is not None:  # this rank's slice of the global batch
                part = distributed.rank_slice(len(idx), self.world)
                idx, images = idx[part], images[part]
            return images, data.labels[idx], idx
        batch = self.train_data(step, self.config.batch_size, self.generator)  # type: ignore[operator]
        images, labels = batch if self.world is None else distributed.local_part(self.world, self.train_data, *batch)
        return images, labels, None

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns its history entry."""
        images, targets, index = self.batch(step)
        targets = targets.to(self.device)
        lr = lr_at(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.sync()
        t0 = time.perf_counter()
        method, amp = self.method, self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if self.cache is not None and index is not None:  # the frozen stage from the run's cache
                fill = lambda rows: method.frozen_stage(prepare_batch(method, images[rows]))  # first epoch
                stage = self.cache.get(index, fill)
                output: MethodOutput = method.forward_frozen(stage, self.capture)
            else:
                output = method(prepare_batch(method, images), self.capture)
            logits, extras = output.logits, method.extra_losses(output, targets)
            loss_task = task_loss(logits, targets)
        loss = loss_task + sum((v.float() for v in extras.values()), torch.zeros((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.world is not None:  # every rank gets the gradient of the global batch's mean loss
            distributed.reduce_gradients(self.world, self.params, len(images))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.sync()
        self.step_times.append(time.perf_counter() - t0)
        self.step_images.append(len(images))
        if not self.is_cuda:
            self.rss_peak = max(self.rss_peak, _rss_bytes())
        entry = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "task_loss": float(loss_task.detach()),
            "lr": lr,
            "train_acc": correct_count(logits.detach(), targets) / len(images),
        }
        entry.update({name: float(v.detach()) for name, v in extras.items()})
        return entry if self.world is None else distributed.reduce_metrics(self.world, len(images), entry)

    def snapshot(self, step: int) -> None:
        if self.probe_image is None or self.config.snapshot_every <= 0:
            return
        grid = cls_attention_grid(self.method, self.probe_image.unsqueeze(0))[0]
        _emit(self.cbs, "on_snapshot", step, grid)

    def evaluate(self, step: int, entry: dict[str, float] | None) -> dict[str, float]:
        if self.world is None:
            metrics = evaluate(self.method, self.val_data, self.config.eval_batch_size, cancel=self.cancel)  # type: ignore[arg-type]
        else:  # sharded over the ranks; {} when any rank was cancelled
            metrics = distributed.evaluate(self.method, self.val_data, self.world, self.config.eval_batch_size, self.cancel)  # type: ignore[arg-type]
        if not metrics or (self.cancel is not None and self.cancel.is_set()):
            return {}  # a partial pass over the validation set is not a metric
        val = {"val_acc": metrics["acc"], "val_loss": metrics["loss"]}
        self.last_val = val
        if entry is not None:
            entry.update(val)
        _emit(self.cbs, "on_eval", step, {"step": step, **val})
        return val

    def run(self) -> tuple[bool, float]:
        """All steps (until cancelled), with periodic eval and snapshots; returns (cancelled, final eval s)."""
        cfg = self.config
        self.snapshot(0)
        self.method.train()
        cancelled = False
        for step in range(cfg.steps):
            stop = self.cancel is not None and self.cancel.is_set()
            if stop if self.world is None else distributed.any_rank(stop, self.world):
                cancelled = True
                break
            entry = self.step(step)
            self.history.append(entry)
            _emit(self.cbs, "on_step", step + 1, cfg.steps, dict(entry))
            if self.val_data is not None and cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0:
                self.evaluate(step + 1, entry)
            if cfg.snapshot_every > 0 and (step + 1) % cfg.snapshot_every == 0:
                self.snapshot(step + 1)
        t_eval = time.perf_counter()
        if self.val_data is not None and not cancelled and "val_acc" not in (self.history or [{}])[-1]:
            self.evaluate(len(self.history), self.history[-1] if self.history else None)
        self.method.eval()
        return cancelled, time.perf_counter() - t_eval

    def final(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.history:
            tail = self.history[-min(10, len(self.history)) :]
            out["train_loss"] = float(np.mean([h["loss"] for h in tail]))
            out["train_acc"] = float(np.mean([h["train_acc"] for h in tail]))
        out.update(self.last_val)
        return out

    def timings(self, eval_s: float, total_s: float) -> dict[str, float]:
        # the first step pays one-off costs (allocator, kernels); leave it out when there are others
        skip = 1 if len(self.step_times) > 1 else 0
        timed_s, timed_imgs = sum(self.step_times[skip:]), sum(self.step_images[skip:])
        return {
            "train_ms_per_img": timed_s / timed_imgs * 1000.0 if timed_imgs else float("nan"),
            "train_s": float(sum(self.step_times)),
            "final_eval_s": eval_s,
            "total_s": total_s,
            "images_seen": float(sum(self.step_images)),  # this process's (one rank's share under torchrun)
            **({"processes": float(self.world.size)} if self.world is not None else {}),
        }

    def memory(self) -> dict[str, Any]:
        if self.is_cuda:
            return {
                "kind": "cuda_max_memory_allocated",
                "peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "start_mb": self.mem_start / 2**20,
            }
        return {
            "kind": "cpu_rss_delta",
            "peak_mb": (self.rss_peak - self.rss_start) / 2**20,
            "start_mb": self.rss_start / 2**20,
        }


def _run(
    method: SteeringMethod,
    train_data: LabeledImages | BatchSource,
    val_data: LabeledImages | None,
    config: TrainConfig,
    cbs: list[Any],
    probe_image: Tensor | None,
    cancel: threading.Event | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    amp_name: str,
    frozen: tuple[FrozenCache | None, CacheStats, Augment | None],
) -> TrainResult:
    t_start = time.perf_counter()
    loop = _Loop(method, train_data, val_data, config, cbs, probe_image, cancel, device, amp_dtype, frozen)
    cancelled, eval_s = loop.run()
    return TrainResult(
        history=loop.history,
        final=loop.final(),
        timings=loop.timings(eval_s, time.perf_counter() - t_start),
        memory=loop.memory(),
        cancelled=cancelled,
        steps_done=len(loop.history),
        device=str(device),
        amp=amp_name,
        config=config.to_dict(),
        cache=loop.cache_stats.to_dict(),
    )


# the loop, and the per-batch pieces its callers have always imported from here
__all__ = [
    "Augment", "BatchSource", "Callbacks", "TrainCallback", "TrainConfig", "TrainResult", "build_optimizer",
    "cls_attention_grid", "correct_count", "evaluate", "lr_at", "method_device", "predict", "prepare_batch",
    "task_loss", "train", "view_over",
]  # fmt: skip
