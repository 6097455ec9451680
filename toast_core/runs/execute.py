"""One run segment from data to finished module: load the task, build or resume the module, train,
and write the terminal record (done, cancelled with a checkpoint, or failed with the reason)."""

from __future__ import annotations

import dataclasses
import time
import traceback
from typing import TYPE_CHECKING

import torch

from toast_core.core.backbone import Backbone
from toast_core.storage.checkpoints import CheckpointError, load_module, paths_for, save_module
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod
from toast_core.methods.fort import FortMixin
from toast_core.runs.listener import _Listener
from toast_core.runs.record import CHECKPOINT_STEM, MODULE_STEM, _clean, _now, _Record
from toast_core.runs.tasks import load_task_data
from toast_core.training.train import TrainConfig, TrainResult, cls_attention_grid, lr_at, train

if TYPE_CHECKING:
    from toast_core.runs.manager import RunManager


def _resume_train_config(base: TrainConfig, offset: int) -> TrainConfig:
    """The remaining steps of `base` after `offset` done: lr continues from the schedule's value there."""
    remaining = max(0, base.steps - offset)
    if offset <= 0:
        return base
    lr_now = max(lr_at(offset, base), base.lr * 1e-6)  # TrainConfig needs lr > 0
    end_lr = base.min_lr * base.lr
    return dataclasses.replace(
        base,
        steps=remaining,
        lr=lr_now if base.warmup_steps <= offset else base.lr,
        warmup_steps=max(0, base.warmup_steps - offset),
        min_lr=min(1.0, end_lr / lr_now) if base.warmup_steps <= offset and lr_now > 0 else base.min_lr,
    )


class Executor:
    """Runs the segments a manager's workers take; every failure ends in the record, never in a thread."""

    def __init__(self, manager: RunManager) -> None:
        self.manager = manager
        self.registry = manager.registry

    def execute(self, rec: _Record, device: str) -> None:
        """Run one segment; every failure ends in the record, never in the worker thread."""
        out_of_memory = False
        try:
            result, method, class_names = self._train(rec, device)
            self._finish(rec, result, method, class_names)
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = True
            assert rec.config is not None
            first_line = (str(exc).splitlines() or ["OutOfMemoryError"])[0]
            self._fail(
                rec,
                f"CUDA out of memory on {device} at batch size {rec.batch_size} (evaluation batch size "
                f"{rec.config.train_config.eval_batch_size}): lower batch_size or use the CPU, and "
                f"resubmit. ({first_line})",
                "oom",
            )
        except Exception as exc:
            self._fail(rec, f"{type(exc).__name__}: {exc}", "exception")
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()  # after the except block: the traceback no longer holds the tensors

    def _train(self, rec: _Record, device: str) -> tuple[TrainResult, SteeringMethod, list[str]]:
        config = rec.config
        assert config is not None
        backbone = self.manager.backbone_for(device)
        self._set_phase(rec, "loading data")
        train_set, val_set = load_task_data(config, int(backbone.layout.img_size[0]))
        probe_pool = val_set if val_set is not None and len(val_set) else train_set
        if config.probe_index >= len(probe_pool):
            which = "validation" if probe_pool is val_set else "training"
            raise ValueError(
                f"probe_index {config.probe_index} is out of range: the {which} set has {len(probe_pool)} images."
            )
        method, offset = self._starting_module(rec, backbone, train_set.num_classes)
        with self.registry.lock:
            s = rec.status
            s.num_classes, s.class_names = train_set.num_classes, list(train_set.class_names)
            s.train_size, s.val_size = len(train_set), (len(val_set) if val_set is not None else 0)
        base = dataclasses.replace(
            config.train_config,
            device=device,
            seed=config.seed + offset,
            snapshot_every=config.snapshot_every,
            num_threads=self.manager.cpu_threads if device == "cpu" else None,
        )
        prompts_s = self._prepare_fort(rec, method, backbone, train_set, offset, base.num_threads)
        train_config = _resume_train_config(base, offset)
        listener = _Listener(self.manager, rec, method, offset, len(train_set))
        self._set_phase(rec, None)
        probe = probe_pool.images[config.probe_index]
        result = train(
            method,
            train_set,
            val_set,
            train_config,
            callbacks=listener,
            probe_image=probe,
            cancel=rec.cancel_event,
        )
        self._final_snapshot(rec, method, probe, result, listener)
        if prompts_s is not None:
            result.timings["fort_prompts_s"] = prompts_s
        result.history = [dict(_clean(h), step=offset + int(h["step"])) for h in result.history]
        return result, method, list(train_set.class_names)

    def _set_phase(self, rec: _Record, phase: str | None) -> None:
        with self.registry.lock:
            changed = rec.status.phase != phase
            rec.status.phase, rec.status.updated = phase, _now()
        if changed:
            self.registry.persist(rec, force=True)

    def _prepare_fort(
        self,
        rec: _Record,
        method: SteeringMethod,
        backbone: Backbone,
        train_set: LabeledImages,
        offset: int,
        threads: int | None,
    ) -> float | None:
        """FORT's position prompts from the run's training images (its support set), before training.

        Always computed on the run's starting module (a fresh build under the run's seed), so a
        resumed run trains with exactly the prompts it started with. Returns the seconds it took,
        or None for methods without prompts (and FORT with fort_alpha = 0, which is its base method).
        """
        if not isinstance(method, FortMixin) or not method.fort_active or rec.cancel_event.is_set():
            return None  # a run cancelled meanwhile trains no step, so it needs no prompts
        config = rec.config
        assert config is not None
        self._set_phase(rec, f"preparing FORT position prompts on {len(train_set)} training images")
        t0 = time.perf_counter()
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            if offset > 0:  # resumed: the checkpoint is not the starting module
                start = build_method(config.method, backbone, train_set.num_classes, config.method_config)
                assert isinstance(start, FortMixin)
                start.prepare_prompts(train_set)
                assert start.prompt_inputs is not None and start.prompt_targets is not None
                method.set_prompts(start.prompt_inputs, start.prompt_targets, start.prompt_importance)
            else:
                method.prepare_prompts(train_set)
        finally:
            if threads:
                torch.set_num_threads(old_threads)
        return time.perf_counter() - t0

    def _final_snapshot(
        self,
        rec: _Record,
        method: SteeringMethod,
        probe: torch.Tensor,
        result: TrainResult,
        listener: _Listener,
    ) -> None:
        """The probe image's attention under the final module, unless the cadence already took it
        (steps not a multiple of snapshot_every, snapshot_every = 0): what a finished run shows."""
        if result.steps_done == 0 and rec.status.snapshot is not None:
            return  # nothing trained in this segment: the snapshot on record is still the module's
        with self.registry.lock:
            last = rec.status.snapshot_step if rec.status.snapshot is not None else None
        if last == listener.offset + result.steps_done:
            return
        grid = cls_attention_grid(method, probe.unsqueeze(0))[0]
        listener.on_snapshot(result.steps_done, grid)

    def _starting_module(
        self, rec: _Record, backbone: Backbone, num_classes: int
    ) -> tuple[SteeringMethod, int]:
        """(module, steps already done): checkpoint_last when resuming from one, else a fresh module.

        A checkpoint that no longer loads (e.g. the process died between its two files) restarts the
        run from step 0, and the record's note says so.
        """
        config = rec.config
        assert config is not None
        if rec.resume_path:
            try:
                method = load_module(rec.resume_path, backbone)
            except CheckpointError as exc:
                with self.registry.lock:
                    rec.status.history, rec.status.step, rec.status.resumed_from = [], 0, 0
                    rec.history_rev += 1
                    rec.status.note = f"resumed from step 0 (checkpoint_last did not load: {exc})"
                rec.resume_path = None
            else:
                if method.num_classes != num_classes:
                    raise ValueError(
                        f"The checkpoint has {method.num_classes} classes but the task now has {num_classes}."
                    )
                return method, rec.status.resumed_from or 0
        return build_method(config.method, backbone, num_classes, config.method_config), 0

    def _finish(
        self, rec: _Record, result: TrainResult, method: SteeringMethod, class_names: list[str]
    ) -> None:
        """Write the module (final, or checkpoint_last for a cancelled run) and the terminal record."""
        offset = rec.status.resumed_from or 0
        steps_done = offset + result.steps_done
        card = None
        if result.cancelled:
            if result.steps_done > 0:
                self.registry.save_checkpoint_last(rec, method, steps_done)
        else:
            card = save_module(
                method,
                self.registry.run_dir(rec.status.run_id) / MODULE_STEM,
                task=rec.status.task,
                metrics=_clean(result.final),
                timings=_clean(result.timings),
                extra={"class_names": class_names, "run_id": rec.status.run_id, "run_name": rec.status.name},
            )
            for path in paths_for(self.registry.run_dir(rec.status.run_id) / CHECKPOINT_STEM):
                path.unlink(missing_ok=True)
        with self.registry.cond:
            s = rec.status
            prior = [h for h in s.history if h.get("step", 0) <= offset]
            s.history = prior + result.history
            rec.history_rev += 1
            s.step = steps_done
            s.final, s.timings, s.memory = _clean(result.final), _clean(result.timings), _clean(result.memory)
            s.peak_mb, s.amp = s.memory.get("peak_mb"), result.amp
            s.state = "cancelled" if result.cancelled else "done"
            s.phase = None
            s.checkpoint = None if card is None else str(card.relative_to(self.registry.root))
            if card is not None:
                s.checkpoint_last_step = None
            s.ended = s.updated = _now()
            s.eta_s = None
            rec.resume_path = None
            self.registry.cond.notify_all()
        self.registry.persist(rec, force=True)
        rec.settled.set()

    def _fail(self, rec: _Record, message: str, kind: str) -> None:
        with self.registry.cond:
            s = rec.status
            s.state, s.error, s.error_kind = "failed", message, kind
            s.phase = None
            s.traceback = traceback.format_exc()
            s.ended = s.updated = _now()
            s.eta_s = None
            if kind == "oom":
                s.memory = {**s.memory, "oom_batch_size": rec.batch_size}
            self.registry.cond.notify_all()
        self.registry.persist(rec, force=True)
        rec.settled.set()
