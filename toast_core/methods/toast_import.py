"""Import checkpoints of the released TOAST code (bfshi/TOAST, visual_classification) into `Toast`.

The released files come in two shapes:
- pre-tuned top-down ViTs ("Model Zoo"): `{"model": <VisionTransformer state dict>}` with
  `decoders.{l}.linear.weight`, `decoders.{l}.linear2.weight`, `prompt`, `top_down_transform` and
  the backbone (`blocks.*`, `patch_embed.*`, `cls_token`, `pos_embed`, `norm.*`);
- tuned models (trainer's `save_model_ckpt`): `{"model_state_dict": ...}` of `Topdown_ViTClass`,
  the same names under `enc.` plus the task head `head.last_layer.{weight,bias}`.
Decoder l serves block l in both (the released `feedback()` hands `decoders[l]`'s output to block l),
so decoders map one to one. The module is built with `official_compat=True`: the released attention
sends td through the full qkv Linear, adding the value bias a second time.

TOAST-Lite files (loralib `lora.Linear`) also hold `lora_A` / `lora_B`. loralib merges B·A·scale
into `weight` in place when the model is put in eval mode, and the released trainer saves after
evaluating, so by default (`lora_merged=True`) the merged part is subtracted to recover the base.
Files are read without unpickling objects (safetensors, or torch.load(weights_only=True)).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from toast_core.core.backbone import Backbone
from toast_core.methods.toast import Toast, ToastConfig, ToastLite, ToastLiteConfig

WRAPPER_KEYS = ("model_state_dict", "model", "state_dict", "module")
STRIP_PREFIXES = ("module.", "enc.")
BACKBONE_PREFIXES = ("blocks.", "patch_embed.", "norm.", "fc_norm.", "norm_pre.")
BACKBONE_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")
DECODER_KEY = re.compile(r"^decoders\.(\d+)\.(linear|linear2)\.(weight|lora_A|lora_B)$")
HEAD_NAMES = {
    "head.last_layer.weight": "head.weight",  # Topdown_ViTClass's MLP head with MLP_NUM = 0
    "head.last_layer.bias": "head.bias",
    "head.weight": "head.weight",  # the ViT's own head (a pre-tuning classifier), if any
    "head.bias": "head.bias",
}


class OfficialImportError(ValueError):
    """A state dict that is not a released TOAST checkpoint this backbone can take; says why."""


@dataclass
class OfficialToast:
    """A released checkpoint in this project's names, plus what it says about its shape."""

    state: dict[str, Tensor]
    depth: int
    dim: int
    lite: bool
    lora_rank: int | None
    num_classes: int | None
    backbone_state: dict[str, Tensor] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # official name -> this project's name


def unwrap(obj: object) -> dict[str, Tensor]:
    """The tensor state dict inside a loaded checkpoint (drops epochs, optimizer states, ...)."""
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise OfficialImportError(f"Expected a state dict, got {type(obj).__name__}.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise OfficialImportError("The checkpoint holds no tensors.")
    return tensors


def read_official(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a released checkpoint safely (never unpickles arbitrary objects)."""
    p = Path(path)
    if not p.is_file():
        raise OfficialImportError(f"Checkpoint '{p}' does not exist.")
    try:
        if p.suffix.lower() == ".safetensors":
            return unwrap(load_safetensors(str(p)))
        return unwrap(torch.load(str(p), map_location="cpu", weights_only=True))
    except OfficialImportError:
        raise
    except Exception as exc:
        raise OfficialImportError(
            f"Could not read '{p.name}' as plain tensors ({type(exc).__name__}: {exc}). Pickled "
            "objects are refused; re-save the state dict with torch.save(model.state_dict())."
        ) from exc


def _strip(name: str) -> str:
    for prefix in STRIP_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def convert_official(state_dict: Mapping[str, Tensor], *, lora_merged: bool = True) -> OfficialToast:
    """Map released names to this module's names and check every shape; refuse anything unknown."""
    state = unwrap(state_dict)
    decoders: dict[int, dict[str, Tensor]] = {}
    out: dict[str, Tensor] = {}
    renamed: dict[str, str] = {}
    backbone: dict[str, Tensor] = {}
    heads: dict[str, tuple[str, Tensor]] = {}
    unknown: list[str] = []
    for raw, tensor in state.items():
        name = _strip(raw)
        match = DECODER_KEY.match(name)
        if match:
            decoders.setdefault(int(match.group(1)), {})[f"{match.group(2)}.{match.group(3)}"] = tensor
            renamed[raw] = name
        elif name == "prompt":
            out["xi"], renamed[raw] = tensor, "xi"
        elif name == "top_down_transform":
            out["P"], renamed[raw] = tensor, "P"
        elif name in HEAD_NAMES:
            heads.setdefault(HEAD_NAMES[name], (raw, tensor))
            if raw.endswith(("last_layer.weight", "last_layer.bias")):  # the task head wins
                heads[HEAD_NAMES[name]] = (raw, tensor)
        elif name.startswith("head.projection."):
            raise OfficialImportError(
                f"'{raw}': the checkpoint's head is an MLP (MODEL.MLP_NUM > 0); only a linear head imports."
            )
        elif name.startswith(BACKBONE_PREFIXES) or name in BACKBONE_NAMES:
            backbone[name] = tensor
        else:
            unknown.append(raw)
    if unknown:
        raise OfficialImportError(f"Unknown keys for a TOAST checkpoint: {', '.join(sorted(unknown)[:10])}.")
    if not decoders:
        raise OfficialImportError("No decoders.{l}.linear(2).weight keys: not a top-down (TOAST) checkpoint.")
    for key in ("xi", "P"):
        if key not in out:
            raise OfficialImportError(f"Missing '{'prompt' if key == 'xi' else 'top_down_transform'}'.")

    depth = max(decoders) + 1
    gaps = sorted(set(range(depth)) - set(decoders))
    if gaps:
        raise OfficialImportError(f"Decoders {gaps} are missing (decoders must cover blocks 0..{depth - 1}).")
    dim = int(out["xi"].shape[0]) if out["xi"].ndim == 1 else -1
    if dim <= 0:
        raise OfficialImportError(f"'prompt' must be a vector, got shape {tuple(out['xi'].shape)}.")
    if tuple(out["P"].shape) != (dim, dim):
        raise OfficialImportError(f"'top_down_transform' is {tuple(out['P'].shape)}, expected {(dim, dim)}.")
    lite_flags = {any(k.endswith("lora_A") for k in parts) for parts in decoders.values()}
    if len(lite_flags) != 1:
        raise OfficialImportError("Some decoders have LoRA (TOAST-Lite) weights and others do not.")
    lite = lite_flags.pop()
    rank: int | None = None
    for layer in range(depth):
        parts = decoders[layer]
        needed = [
            f"{lin}.{p}"
            for lin in ("linear", "linear2")
            for p in (("weight", "lora_A", "lora_B") if lite else ("weight",))
        ]
        missing = [n for n in needed if n not in parts]
        if missing:
            raise OfficialImportError(f"Decoder {layer} lacks {', '.join(missing)}.")
        for lin in ("linear", "linear2"):
            w = parts[f"{lin}.weight"]
            if tuple(w.shape) != (dim, dim):
                raise OfficialImportError(
                    f"decoders.{layer}.{lin}.weight is {tuple(w.shape)}, expected {(dim, dim)}."
                )
            if lite:
                a, b = parts[f"{lin}.lora_A"], parts[f"{lin}.lora_B"]
                r = int(a.shape[0])
                if (
                    tuple(a.shape) != (r, dim)
                    or tuple(b.shape) != (dim, r)
                    or (rank is not None and r != rank)
                ):
                    raise OfficialImportError(
                        f"decoders.{layer}.{lin} LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                        f"width {dim} and one rank."
                    )
                rank = r
                if lora_merged:  # loralib alpha = 1: scale = 1 / r
                    w = w - (b @ a) / r
            out[f"decoders.{layer}.{lin}.weight"] = w.clone()
            if lite:
                out[f"decoders.{layer}.{lin}.lora_A"] = parts[f"{lin}.lora_A"]
                out[f"decoders.{layer}.{lin}.lora_B"] = parts[f"{lin}.lora_B"]

    num_classes = None
    if heads:
        if set(heads) != {"head.weight", "head.bias"}:
            raise OfficialImportError("The head needs both a weight and a bias.")
        (raw_w, w), (raw_b, b) = heads["head.weight"], heads["head.bias"]
        if w.ndim != 2 or w.shape[1] != dim or tuple(b.shape) != (w.shape[0],):
            raise OfficialImportError(
                f"Head shapes weight {tuple(w.shape)}, bias {tuple(b.shape)} do not fit width {dim}."
            )
        out["head.weight"], out["head.bias"] = w, b
        renamed[raw_w], renamed[raw_b] = "head.weight", "head.bias"
        num_classes = int(w.shape[0])
    return OfficialToast(
        state=out,
        depth=depth,
        dim=dim,
        lite=lite,
        lora_rank=rank,
        num_classes=num_classes,
        backbone_state=backbone,
        renamed=renamed,
    )


def check_backbone_matches(
    backbone: Backbone, backbone_state: Mapping[str, Tensor], atol: float = 1e-6
) -> None:
    """A TOAST module only means something on the backbone it was trained on: compare the weights the
    checkpoint carries with this backbone's and refuse any difference."""
    own = backbone.model.state_dict()
    missing = sorted(k for k in backbone_state if k not in own)
    shape_bad = sorted(
        k for k in backbone_state if k in own and tuple(own[k].shape) != tuple(backbone_state[k].shape)
    )
    value_bad = sorted(
        k
        for k in backbone_state
        if k in own
        and k not in shape_bad
        and not torch.allclose(own[k].detach().float().cpu(), backbone_state[k].float().cpu(), atol=atol)
    )
    if missing or shape_bad or value_bad:
        parts = ["The checkpoint was trained on a different backbone than the one loaded."]
        if missing:
            parts.append(f"Not in this backbone: {', '.join(missing[:6])}.")
        if shape_bad:
            parts.append(f"Different shapes: {', '.join(shape_bad[:6])}.")
        if value_bad:
            parts.append(f"Different values: {', '.join(value_bad[:6])}.")
        parts.append("Load the checkpoint's own backbone weights, or pass check_backbone=False.")
        raise OfficialImportError(" ".join(parts))


def build_from_official(
    backbone: Backbone,
    state_dict: Mapping[str, Tensor],
    num_classes: int | None = None,
    *,
    check_backbone: bool = True,
    lora_merged: bool = True,
    seed: int = 0,
) -> Toast:
    """A `Toast` / `ToastLite` with `official_compat=True` holding the released weights.

    `num_classes` is read from the checkpoint's head when it has one (a given value must agree);
    a checkpoint without a head (pre-tuned) needs it and gets a fresh head.
    """
    conv = convert_official(state_dict, lora_merged=lora_merged)
    layout = backbone.layout
    if (conv.depth, conv.dim) != (layout.depth, layout.embed_dim):
        raise OfficialImportError(
            f"The checkpoint has {conv.depth} decoders of width {conv.dim}; the backbone has "
            f"{layout.depth} blocks of width {layout.embed_dim}."
        )
    if check_backbone and conv.backbone_state:
        check_backbone_matches(backbone, conv.backbone_state)
    if conv.num_classes is not None and num_classes is not None and conv.num_classes != num_classes:
        raise OfficialImportError(f"The checkpoint's head has {conv.num_classes} classes, not {num_classes}.")
    classes = conv.num_classes if conv.num_classes is not None else num_classes
    if classes is None:
        raise OfficialImportError("The checkpoint has no head: pass num_classes for a fresh one.")
    if conv.lite:
        module: Toast = ToastLite(
            backbone,
            classes,
            ToastLiteConfig(
                seed=seed, official_compat=True, lora_rank=int(conv.lora_rank or 4), lora_alpha=1.0
            ),
        )
    else:
        module = Toast(backbone, classes, ToastConfig(seed=seed, official_compat=True))
    own = module.state_dict()
    expected = {k for k in own if conv.num_classes is not None or not k.startswith("head.")}
    missing, extra = sorted(expected - set(conv.state)), sorted(set(conv.state) - set(own))
    if missing or extra:
        raise OfficialImportError(
            f"Converted names do not fit: missing {missing[:6]}, unexpected {extra[:6]}."
        )
    full = dict(own)
    full.update({k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in conv.state.items()})
    module.load_state_dict(full, strict=True)
    return module
