"""Load one frozen ViT (embedded, timm hub, or local file) and describe its token layout.

Every steering method adapts the same backbone, so it is loaded once, frozen, and never mutated;
checkpoints of steering modules are tied to it through `weights_hash`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file as load_safetensors
from timm.models.vision_transformer import VisionTransformer

from toast_core.core.device import pick_device

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
EMBEDDED_NAME = "embedded"
EMBEDDED_WEIGHTS = CHECKPOINT_DIR / "embedded_vit.safetensors"
EMBEDDED_CARD = CHECKPOINT_DIR / "embedded_vit.json"
HUB_PROBE_TIMEOUT_S = 3.0


class BackboneError(RuntimeError):
    """A backbone could not be loaded; the message says why and what to try instead."""


@dataclass(frozen=True)
class TokenLayout:
    """Where things sit in the token sequence and how images must be prepared."""

    num_prefix_tokens: int
    has_cls: bool
    num_dist_tokens: int
    num_reg_tokens: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    embed_dim: int
    depth: int
    num_heads: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    global_pool: str
    dynamic_img_size: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Backbone:
    """A frozen timm VisionTransformer plus what the rest of the project needs to know about it."""

    model: VisionTransformer
    name: str
    source: str  # "embedded" | "hub" | "file" | "fixture"
    layout: TokenLayout
    weights_hash: str
    card: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """A flat summary for cards, pages and logs."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "source": self.source,
            "weights_hash": self.weights_hash,
            "parameters": n_params,
            **self.layout.to_dict(),
        }


def token_layout(model: VisionTransformer) -> TokenLayout:
    """Read the token layout from a timm ViT, so nothing downstream guesses N = 1 + grid²."""
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"Only timm VisionTransformer backbones are supported, got {type(model).__name__}."
        )
    pe = model.patch_embed
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(v) for v in cfg.get("std", (0.5, 0.5, 0.5)))
    has_cls = model.cls_token is not None
    num_reg = int(getattr(model, "num_reg_tokens", 0))
    num_dist = int(model.num_prefix_tokens) - int(has_cls) - num_reg
    return TokenLayout(
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_cls=has_cls,
        num_dist_tokens=num_dist,
        num_reg_tokens=num_reg,
        grid=tuple(int(g) for g in pe.grid_size),
        patch_size=tuple(int(p) for p in pe.patch_size),
        img_size=tuple(int(s) for s in pe.img_size),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        global_pool=str(model.global_pool),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
    )


def weights_hash(model: torch.nn.Module) -> str:
    """A content hash of the backbone weights (names, shapes, values) that ties checkpoints to it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def freeze(model: VisionTransformer) -> VisionTransformer:
    """Eval mode and no gradients: the shared backbone is read-only from here on."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_vit(config: dict[str, Any]) -> VisionTransformer:
    """Build a timm VisionTransformer from a plain config dict (the embedded card's `config`)."""
    kwargs = dict(config)
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    model = VisionTransformer(**kwargs)
    if pretrained_cfg:
        model.pretrained_cfg = dict(pretrained_cfg)
    return model


def _wrap(
    model: VisionTransformer,
    name: str,
    source: str,
    device: str | torch.device | None,
    card: dict[str, Any] | None = None,
    class_names: tuple[str, ...] = (),
) -> Backbone:
    freeze(model)
    digest = weights_hash(model)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    model.to(dev)
    return Backbone(
        model=model,
        name=name,
        source=source,
        layout=token_layout(model),
        weights_hash=digest,
        card=card or {},
        class_names=class_names,
    )


def load_backbone(
    name: str = EMBEDDED_NAME,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Load a frozen backbone.

    - `name="embedded"` (default): the project's own pretrained ViT from `checkpoints/`.
    - `name=<timm model name>` with `weights=None`: hub weights through timm (needs network).
    - `name=<timm architecture>` with `weights=<file>`: a local .safetensors / .pth / .bin file.
    """
    if weights is not None:
        return load_from_file(name, weights, device=device, model_kwargs=model_kwargs)
    if name == EMBEDDED_NAME:
        return load_embedded(device=device)
    return load_from_hub(name, device=device, model_kwargs=model_kwargs)


def load_embedded(
    weights_path: Path = EMBEDDED_WEIGHTS,
    card_path: Path = EMBEDDED_CARD,
    device: str | torch.device | None = "auto",
) -> Backbone:
    """The backbone the repository ships: real pretrained weights, no network needed."""
    if not weights_path.is_file() or not card_path.is_file():
        raise BackboneError(
            f"The embedded backbone is missing ({weights_path.name} / {card_path.name} not found in "
            f"{weights_path.parent}). Re-clone the repository or train it with "
            "`python -m toast_core.training.pretrain`."
        )
    card = json.loads(card_path.read_text())
    # no timm init: the strict load below overwrites every tensor (that init is most of the build time)
    model = build_vit({**card["config"], "weight_init": "skip"})
    state = _read_state_dict(weights_path)
    _load_checked(model, state, label=f"embedded backbone {weights_path.name}")
    names = tuple(card.get("class_names", ()))
    return _wrap(model, card.get("name", EMBEDDED_NAME), "embedded", device, card, names)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S, repo_id: str | None = None) -> bool:
    """One short HTTP request, so an offline machine fails in seconds instead of retrying for minutes.

    A TCP connect is not enough: proxies and captive portals accept any connection and then stall
    the download, so only a successful answer from the hub's API counts as reachable.
    """
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return False
    endpoint = str(constants.ENDPOINT).rstrip("/")
    if urlparse(endpoint).scheme not in ("http", "https"):
        return False
    url = f"{endpoint}/api/models/{repo_id}" if repo_id else endpoint
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as resp:
            return 200 <= int(resp.status) < 400
    except (OSError, ValueError):  # URLError, HTTPError, timeouts and TLS errors are all OSError
        return False


def _hub_repo_id(model_name: str) -> str | None:
    """The Hugging Face repo that holds timm's default weights for this name, if it has one."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return "/".join(hub_id.split("/", 2)[:2]) if hub_id else None


def _cached_hub_file(model_name: str) -> str | None:
    """Path of already-downloaded hub weights for this timm name, if any (works offline)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id = _hub_repo_id(model_name)
    if repo_id is None:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            return hit
    return None


def _require_vit(model_name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a non-ViT timm name before any download: build it on the meta device (no memory, instant)."""
    import timm

    try:
        with torch.device("meta"):
            probe = timm.create_model(model_name, pretrained=False, **kwargs)
    except Exception as exc:
        raise BackboneError(f"Could not build '{model_name}': {type(exc).__name__}: {exc}") from exc
    if not isinstance(probe, VisionTransformer):
        raise BackboneError(
            f"'{model_name}' is a {type(probe).__name__}, not a ViT/DeiT VisionTransformer; the steered "
            "forward needs a timm VisionTransformer (e.g. 'deit_tiny_patch16_224')."
        )


def load_from_hub(
    model_name: str,
    *,
    device: str | torch.device | None = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Any timm ViT/DeiT with hub weights; offline, fail fast with a message that suggests what works."""
    import timm

    if model_name not in timm.list_models(pretrained=True) and model_name not in timm.list_models():
        raise BackboneError(
            f"'{model_name}' is not a timm model name. Try e.g. 'deit_tiny_patch16_224' or "
            "'vit_small_patch16_224.augreg_in21k_ft_in1k', or use the embedded backbone."
        )
    kwargs = dict(model_kwargs or {})
    _require_vit(model_name, kwargs)
    cached = _cached_hub_file(model_name)
    if cached is None and not _hub_reachable(repo_id=_hub_repo_id(model_name)):
        raise BackboneError(
            f"Cannot download '{model_name}': the model hub is not reachable from this machine "
            "(offline). Use the embedded backbone ('embedded'), or load a local weights file for "
            f"the '{model_name.split('.')[0]}' architecture."
        )
    try:
        if cached is not None:
            model = timm.create_model(
                model_name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs
            )
        else:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as exc:  # network errors come in many types; one message for all
        raise BackboneError(
            f"Downloading '{model_name}' failed ({type(exc).__name__}: {exc}). Use the embedded "
            "backbone or a local weights file instead."
        ) from exc
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"'{model_name}' is a {type(model).__name__}, not a ViT/DeiT VisionTransformer."
        )
    return _wrap(model, model_name, "hub", device, {"name": model_name, "source": "hub"})


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj: Any = load_safetensors(str(path))
        except Exception as exc:
            raise BackboneError(
                f"'{path.name}' is not a valid safetensors file ({type(exc).__name__}: {exc}). "
                "Check that it is the weights file itself, not a renamed archive or web page."
            ) from exc
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            blocked = re.search(r"unsupported GLOBAL (\S+)", str(exc))
            what = f" (it needs `{blocked.group(1)}`)" if blocked else ""
            raise BackboneError(
                f"Refused to load '{path.name}': it holds pickled Python objects beyond plain "
                f"tensors{what}, and this project never unpickles files. Save a plain state dict "
                "(torch.save(model.state_dict(), ...)) or, better, a .safetensors file."
            ) from exc
        except Exception as exc:
            raise BackboneError(
                f"Could not read '{path.name}' as a torch weights file ({type(exc).__name__}: {exc})."
            ) from exc
    else:
        raise BackboneError(
            f"Unsupported weights file '{path.name}': use .safetensors, .pth, .pt or .bin."
        )
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"'{path.name}' does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """Load strictly (a headless model ignores the file's classifier); report every key that does not fit."""
    own = model.state_dict()
    if getattr(model, "num_classes", 1) == 0:
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shape_bad = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape_bad:
        parts = [f"The weights do not match the {label}."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {', '.join(missing[:12])}.")
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}.")
        if shape_bad:
            parts.append(f"Shape mismatches ({len(shape_bad)}): {'; '.join(shape_bad[:6])}.")
        raise BackboneError(" ".join(parts))
    model.load_state_dict(state, strict=True)


def load_from_file(
    arch: str,
    weights: str | os.PathLike[str],
    *,
    device: str | torch.device | None = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """A local weights file for a named timm ViT architecture; the head is dropped."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"Weights file '{path}' does not exist.")
    base = arch.split(".")[0]
    if base not in timm.list_models():
        raise BackboneError(f"'{arch}' is not a timm architecture name (e.g. 'vit_small_patch16_224').")
    kwargs = {"num_classes": 0, **(model_kwargs or {})}
    try:
        model = timm.create_model(base, pretrained=False, **kwargs)
    except Exception as exc:
        raise BackboneError(f"Could not build '{base}': {exc}") from exc
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"'{base}' is a {type(model).__name__}, not a ViT/DeiT VisionTransformer.")
    state = _read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception:
        pass  # the strict check below reports what does not fit
    _load_checked(model, state, label=f"'{base}' architecture (file {path.name})")
    card = {"name": f"{base} ({path.name})", "source": "file", "file": str(path)}
    return _wrap(model, f"{base}:{path.name}", "file", device, card)


def tiny_fixture_backbone(
    *,
    img_size: int | tuple[int, int] = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    **extra: Any,
) -> Backbone:
    """A small RANDOM-INIT ViT for tests only; never the app's default (it has learnt nothing)."""
    torch.manual_seed(seed)
    config = dict(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=0,
        **extra,
    )
    model = build_vit(config)
    return _wrap(model, "fixture:random-init", "fixture", device, {"name": "test fixture", "config": config})
