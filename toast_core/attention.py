"""Attention views and focus metrics: where a steering module makes the frozen ViT look.

Every view runs the method's own forward (so the one steered forward) with a capture spec and
returns an `AttentionView` over the patch grid. Patch tokens are always the LAST gh·gw tokens of a
layer (prefix tokens — CLS, distillation, registers — and any prompt tokens come first), so they are
sliced by position from the end; nothing assumes N = 1 + grid². Views leave the method's train/eval
mode as they found it and never touch the shared backbone.

Grad-CAM design (see `gradcam`): captum's `LayerGradCam` needs an `nn.Module` whose forward output it
can hook, and the steered forward runs no hookable module per block. For methods that use the base
single-pass forward, `_LastBlockTap` re-runs that same forward in two halves (blocks 0..L-2, then the
last block onwards) with an `nn.Identity` on the patch tokens entering the last block, and captum
attributes to that Identity. Methods with their own forward (TOAST's two passes, BitFit's final-norm
bias, ...) cannot be split from outside without re-implementing them, so for those the same
Grad-CAM formula is computed with `torch.autograd.grad` on the captured input of the last block
(`Capture(block_inputs=[L-1])`, i.e. pass 2 for TOAST). Both engines are tested to agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from toast_core.forward import Capture, SteeredOutput, pool, resolve_layers, steered_forward

if TYPE_CHECKING:  # importing the method package here would make methods (FORT) unable to import us
    from toast_core.methods.base import MethodOutput, SteeringMethod

HeadSpec = int | str  # a head index or "mean"
Region = Any  # a pixel mask (H, W) / (B, H, W) (numpy or torch), or a box (x0, y0, x1, y1)


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


@dataclass
class ClsMaps:
    """CLS-row attention of several layers × all heads: maps (B, L, H, gh, gw)."""

    maps: np.ndarray
    layers: tuple[int, ...]
    method: str
    pred: np.ndarray
    conf: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def view(self, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
        """The map of one captured layer (negative = from the backbone's end) and one head or the mean."""
        depth = int(self.meta.get("depth", max(self.layers) + 1))
        idx = layer + depth if layer < 0 else layer
        if idx not in self.layers:
            raise ViewUnavailable(f"Layer {layer} was not captured (captured: {list(self.layers)}).")
        per_layer = self.maps[:, self.layers.index(idx)]
        m = per_layer.mean(axis=1) if head == "mean" else per_layer[:, int(head)]
        return AttentionView(
            "cls", m.astype(np.float32), idx, head, self.method, self.pred, self.conf, dict(self.meta)
        )


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


def _cls_rows(weights: Tensor, has_cls: bool) -> Tensor:
    """Readout row of a full map (B, H, N, N), defined exactly as the forward's `cls_attn` capture."""
    return weights[:, :, 0] if has_cls else weights.mean(dim=2)


# --- CLS maps and rollout -----------------------------------------------------------------------


def _cls_maps_from(
    rows: dict[int, Tensor], layers: Sequence[int], mo: MethodOutput, method: SteeringMethod
) -> ClsMaps:
    out = mo.out
    per_layer = []
    for layer in layers:
        r = rows[layer]  # (B, H, N_l)
        per_layer.append(r[..., patch_start(r.shape[-1], out) :].reshape(*r.shape[:2], *out.grid))
    maps = torch.stack(per_layer, dim=1).detach().float().cpu().numpy()
    pred, conf = _prediction(mo.logits)
    return ClsMaps(maps, tuple(layers), method_label(method), pred, conf, _meta(out, method))


def cls_maps(method: SteeringMethod, x: Tensor, layers: Sequence[int] | None = None) -> ClsMaps:
    """CLS attention (mean over queries for no-CLS models) per layer × head: `.maps` (B, L, H, gh, gw)."""
    depth = _depth(method)
    idx = sorted(resolve_layers(True if layers is None else layers, depth))
    mo = _run(method, x, Capture(cls_attn=idx))
    return _cls_maps_from(mo.out.cls_attn, idx, mo, method)


def cls_view(method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
    """CLS attention of one layer, one head or the head mean."""
    return cls_maps(method, x, [layer]).view(layer, head)


def _aggregate_heads(weights: Tensor, head_agg: str) -> Tensor:
    if head_agg == "mean":
        return weights.mean(dim=1)
    if head_agg == "min":
        return weights.amin(dim=1)
    if head_agg == "max":
        return weights.amax(dim=1)
    raise ValueError(f"head_agg must be 'mean', 'min' or 'max', got {head_agg!r}.")


def _embed_tokens(a: Tensor, n_total: int, num_prefix: int) -> Tensor:
    """Place a (B, n, n) map of a layer that ran before `n_total - n` prompt tokens existed into the
    final token space; the absent prompt tokens get identity rows (their history starts later)."""
    n = a.shape[-1]
    if n == n_total:
        return a
    index = torch.cat([torch.arange(num_prefix), torch.arange(num_prefix, n) + (n_total - n)]).to(a.device)
    full = torch.eye(n_total, dtype=a.dtype, device=a.device).expand(a.shape[0], -1, -1).clone()
    full[:, index.unsqueeze(1), index.unsqueeze(0)] = a
    return full


def attention_rollout(
    maps: Sequence[Tensor], num_prefix: int = 1, head_agg: str = "mean", residual: float = 0.5
) -> Tensor:
    """Abnar & Zuidema rollout over the FULL token set: Π_l norm(residual·I + (1-residual)·A_l).

    `maps` are the post-softmax maps (B, H, N_l, N_l) of consecutive layers in forward order; a
    layer with fewer tokens (prompts inserted later) is embedded into the final token space.
    Returns (B, N, N): row i = how much output token i draws from each input token.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one layer's attention map.")
    n_total = maps[-1].shape[-1]
    batch = maps[-1].shape[0]
    result = torch.eye(n_total, dtype=torch.float64, device=maps[-1].device).expand(batch, -1, -1)
    for weights in maps:
        a = _aggregate_heads(weights.detach().double(), head_agg)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(dim=-1, keepdim=True)
        result = _embed_tokens(a, n_total, num_prefix) @ result
    return result.float()


def rollout_readout(rollout: Tensor, num_patches: int, has_cls: bool) -> Tensor:
    """Patch importance (B, P): the CLS row (or the mean over patch rows without CLS), patch columns."""
    cols = rollout[..., -num_patches:]
    if has_cls:
        return cols[:, 0]
    return cols[:, -num_patches:].mean(dim=1)


def _rollout_view_from(
    mo: MethodOutput, method: SteeringMethod, head_agg: str, residual: float
) -> AttentionView:
    out = mo.out
    depth = _depth(method)
    missing = [l for l in range(depth) if l not in out.attn]
    if missing:
        raise ViewUnavailable(f"{method_label(method)} returned no attention maps for layers {missing}.")
    r = attention_rollout(
        [out.attn[l] for l in range(depth)], int(method.vit.num_prefix_tokens), head_agg, residual
    )
    has_cls = method.vit.cls_token is not None
    imp = rollout_readout(r, _num_patches(out.grid), has_cls)
    pred, conf = _prediction(mo.logits)
    meta = _meta(out, method, head_agg=head_agg, residual=residual)
    return AttentionView(
        "rollout", _to_grid(imp, out.grid), None, head_agg, method_label(method), pred, conf, meta
    )


def rollout_view(
    method: SteeringMethod, x: Tensor, head_agg: str = "mean", residual: float = 0.5
) -> AttentionView:
    """Attention rollout over all layers, read at the CLS row and sliced to patch columns."""
    mo = _run(method, x, Capture(attn=True))
    return _rollout_view_from(mo, method, head_agg, residual)


def cls_and_rollout(
    method: SteeringMethod, x: Tensor, head_agg: str = "mean"
) -> tuple[ClsMaps, AttentionView]:
    """One forward capturing every full map gives both the per-layer × head CLS maps and the rollout."""
    mo = _run(method, x, Capture(attn=True))
    depth = _depth(method)
    has_cls = method.vit.cls_token is not None
    rows = {l: _cls_rows(mo.out.attn[l], has_cls) for l in range(depth)}
    return _cls_maps_from(rows, list(range(depth)), mo, method), _rollout_view_from(mo, method, head_agg, 0.5)


# --- gradient rollout (FORT's importance, methods.md §6 steps 1-3) -----------------------------


def fort_gradient_direction(grad_patches: Tensor) -> Tensor:
    """G (B, P): per image, centre the patch-token gradients over tokens and project them onto their
    first right-singular vector (FORT's `get_first_comp`). The sign is arbitrary here."""
    g = torch.nan_to_num(grad_patches.detach().double())
    g = g - g.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    return (g @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)


def gradient_rollout_from(
    patch_maps: Sequence[Tensor],
    g: Tensor | None = None,
    lam: float = 1.0,
    head_agg: str = "mean",
    keep_top: float = 0.1,
) -> Tensor:
    """FORT step 3 on patch→patch maps (B, H, P, P), forward order: per layer aggregate heads, add
    λ·G to every row, keep the top `keep_top` share per row (official rounding: zero the
    int(P·(1-keep_top)) smallest), add identity, row-normalise; multiply the layers; importance =
    mean over rows of the product. Returns (B, P)."""
    if not patch_maps:
        raise ValueError("gradient_rollout_from needs at least one layer's attention map.")
    batch, _, p, _ = patch_maps[0].shape
    device = patch_maps[0].device
    n_zero = int(p * (1.0 - keep_top))
    keep = max(1, p - n_zero)
    eye = torch.eye(p, dtype=torch.float64, device=device)
    result = eye.expand(batch, -1, -1)
    for weights in patch_maps:
        a = _aggregate_heads(weights.detach().double(), head_agg)
        if g is not None and lam != 0:
            a = a + lam * g.to(a).unsqueeze(1)
        top_vals, top_idx = a.topk(keep, dim=-1)
        a = torch.zeros_like(a).scatter_(-1, top_idx, top_vals) + eye
        s = a.sum(dim=-1, keepdim=True)
        s = torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)
        result = (a / s) @ result
    return result.mean(dim=1).float()


def _gradient_rollout(
    method: SteeringMethod,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None,
    lam: float,
    head_agg: str,
    keep_top: float,
) -> tuple[Tensor, MethodOutput]:
    depth = _depth(method)
    with _eval_mode(method), torch.enable_grad():
        xg = x.detach().to(_device(method)).requires_grad_(True)
        mo = method(xg, capture=Capture(attn=True, block_inputs=[depth - 1]))
        out = mo.out
        if depth - 1 not in out.block_inputs or len(out.attn) < depth:
            raise ViewUnavailable(f"{method_label(method)}'s forward did not honour the capture spec.")
        h = out.block_inputs[depth - 1]
        t = _targets(target, mo.logits)
        (grad,) = torch.autograd.grad(mo.logits.gather(1, t[:, None]).sum(), h)
    p = _num_patches(out.grid)
    maps = [out.attn[l].detach()[..., -p:, -p:] for l in range(depth)]
    g = fort_gradient_direction(grad[:, -p:])
    base = gradient_rollout_from(maps, None, 0.0, head_agg, keep_top).double()
    sign = torch.sign((g * (base - base.mean(dim=1, keepdim=True))).sum(dim=1, keepdim=True))
    g = g * torch.where(sign == 0, torch.ones_like(sign), sign)
    imp = gradient_rollout_from(maps, g, lam, head_agg, keep_top)
    return imp.reshape(imp.shape[0], *out.grid), mo


def gradient_rollout(
    method: SteeringMethod,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    lam: float = 1.0,
    head_agg: str = "mean",
    keep_top: float = 0.1,
) -> Tensor:
    """FORT's patch importance (B, gh, gw), on the method's device, detached.

    One forward captures every post-softmax map and the input of the last block; the gradient of
    each image's `target` logit (default: its prediction) w.r.t. that input gives G
    (`fort_gradient_direction`), signed so that Σ G·importance_λ=0 ≥ 0 (the official code leaves the
    sign arbitrary). Each image uses its own gradient (the official code backprops the batch mean,
    which scales G by 1/B). head_agg: "mean" (paper) or "min" (official code).
    """
    return _gradient_rollout(method, x, target, lam, head_agg, keep_top)[0]


def gradient_rollout_view(
    method: SteeringMethod,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    lam: float = 1.0,
    head_agg: str = "mean",
    keep_top: float = 0.1,
) -> AttentionView:
    """`gradient_rollout` as a view."""
    imp, mo = _gradient_rollout(method, x, target, lam, head_agg, keep_top)
    pred, conf = _prediction(mo.logits)
    meta = _meta(mo.out, method, lam=lam, keep_top=keep_top, target=_target_meta(target, pred))
    return AttentionView(
        "grad_rollout", imp.float().cpu().numpy(), None, head_agg, method_label(method), pred, conf, meta
    )


def _target_meta(target: Any, pred: np.ndarray) -> list[int]:
    if target is None:
        return [int(v) for v in pred]
    t = np.asarray(torch.as_tensor(target).cpu()).reshape(-1)
    return [int(v) for v in np.broadcast_to(t, pred.shape)]


# --- Grad-CAM -----------------------------------------------------------------------------------


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


# --- TOAST views --------------------------------------------------------------------------------


def _extra(mo: MethodOutput, key: str, method: SteeringMethod) -> Any:
    if key not in mo.extras:
        raise ViewUnavailable(
            f"{method_label(method)} does not provide extras['{key}']: this view exists only for "
            "TOAST-style methods (pass-1 output in extras['pass1'], selection mask in extras['selection'])."
        )
    return mo.extras[key]


def selection_view(method: SteeringMethod, x: Tensor) -> AttentionView:
    """TOAST's token-wise selection mask m = clamp(cos(z_i, ξ), 0, 1) over the patch tokens."""
    mo = _run(method, x, Capture())
    m = _extra(mo, "selection", method).detach()
    first = mo.extras.get("pass1")
    ref = first if isinstance(first, SteeredOutput) else mo.out
    start = patch_start(m.shape[-1], ref)
    pred, conf = _prediction(mo.logits)
    return AttentionView(
        "selection",
        _to_grid(m[:, start:], ref.grid),
        None,
        None,
        method_label(method),
        pred,
        conf,
        _meta(ref, method),
    )


def toast_pass_views(
    method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean"
) -> tuple[AttentionView, AttentionView]:
    """Pass-1 and pass-2 CLS maps of one layer. Pass 1 is the unsteered frozen backbone; if the
    method's pass 1 stopped early (TOAST early feedback), that layer is recomputed unsteered."""
    depth = _depth(method)
    idx = layer + depth if layer < 0 else layer
    mo = _run(method, x, Capture(cls_attn=[idx]))
    first = _extra(mo, "pass1", method)
    pred, conf = _prediction(mo.logits)
    second = _cls_maps_from(mo.out.cls_attn, [idx], mo, method).view(idx, head)
    recomputed = idx not in first.cls_attn
    if recomputed:
        with torch.no_grad():
            first = steered_forward(method.vit, x.to(_device(method)), capture=Capture(cls_attn=[idx]))
    p1 = _cls_maps_from(first.cls_attn, [idx], mo, method).view(idx, head)
    p1 = AttentionView(
        "toast_pass1",
        p1.map,
        idx,
        head,
        p1.method,
        pred,
        conf,
        {**p1.meta, "recomputed_unsteered": recomputed},
    )
    p2 = AttentionView("toast_pass2", second.map, idx, head, second.method, pred, conf, second.meta)
    return p1, p2


# --- registry and differences -------------------------------------------------------------------


def _pass1(method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
    return toast_pass_views(method, x, layer, head)[0]


def _pass2(method: SteeringMethod, x: Tensor, layer: int = -1, head: HeadSpec = "mean") -> AttentionView:
    return toast_pass_views(method, x, layer, head)[1]


VIEWS: dict[str, Callable[..., AttentionView]] = {
    "cls": cls_view,
    "rollout": rollout_view,
    "grad_rollout": gradient_rollout_view,
    "gradcam": gradcam,
    "selection": selection_view,
    "toast_pass1": _pass1,
    "toast_pass2": _pass2,
}


def compute_view(name: str, method: SteeringMethod, x: Tensor, **kwargs: Any) -> AttentionView:
    """Any view by the names `SteeringMethod.views()` lists; keyword options go to the view."""
    if name not in VIEWS:
        raise ValueError(f"Unknown view {name!r}; known views: {', '.join(VIEWS)}.")
    return VIEWS[name](method, x, **kwargs)


def difference_view(a: AttentionView, b: AttentionView, normalise: bool = True) -> AttentionView:
    """a − b for the same view, layer and head on the same images. With `normalise`, each map is
    first scaled to unit mass per image so the difference compares where, not how much."""
    if (a.name, a.layer, a.head, a.map.shape) != (b.name, b.layer, b.head, b.map.shape):
        raise ValueError(
            f"Cannot subtract {b.name}/L{b.layer}/{b.head} {b.map.shape} from "
            f"{a.name}/L{a.layer}/{a.head} {a.map.shape}: compare the same view, layer and head."
        )

    def unit(m: np.ndarray) -> np.ndarray:
        if not normalise:
            return m
        mass = np.clip(m, 0, None).sum(axis=(1, 2), keepdims=True)
        return m / np.where(mass > 0, mass, 1.0)

    meta = {"a": a.method, "b": b.method, "normalised": normalise, "grid": a.grid}
    return AttentionView(
        f"{a.name}_diff",
        (unit(a.map) - unit(b.map)).astype(np.float32),
        a.layer,
        a.head,
        f"{a.method} − {b.method}",
        a.pred,
        a.conf,
        meta,
    )


def difference(
    method_a: SteeringMethod,
    method_b: SteeringMethod,
    x: Tensor,
    view: str = "cls",
    normalise: bool = True,
    **kwargs: Any,
) -> AttentionView:
    """The same view of two modules on the same images, subtracted (a − b)."""
    return difference_view(
        compute_view(view, method_a, x, **kwargs), compute_view(view, method_b, x, **kwargs), normalise
    )


# --- focus metrics ------------------------------------------------------------------------------


def _overlap(n_cells: int, length: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(n_cells, len(lo)) overlap length of grid cell i (of `n_cells` over [0, length]) with [lo, hi]."""
    edges = np.arange(n_cells + 1, dtype=np.float64) * (length / n_cells)
    a = np.maximum(edges[:-1, None], lo[None, :])
    b = np.minimum(edges[1:, None], hi[None, :])
    return np.clip(b - a, 0.0, None)


def region_to_grid(
    region: Region, grid: tuple[int, int], image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Area fraction of each patch covered by a region: (gh, gw) or (B, gh, gw) in [0, 1].

    A pixel mask (any resolution; it spans the whole image) is averaged exactly per patch; a box
    (x0, y0, x1, y1) in pixels of the ORIGINAL image (size `image_size` = (H, W)) likewise.
    """
    gh, gw = grid
    if isinstance(region, tuple | list) and len(region) == 4 and np.ndim(region[0]) == 0:
        if image_size is None:
            raise ValueError("A box needs image_size=(H, W) of the image it was drawn on.")
        h, w = image_size
        x0, y0, x1, y1 = (float(v) for v in region)
        x0, x1 = sorted((max(0.0, min(x0, w)), max(0.0, min(x1, w))))
        y0, y1 = sorted((max(0.0, min(y0, h)), max(0.0, min(y1, h))))
        oy = _overlap(gh, h, np.array([y0]), np.array([y1]))[:, 0]
        ox = _overlap(gw, w, np.array([x0]), np.array([x1]))[:, 0]
        return (np.outer(oy, ox) / ((h / gh) * (w / gw))).astype(np.float32)
    mask = region.detach().cpu().numpy() if isinstance(region, Tensor) else np.asarray(region)
    mask = mask.astype(np.float64)
    if mask.ndim not in (2, 3):
        raise ValueError(f"A mask must be (H, W) or (B, H, W), got shape {mask.shape}.")
    h, w = mask.shape[-2:]
    pix_y, pix_x = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    oy = _overlap(gh, h, pix_y, pix_y + 1)  # (gh, H)
    ox = _overlap(gw, w, pix_x, pix_x + 1)  # (gw, W)
    frac = oy @ mask @ ox.T / ((h / gh) * (w / gw))
    return np.clip(frac, 0.0, 1.0).astype(np.float32)


def _map_and_weights(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, bool]:
    m = attn.map if isinstance(attn, AttentionView) else attn
    m = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m)
    single = m.ndim == 2
    m = np.clip(m.astype(np.float64), 0.0, None)  # mass = the positive part of the map
    if single:
        m = m[None]
    w = region_to_grid(region, (m.shape[-2], m.shape[-1]), image_size).astype(np.float64)
    return m, np.broadcast_to(w, m.shape), single


def _out(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def focus_share(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> float | np.ndarray:
    """Share of the map's (positive) mass inside the region; a uniform map scores `area_share`."""
    m, w, single = _map_and_weights(attn, region, image_size)
    mass = m.sum(axis=(1, 2))
    inside = (m * w).sum(axis=(1, 2))
    return _out(np.where(mass > 0, inside / np.where(mass > 0, mass, 1.0), 0.0), single)


def area_share(
    region: Region, grid: tuple[int, int], image_size: tuple[int, int] | None = None
) -> float | np.ndarray:
    """Share of the image area the region covers (chance level of `focus_share`)."""
    w = region_to_grid(region, grid, image_size).astype(np.float64)
    return float(w.mean()) if w.ndim == 2 else w.mean(axis=(1, 2))


def focus_ratio(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> float | np.ndarray:
    """focus_share / area_share: 1 = no better than chance, >1 = attention concentrated on the region."""
    m, w, single = _map_and_weights(attn, region, image_size)
    share = np.asarray(focus_share(m, region, image_size), dtype=np.float64).reshape(-1)
    area = w.mean(axis=(1, 2))
    return _out(np.where(area > 0, share / np.where(area > 0, area, 1.0), np.nan), single)


def pointing_game(
    attn: AttentionView | np.ndarray | Tensor,
    region: Region,
    image_size: tuple[int, int] | None = None,
    min_cover: float = 0.5,
) -> bool | np.ndarray:
    """Does the map's maximum fall on a patch that the region covers by at least `min_cover`?"""
    m, w, single = _map_and_weights(attn, region, image_size)
    flat = m.reshape(m.shape[0], -1).argmax(axis=1)
    hits = w.reshape(w.shape[0], -1)[np.arange(m.shape[0]), flat] >= min_cover
    return bool(hits[0]) if single else hits


def entropy(attn: AttentionView | np.ndarray | Tensor) -> float | np.ndarray:
    """Shannon entropy of the map as a distribution over patches, normalised to [0, 1] (1 = uniform)."""
    m = attn.map if isinstance(attn, AttentionView) else attn
    m = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m)
    single = m.ndim == 2
    m = np.clip(m.astype(np.float64), 0.0, None).reshape(1 if single else m.shape[0], -1)
    n = m.shape[1]
    mass = m.sum(axis=1, keepdims=True)
    p = m / np.where(mass > 0, mass, 1.0)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    return _out(h / np.log(n) if n > 1 else np.zeros_like(h), single)


def focus_metrics(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> dict[str, float | np.ndarray]:
    """All focus scores of a map against one region, by name."""
    m = attn.map if isinstance(attn, AttentionView) else attn
    grid = (int(np.shape(m)[-2]), int(np.shape(m)[-1]))
    return {
        "focus_share": focus_share(attn, region, image_size),
        "area_share": area_share(region, grid, image_size),
        "focus_ratio": focus_ratio(attn, region, image_size),
        "pointing_game": pointing_game(attn, region, image_size),
        "entropy": entropy(attn),
    }


def focus_summary(
    attn: AttentionView | np.ndarray | Tensor, region: Region, image_size: tuple[int, int] | None = None
) -> dict[str, float]:
    """One number per score for a set of maps on their regions (B, gh, gw) vs (B, H, W): mean focus
    share, mean area share (chance), focus ratio and pointing-game rate. The ratio is of the means,
    not a mean of per-image ratios, so one image with a tiny mask cannot dominate the score; every
    table and card in the lab reports this same statistic."""
    scores = focus_metrics(attn, region, image_size)
    share = float(np.mean(scores["focus_share"]))
    area = float(np.mean(scores["area_share"]))
    return {
        "focus_share": share,
        "area_share": area,
        "focus_ratio": share / area if area > 0 else float("nan"),
        "pointing_game": float(np.mean(scores["pointing_game"])),
    }
