"""TOAST's feedback decoders: one per block, two bias-free d×d linears (LoRA-updated in TOAST-Lite).

Kept apart from `toast.py` (the method: passes, selection, signal) because they are plain layers
whose parameter names must match the released checkpoints (bfshi/TOAST, loralib).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DECODER_INIT_STD = 0.02  # the released model's init_weights_vit_timm: trunc_normal(std=.02) on every Linear


class LoRALinear(nn.Module):
    """A frozen bias-free linear plus a trainable rank-r update scaled by alpha / r (loralib layout).

    Parameter names (`weight`, `lora_A`, `lora_B`) match loralib so official TOAST-Lite checkpoints map.
    """

    def __init__(self, dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        self.weight = nn.Parameter(torch.empty(dim, dim), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(rank, dim))
        self.lora_B = nn.Parameter(torch.zeros(dim, rank))
        self.scaling = float(alpha) / float(rank)
        nn.init.trunc_normal_(self.weight, std=DECODER_INIT_STD)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> Tensor:
        """W + (alpha/r)·B·A: the matrix this layer applies."""
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


class ToastDecoder(nn.Module):
    """One feedback layer: h' = W1 h is passed down, td = W2 h' goes to the block (released Decode_Block)."""

    def __init__(self, dim: int, lite: bool, rank: int, alpha: float) -> None:
        super().__init__()
        if lite:
            self.linear: nn.Module = LoRALinear(dim, rank, alpha)
            self.linear2: nn.Module = LoRALinear(dim, rank, alpha)
        else:
            self.linear = nn.Linear(dim, dim, bias=False)
            self.linear2 = nn.Linear(dim, dim, bias=False)
            nn.init.trunc_normal_(self.linear.weight, std=DECODER_INIT_STD)
            nn.init.trunc_normal_(self.linear2.weight, std=DECODER_INIT_STD)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h = self.linear(h)
        return h, self.linear2(h)


def decoder_matrix(layer: nn.Module) -> Tensor:
    """The d×d matrix a decoder linear applies (LoRA merged, still differentiable)."""
    return layer.merged_weight() if isinstance(layer, LoRALinear) else layer.weight


def check_pretuned_state(state_dict: Mapping[str, Tensor], depth: int, d: int) -> None:
    """Refuse a state dict that is not a full pre-tuned TOAST module of this depth and width
    (decoder keys `decoders.{l}.linear.weight` / `.linear2.weight`, `xi`, optional `P`)."""
    if any("lora_" in k for k in state_dict):
        raise ValueError("load_pretuned takes a full TOAST module's state dict, not a TOAST-Lite one.")
    expected = {f"decoders.{l}.{name}.weight": (d, d) for l in range(depth) for name in ("linear", "linear2")}
    expected["xi"] = (d,)
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [
        f"{k}: {tuple(state_dict[k].shape)} vs {shape}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    if "P" in state_dict and tuple(state_dict["P"].shape) != (d, d):
        problems.append(f"P: {tuple(state_dict['P'].shape)} vs {(d, d)}")
    if problems:
        raise ValueError(
            f"Not a pre-tuned TOAST module for this backbone (depth {depth}, width {d}): "
            + "; ".join(problems[:8])
        )
