"""A non-zero rank of a torchrun run: the same data, module and loop as rank 0, and no writes.

Under `torchrun ... -m toast_core train ...` rank 0 runs the ordinary RunManager path (record,
snapshots, checkpoints, final module in the registry); every other rank calls `follow`, which builds
what `execute.Executor` builds for a fresh run (task data, the method under the run's seed, FORT
prompts) and trains through the same `train.train`, whose collectives (toast_core.training.distributed)
pair with rank 0's step by step. Rank 0's module is broadcast at the start, so a follower needs no
checkpoint; it has no callbacks and no probe image, so it writes nothing anywhere.
"""

from __future__ import annotations

import dataclasses

from toast_core.core.backbone import Backbone
from toast_core.methods import build_method
from toast_core.methods.fort import FortMixin
from toast_core.runs.config import RunConfig
from toast_core.runs.tasks import load_task_data
from toast_core.training.train import TrainResult, train


def follow(config: RunConfig, backbone: Backbone, device: str, threads: int | None = None) -> TrainResult:
    """Train this rank's share of `config`'s run (rank 0 records it); raises what the run raises."""
    train_set, val_set = load_task_data(config, int(backbone.layout.img_size[0]))
    method = build_method(config.method, backbone, train_set.num_classes, config.method_config)
    if isinstance(method, FortMixin) and method.fort_active:
        method.prepare_prompts(train_set)
    train_config = dataclasses.replace(
        config.train_config, device=device, seed=config.seed, snapshot_every=0, num_threads=threads
    )
    return train(method, train_set, val_set, train_config)
