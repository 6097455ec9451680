"""BitFit: only bias terms (+ head) are trained, as zero-initialised deltas on the frozen biases.

Covered biases (each only where the backbone has one): the qkv, proj, fc1 and fc2 linears of every
block, both LayerNorms of every block, and the final LayerNorm (or fc_norm for avg-pooled models).
A LayerNorm bias delta b feeds the next linear only, so it enters exactly as W·b through that
linear's `linear_delta` (norm1 -> qkv, norm2 -> fc1); the final-norm delta is added to the tokens.
Not covered: the patch-embedding bias (there is no touch point between it and the position embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toast_core.core.forward import NOTHING, Capture, pool, steered_forward
from toast_core.methods.base import MethodConfig, MethodOutput, SteeringMethod


@dataclass
class BitFitConfig(MethodConfig):
    """`norms`: also train the LayerNorm biases (block norms and the final norm)."""

    norms: bool = True


def _bias_size(module: nn.Module) -> int | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else int(bias.numel())


class BitFit(SteeringMethod):
    """Trainable bias deltas (key "<site>_<layer>", sites qkv/proj/fc1/fc2/norm1/norm2; "final_norm")."""

    name = "bitfit"
    config_cls = BitFitConfig

    def build(self) -> None:
        vit = self.vit
        deltas: dict[str, nn.Parameter] = {}
        for layer, blk in enumerate(vit.blocks):
            sites: dict[str, nn.Module] = {
                "qkv": blk.attn.qkv,
                "proj": blk.attn.proj,
                "fc1": blk.mlp.fc1,
                "fc2": blk.mlp.fc2,
            }
            if self.config.norms:
                sites["norm1"] = blk.norm1
                sites["norm2"] = blk.norm2
            for site, mod in sites.items():
                size = _bias_size(mod)
                if size is not None:
                    deltas[f"{site}_{layer}"] = nn.Parameter(torch.zeros(size))
        self._final_site = None
        if self.config.norms:
            for site in ("norm", "fc_norm"):
                size = _bias_size(getattr(vit, site))
                if size is not None and isinstance(getattr(vit, site), nn.LayerNorm):
                    deltas["final_norm"] = nn.Parameter(torch.zeros(size))
                    self._final_site = site
                    break
        self.deltas = nn.ParameterDict(deltas)

    def linear_delta(self, layer: int, site: str, inp: Tensor) -> Tensor | None:
        delta = self.deltas[f"{site}_{layer}"] if f"{site}_{layer}" in self.deltas else None
        norm_key = {"qkv": f"norm1_{layer}", "fc1": f"norm2_{layer}"}.get(site)
        if norm_key is not None and norm_key in self.deltas:
            blk = self.vit.blocks[layer]
            weight = blk.attn.qkv.weight if site == "qkv" else blk.mlp.fc1.weight
            through = F.linear(self.deltas[norm_key].to(weight.dtype), weight)
            delta = through if delta is None else delta + through
        return delta

    def forward(self, images: Tensor, capture: Capture = NOTHING) -> MethodOutput:
        out = steered_forward(self.vit, images, steer=self, capture=capture)
        if self._final_site == "norm":
            out.tokens = out.tokens + self.deltas["final_norm"]
            features = pool(self.vit, out)
        else:
            features = pool(self.vit, out)
            if self._final_site == "fc_norm":
                features = features + self.deltas["final_norm"]
        return MethodOutput(logits=self.head(features), features=features, out=out)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["biases_covered"] = sorted(
            {k if k == "final_norm" else k.rsplit("_", 1)[0] for k in self.deltas}
        )
        info["biases_not_covered"] = ["patch_embed"]
        return info
