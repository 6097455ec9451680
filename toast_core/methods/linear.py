"""Linear probe: the frozen backbone's pooled feature read by one trainable linear head."""

from __future__ import annotations

from dataclasses import dataclass

from toast_core.methods.base import MethodConfig, SteeringMethod


@dataclass
class LinearConfig(MethodConfig):
    """No settings beyond the seed: the head is the only trainable part."""


class LinearProbe(SteeringMethod):
    """Head only; the base class already runs the unmodified backbone and reads it linearly."""

    name = "linear"
    config_cls = LinearConfig
    frozen_stage_kind = "features"  # the head alone trains: a run computes each image's feature once
