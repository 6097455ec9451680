"""Grad-CAM of a class on the patch tokens entering the last block, with two engines.

captum's `LayerGradCam` needs an `nn.Module` whose forward output it can hook, and the steered
forward runs no hookable module per block. For methods that use the base single-pass forward,
`_LastBlockTap` re-runs that same forward in two halves (blocks 0..L-2, then the last block onwards)
with an `nn.Identity` on the patch tokens entering the last block, and captum attributes to that
Identity. Methods with their own forward (TOAST's two passes, BitFit's final-norm bias, ...) cannot
be split from outside without re-implementing them, so for those the same Grad-CAM formula is
computed with `torch.autograd.grad` on the captured input of the last block
(`Capture(block_inputs=[L-1])`, i.e. pass 2 for TOAST). Both engines are tested to agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from toast_core.core.forward import Capture, pool, steered_forward
from toast_core.views.base import (
    AttentionView,
    ViewUnavailable,
    _depth,
    _device,
    _eval_mode,
    _meta,
    _num_patches,
    _prediction,
    _run,
    _targets,
    _to_grid,
    method_label,
)

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod


def is_single_pass(method: SteeringMethod) -> bool:
    """True when the method uses the base forward (one steered pass → pool → head), which the
    captum wrapper reproduces exactly in two halves."""
    from toast_core.methods.base import SteeringMethod

    return type(method).forward is SteeringMethod.forward


class _LastBlockTap(nn.Module):
    """The base single-pass forward split at the last block, with an `nn.Identity` on the patch
    tokens entering it, laid out as (B, d, gh, gw) so captum's LayerGradCam can attribute to it."""

    def __init__(self, method: SteeringMethod) -> None:
        super().__init__()
        self.tap = nn.Identity()
        self._method = (method,)  # not a submodule: the wrapper owns nothing

    def forward(self, images: Tensor) -> Tensor:
        method = self._method[0]
        vit = method.vit
        last = len(vit.blocks) - 1
        head = steered_forward(vit, images, steer=method, stop_block=last)
        h = head.hidden
        b, n, d = h.shape
        gh, gw = head.grid
        start = n - gh * gw
        grid_tokens = h[:, start:].transpose(1, 2).reshape(b, d, gh, gw)
        tapped = self.tap(grid_tokens).reshape(b, d, gh * gw).transpose(1, 2)
        tail = steered_forward(
            vit,
            None,
            steer=method,
            start_block=last,
            hidden=torch.cat([h[:, :start], tapped], dim=1),
            num_prompts=head.num_prompts,
            grid=head.grid,
        )
        return method.head(pool(vit, tail))


def _gradcam_captum(method: SteeringMethod, x: Tensor, targets: Tensor) -> Tensor:
    from captum.attr import LayerGradCam

    wrapper = _LastBlockTap(method)
    cam = LayerGradCam(wrapper, wrapper.tap).attribute(
        x.detach().requires_grad_(True), target=targets, relu_attributions=True
    )
    return cam[:, 0].flatten(1)


def _gradcam_autograd(
    method: SteeringMethod, x: Tensor, target: int | Sequence[int] | Tensor | None
) -> tuple[Tensor, Tensor, MethodOutput]:
    """The same formula as captum's LayerGradCam on the captured last-block input: weights = mean
    over patches of d logit / d token, cam = ReLU(Σ_channels weight · token)."""
    last = _depth(method) - 1
    mo = method(x.detach().requires_grad_(True), capture=Capture(block_inputs=[last]))
    if last not in mo.out.block_inputs:
        raise ViewUnavailable(f"{method_label(method)}'s forward did not return the last block's input.")
    targets = _targets(target, mo.logits)
    h = mo.out.block_inputs[last]
    (grad,) = torch.autograd.grad(mo.logits.gather(1, targets[:, None]).sum(), h)
    p = _num_patches(mo.out.grid)
    acts, grads = h[:, -p:].detach(), grad[:, -p:]
    weights = grads.mean(dim=1, keepdim=True)  # (B, 1, d)
    return torch.relu((weights * acts).sum(dim=-1)), targets, mo


def gradcam(
    method: SteeringMethod,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    engine: str = "auto",
) -> AttentionView:
    """Grad-CAM of the predicted (or a chosen) class on the patch tokens entering the last block.

    engine "captum" (single-pass methods, depth ≥ 2), "autograd" (any method), or "auto" (captum
    where it applies). See the module docstring for why there are two.
    """
    depth = _depth(method)
    captum_ok = is_single_pass(method) and depth >= 2
    if engine == "auto":
        engine = "captum" if captum_ok else "autograd"
    if engine == "captum" and not captum_ok:
        raise ViewUnavailable(
            f"captum's LayerGradCam needs the base single-pass forward and ≥ 2 blocks; "
            f"{method_label(method)} has its own forward — use engine='autograd'."
        )
    if engine not in ("captum", "autograd"):
        raise ValueError(f"engine must be 'auto', 'captum' or 'autograd', got {engine!r}.")
    x = x.detach().to(_device(method))
    if engine == "captum":
        mo = _run(method, x, Capture())  # the prediction (and default target) first
        targets = _targets(target, mo.logits)
        with _eval_mode(method), torch.enable_grad():
            cam = _gradcam_captum(method, x, targets)
    else:
        with _eval_mode(method), torch.enable_grad():
            cam, targets, mo = _gradcam_autograd(method, x, target)
    pred, conf = _prediction(mo.logits)
    meta = _meta(mo.out, method, engine=engine, target=[int(v) for v in targets.cpu()])
    return AttentionView(
        "gradcam", _to_grid(cam, mo.out.grid), depth - 1, None, method_label(method), pred, conf, meta
    )
