"""Compact storage for modules that hold a whole copy of the backbone (full fine-tunes, attention-
transfer students), so the shipped zoo fits its size budget.

`int8-rows`: every large matrix (ndim >= 2, >= 16 rows, >= 16k entries) is stored as int8 with one
float32 scale per output row (symmetric, absmax / 127, the usual weight-only quantisation); every other
float tensor as float16. Decoding is exact to what was encoded, and `encode(decode(encode(x)))` equals
`encode(x)` bit for bit, so a module scored after `roundtrip` is exactly the module a reader loads.
"""

from __future__ import annotations

import torch
from torch import Tensor

CODECS = ("float32", "float16", "int8-rows")
SCALE_SUFFIX = ".__row_scale__"
_MIN_ROWS, _MIN_NUMEL = 16, 16_384


class CodecError(ValueError):
    """A stored state that does not decode under the codec its card names."""


def _quantised(t: Tensor) -> bool:
    return t.is_floating_point() and t.ndim >= 2 and t.shape[0] >= _MIN_ROWS and t.numel() >= _MIN_NUMEL


def encode(state: dict[str, Tensor], codec: str) -> dict[str, Tensor]:
    """The tensors to write for `state` under `codec` (cpu, contiguous)."""
    if codec not in CODECS:
        raise CodecError(f"Unknown storage codec '{codec}' (known: {', '.join(CODECS)}).")
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if codec == "float32" or not t.is_floating_point():
            out[name] = t.contiguous()
        elif codec == "float16" or not _quantised(t):
            out[name] = t.half().contiguous()
        else:
            rows = t.float().reshape(t.shape[0], -1)
            # scales with 8 significant bits: q * scale and (127 * scale) / 127 are exact in float32,
            # which is what makes re-encoding a decoded state reproduce it bit for bit
            scale = (rows.abs().amax(dim=1) / 127.0).to(torch.bfloat16).float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            out[name] = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(t.shape).contiguous()
            out[name + SCALE_SUFFIX] = scale.contiguous()
    return out


def decode(stored: dict[str, Tensor], codec: str, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors shaped and typed as `like` (the module's own state) from what `encode` wrote."""
    if codec not in CODECS:
        raise CodecError(f"Unknown storage codec '{codec}' (known: {', '.join(CODECS)}).")
    out: dict[str, Tensor] = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        target = like.get(name)
        scale = stored.get(name + SCALE_SUFFIX)
        if scale is not None:
            if t.dtype != torch.int8 or scale.ndim != 1 or scale.shape[0] != t.shape[0]:
                raise CodecError(f"Tensor '{name}' does not decode as int8 rows with one scale per row.")
            t = (t.float().reshape(t.shape[0], -1) * scale.float()[:, None]).reshape(t.shape)
        elif t.dtype == torch.int8 and target is not None and target.is_floating_point():
            raise CodecError(f"Tensor '{name}' is int8 but has no row scales.")
        out[name] = t.to(target.dtype) if target is not None and target.is_floating_point() else t
    return out


def roundtrip(module: torch.nn.Module, codec: str) -> None:
    """Replace the module's state by what a reader of `codec` storage would load."""
    own = module.state_dict()
    module.load_state_dict(decode(encode(own, codec), codec, own), strict=True)
