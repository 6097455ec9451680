"""What every view shares: the `AttentionView` result, the forward plumbing, the readout helpers.

Every view runs the method's own forward (so the one steered forward) with a capture spec and
returns an `AttentionView` over the patch grid. Patch tokens are always the LAST gh·gw tokens of a
layer (prefix tokens — CLS, distillation, registers — and any prompt tokens come first), so they are
sliced by position from the end; nothing assumes N = 1 + grid². Views leave the method's train/eval
mode as they found it and never touch the shared backbone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from toast_core.core.forward import Capture, SteeredOutput

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod

HeadSpec = int | str  # a head index or "mean"


class ViewUnavailable(ValueError):
    """The method cannot produce the asked-for view (e.g. a TOAST view of a non-TOAST method)."""


@dataclass
class AttentionView:
    """One attention view of a batch: a map over the patch grid plus what produced it."""

    name: str
    map: np.ndarray  # (B, gh, gw) float32, over patch tokens only
    layer: int | None
    head: HeadSpec | None
    method: str
    pred: np.ndarray  # (B,) predicted class index
    conf: np.ndarray  # (B,) softmax probability of the predicted class
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.map.shape[1]), int(self.map.shape[2])

    def title(self, index: int = 0, class_names: Sequence[str] | None = None) -> str:
        """Figure title "method — pred (conf)" for image `index`."""
        k = int(self.pred[index])
        label = class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k)
        return f"{self.method} — {label} ({float(self.conf[index]):.2f})"


# --- plumbing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(method: nn.Module) -> Iterator[None]:
    """Eval mode for the view (no prompt dropout etc.), restored afterwards."""
    was_training = method.training
    method.train(False)
    try:
        yield
    finally:
        method.train(was_training)


def method_label(method: SteeringMethod) -> str:
    """A display name: an instance `label` attribute if set, else the registry name."""
    return str(getattr(method, "label", None) or method.name)


def _device(method: SteeringMethod) -> torch.device:
    return next(method.vit.parameters()).device


def _depth(method: SteeringMethod) -> int:
    return len(method.vit.blocks)


def _run(method: SteeringMethod, x: Tensor, capture: Capture) -> MethodOutput:
    """One forward of the method without autograd, in eval mode."""
    with _eval_mode(method), torch.no_grad():
        return method(x.to(_device(method)), capture=capture)


def _prediction(logits: Tensor) -> tuple[np.ndarray, np.ndarray]:
    prob = logits.detach().float().softmax(dim=-1)
    conf, pred = prob.max(dim=-1)
    return pred.cpu().numpy().astype(np.int64), conf.cpu().numpy().astype(np.float32)


def _num_patches(grid: tuple[int, int]) -> int:
    return int(grid[0]) * int(grid[1])


def patch_start(n_tokens: int, out: SteeredOutput) -> int:
    """Index of the first patch token in a sequence of `n_tokens` from this forward.

    Equals `out.patch_start` for the final sequence; a layer that ran before prompts were inserted
    has fewer tokens, and its patches still are the last gh·gw.
    """
    count = _num_patches(out.grid)
    if n_tokens == out.patch_start + count:
        return out.patch_start
    start = n_tokens - count
    if start < 0:
        raise ValueError(f"{n_tokens} tokens cannot hold a {out.grid} patch grid.")
    return start


def _to_grid(values: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(B, P) -> numpy (B, gh, gw) float32."""
    return values.detach().float().reshape(values.shape[0], *grid).cpu().numpy()


def _targets(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    """Per-image class index: the prediction (None), one class for all (int), or one per image."""
    batch = logits.shape[0]
    if target is None:
        return logits.detach().argmax(dim=-1)
    t = torch.as_tensor(target, device=logits.device, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"target has {t.numel()} entries for a batch of {batch}.")
    if int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
        raise ValueError(f"target must be in [0, {logits.shape[1]}).")
    return t.clone()


def _meta(out: SteeredOutput, method: SteeringMethod, **extra: Any) -> dict[str, Any]:
    return {
        "grid": tuple(out.grid),
        "patch_start": int(out.patch_start),
        "num_prompts": int(out.num_prompts),
        "depth": _depth(method),
        "backbone": getattr(method.backbone, "name", ""),
        **extra,
    }


def _aggregate_heads(weights: Tensor, head_agg: str) -> Tensor:
    if head_agg == "mean":
        return weights.mean(dim=1)
    if head_agg == "min":
        return weights.amin(dim=1)
    if head_agg == "max":
        return weights.amax(dim=1)
    raise ValueError(f"head_agg must be 'mean', 'min' or 'max', got {head_agg!r}.")


def _target_meta(target: Any, pred: np.ndarray) -> list[int]:
    if target is None:
        return [int(v) for v in pred]
    t = np.asarray(torch.as_tensor(target).cpu()).reshape(-1)
    return [int(v) for v in np.broadcast_to(t, pred.shape)]
