"""LoRA: rank-r updates B·A (scaled by alpha/r) on chosen projections of every block.

Paper form (default, Hu et al.): separate updates for the q and v slices of timm's fused qkv Linear,
W_k untouched. Target "qkv" is the other common form (peft with target_modules=["qkv"] on timm):
one shared update for the whole fused projection. `describe()` records which form a run used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from toast_core.methods.base import MethodConfig, SteeringMethod

SLICES = ("q", "k", "v")
TARGETS = (*SLICES, "qkv", "proj")
INITS = ("kaiming", "normal")


@dataclass
class LoRAConfig(MethodConfig):
    """r: rank; alpha: scale numerator (scale = alpha / r); targets among q, k, v, proj, or qkv (fused);
    a_init: "kaiming" (kaiming-uniform, a=sqrt(5), as loralib/peft) or "normal" (N(0, 1/r));
    layers: block indices to adapt (None = all); dropout on the adapter input."""

    r: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = ("q", "v")
    a_init: str = "kaiming"
    layers: tuple[int, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}.")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets must be among {', '.join(TARGETS)}; got {self.targets}.")
        if "qkv" in self.targets and any(t in SLICES for t in self.targets):
            raise ValueError("LoRA target 'qkv' (one fused update) cannot be combined with q/k/v slices.")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets repeat: {self.targets}.")
        if self.a_init not in INITS:
            raise ValueError(f"LoRA a_init must be one of {', '.join(INITS)}; got {self.a_init!r}.")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)


class LowRank(nn.Module):
    """x -> (x A^T) B^T: A (r, d_in) random, B (d_out, r) zero, so the update starts at exactly 0."""

    def __init__(self, d_in: int, d_out: int, r: int, a_init: str):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        if a_init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.A, std=1.0 / r)

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)

    def weight(self) -> Tensor:
        """The dense update B·A (d_out, d_in), for merging and checks."""
        return self.B @ self.A


class LoRA(SteeringMethod):
    """Adapters in `self.adapters["<layer>_<target>"]`; the frozen weights are never changed."""

    name = "lora"
    config_cls = LoRAConfig

    def build(self) -> None:
        cfg = self.config
        vit = self.vit
        depth = len(vit.blocks)
        layers = range(depth) if cfg.layers is None else cfg.layers
        for layer in layers:
            if not 0 <= layer < depth:
                raise ValueError(f"LoRA layer {layer} is out of range for a backbone with {depth} blocks.")
        adapters: dict[str, LowRank] = {}
        for layer in sorted(set(layers)):
            attn = vit.blocks[layer].attn
            d_in = attn.qkv.in_features
            c = attn.qkv.out_features // 3
            for target in cfg.targets:
                if target in SLICES:
                    adapters[f"{layer}_{target}"] = LowRank(d_in, c, cfg.r, cfg.a_init)
                elif target == "qkv":
                    adapters[f"{layer}_qkv"] = LowRank(d_in, 3 * c, cfg.r, cfg.a_init)
                else:
                    adapters[f"{layer}_proj"] = LowRank(
                        attn.proj.in_features, attn.proj.out_features, cfg.r, cfg.a_init
                    )
        self.adapters = nn.ModuleDict(adapters)
        self.scale = cfg.alpha / cfg.r
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def _update(self, key: str, inp: Tensor) -> Tensor | None:
        if key not in self.adapters:
            return None
        return self.adapters[key](self.drop(inp)) * self.scale

    def linear_delta(self, layer: int, site: str, inp: Tensor) -> Tensor | None:
        if site == "proj":
            return self._update(f"{layer}_proj", inp)
        if site != "qkv":
            return None
        fused = self._update(f"{layer}_qkv", inp)
        if fused is not None:
            return fused
        parts = [self._update(f"{layer}_{s}", inp) for s in SLICES]
        if all(p is None for p in parts):
            return None
        ref = next(p for p in parts if p is not None)
        return torch.cat([ref.new_zeros(ref.shape) if p is None else p for p in parts], dim=-1)

    def merged_delta(self, layer: int, site: str) -> Tensor | None:
        """The dense weight change this method adds to `site` ("qkv" or "proj") of block `layer`."""
        if site == "proj":
            key = f"{layer}_proj"
            return self.adapters[key].weight() * self.scale if key in self.adapters else None
        if f"{layer}_qkv" in self.adapters:
            return self.adapters[f"{layer}_qkv"].weight() * self.scale
        attn = self.vit.blocks[layer].attn
        c = attn.qkv.out_features // 3
        rows = []
        for s in SLICES:
            key = f"{layer}_{s}"
            rows.append(
                self.adapters[key].weight() * self.scale
                if key in self.adapters
                else attn.qkv.weight.new_zeros(c, attn.qkv.in_features)
            )
        return torch.cat(rows, dim=0)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if "qkv" in self.config.targets:
            info["lora_form"] = "fused qkv: one shared update for q, k and v (peft on timm's qkv)"
        else:
            untouched = [s for s in SLICES if s not in self.config.targets]
            info["lora_form"] = f"paper: separate updates for {', '.join(t for t in self.config.targets)}" + (
                f"; W_{'/W_'.join(untouched)} untouched" if untouched else ""
            )
        info["lora_scale"] = self.scale
        return info
