"""The steered forward: the one forward pass every method, view, test and benchmark uses.

It runs a timm VisionTransformer's own modules block by block, with explicit touch points
(input transform, prompt tokens, linear deltas, a value signal, attention override) and a capture
spec that computes only what is asked: fused SDPA when no map is needed, one extra CLS row when
only CLS rows are needed, explicit attention only where full maps or overrides are asked for.
Nothing is registered on the model, so the shared frozen backbone is never mutated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

LayerSpec = bool | Iterable[int]
LINEAR_SITES = ("qkv", "proj", "fc1", "fc2")


class UnsupportedBackbone(ValueError):
    """The model has a block layout the steered forward does not know how to run."""


@dataclass(frozen=True)
class Capture:
    """What to return besides the final tokens. Each field: False, True (all layers) or layer indices.

    cls_attn: post-softmax attention row of the readout query (CLS, or the mean over queries for
    models without CLS), per head: {layer: (B, H, N)}.
    attn / attn_logits: full post-softmax maps / scaled pre-softmax logits: {layer: (B, H, N, N)}.
    block_inputs / block_outputs: residual stream before / after each block: {layer: (B, N, d)}.
    all_tokens: False when the caller reads only the pooled feature (a training or scoring step):
    under CLS pooling the last block then computes its CLS row only (its keys and values still come
    from every token), so `tokens` and `hidden` hold that one row. Same logits, about one block's
    work less; ignored wherever the last block's rows are captured or pooling reads other rows.
    """

    cls_attn: LayerSpec = False
    attn: LayerSpec = False
    attn_logits: LayerSpec = False
    block_inputs: LayerSpec = False
    block_outputs: LayerSpec = False
    all_tokens: bool = True


NOTHING = Capture()
#: what a training or scoring step asks of a forward: the pooled feature only
POOLED_ONLY = Capture(all_tokens=False)


class Steer:
    """Touch points on the steered forward; a method overrides the ones it uses.

    Every default leaves the frozen backbone's computation exactly as timm computes it.
    """

    #: add the value bias a second time to the value signal (TOAST's released code does this)
    value_signal_bias: bool = False

    def transform_input(self, images: Tensor) -> Tensor:
        """Pixel-space change of the normalised image (visual prompting)."""
        return images

    def prompts(self, layer: int, batch: int) -> Tensor | None:
        """Prompt tokens (B or 1, p, d) inserted after the prefix tokens before `layer` (first time)
        or overwriting those slots (later layers)."""
        return None

    def linear_delta(self, layer: int, site: str, inp: Tensor) -> Tensor | None:
        """Additive change to the output of linear `site` (qkv/proj/fc1/fc2) of block `layer`."""
        return None

    def value_signal(self, layer: int) -> Tensor | None:
        """A top-down signal td (B, N, d) in input space; the forward adds W_v·td to the values."""
        return None

    def value_delta(self, layer: int) -> Tensor | None:
        """A change (B, N, d) added to the values as it is, for a method that folds W_v into its own
        operator (TOAST): one d×d product per block less, forward and backward. Adds to value_signal."""
        return None

    def attention_override(self, layer: int) -> Tensor | None:
        """A post-softmax attention map (B, H, N, N) to use instead of the block's own."""
        return None


@dataclass
class SteeredOutput:
    """Final tokens plus whatever the capture spec asked for, and where the patch tokens are."""

    tokens: Tensor
    hidden: Tensor
    patch_start: int
    num_prompts: int
    grid: tuple[int, int]
    cls_attn: dict[int, Tensor] = field(default_factory=dict)
    attn: dict[int, Tensor] = field(default_factory=dict)
    attn_logits: dict[int, Tensor] = field(default_factory=dict)
    block_inputs: dict[int, Tensor] = field(default_factory=dict)
    block_outputs: dict[int, Tensor] = field(default_factory=dict)
    kept: Tensor | None = None  # (B, K) patch indices kept under `keep_patches`; None: all (or resumed)

    @property
    def patch_tokens(self) -> Tensor:
        return self.tokens[:, self.patch_start :]


def resolve_layers(spec: LayerSpec, depth: int) -> frozenset[int]:
    """Turn a capture field into a set of non-negative layer indices (negatives count from the end)."""
    if spec is True:
        return frozenset(range(depth))
    if spec is False or spec is None:
        return frozenset()
    out = set()
    for layer in spec:  # type: ignore[union-attr]
        idx = layer + depth if layer < 0 else layer
        if not 0 <= idx < depth:
            raise IndexError(f"Layer {layer} is out of range for a backbone with {depth} blocks.")
        out.add(idx)
    return frozenset(out)


def check_supported(model: nn.Module) -> VisionTransformer:
    """The steered forward runs standard timm pre-norm blocks; refuse anything else clearly."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedBackbone(f"Expected a timm VisionTransformer, got {type(model).__name__}.")
    for blk in model.blocks:
        if type(blk) is not Block:
            raise UnsupportedBackbone(
                f"Block type {type(blk).__name__} is not supported (only timm's standard pre-norm Block)."
            )
        if type(blk.attn) is not Attention:
            raise UnsupportedBackbone(
                f"Attention type {type(blk.attn).__name__} is not supported (only timm's standard Attention)."
            )
    return model


def embed(model: VisionTransformer, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Patch embedding + prefix tokens + positions, exactly as timm's forward_features starts."""
    x = model.patch_embed(images)
    if x.ndim == 4:  # dynamic_img_size keeps NHWC here
        grid = (int(x.shape[1]), int(x.shape[2]))
    else:
        gh, gw = model.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1]))
        grid = (int(gh), int(gw))
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    return x, grid


# Patch indices every steered forward in this context keeps (token deletion); a context variable
# rather than an argument so that every method's own forward (TOAST's pass 1, a teacher pass) honours
# it unchanged, and each thread (a Streamlit session, a run worker) sees only its own.
_KEEP: ContextVar[Tensor | None] = ContextVar("toast_keep_patches", default=None)


@contextlib.contextmanager
def keep_patches(index: Tensor) -> Iterator[None]:
    """Inside, every steered forward that embeds images keeps only patch tokens `index` (B, K) (row
    order = the image's, ascending patch order kept) and drops the rest from the sequence, after the
    positions are added. Prefix tokens (CLS, distillation, registers) stay, and prompts are inserted
    later, so they stay too: deletion native to a ViT, with no fill value."""
    token = _KEEP.set(index)
    try:
        yield
    finally:
        _KEEP.reset(token)


def _drop_patches(x: Tensor, keep: Tensor, num_prefix: int, num_patches: int) -> Tensor:
    """Keep prefix tokens and the patch tokens `keep` (B, K) of an embedded stream (B, prefix + P, d)."""
    if x.shape[1] != num_prefix + num_patches:
        raise ValueError(f"Deletion expects {num_prefix} prefix + {num_patches} patches, got {x.shape[1]}.")
    keep = keep.to(x.device, torch.long)
    if keep.ndim != 2 or keep.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"keep_patches needs (B, K) indices for {x.shape[0]} images: {tuple(keep.shape)}.")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= num_patches):
        raise IndexError(f"Patch indices must be in [0, {num_patches}).")
    keep = keep.expand(x.shape[0], -1)
    patches = x[:, num_prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix], patches], dim=1)


def _with_prompts(x: Tensor, prompts: Tensor, num_prefix: int, num_prompts: int) -> Tensor:
    """Insert prompt tokens after the prefix tokens, or overwrite the slots they already hold."""
    p = prompts.expand(x.shape[0], -1, -1).to(x.dtype)
    if num_prompts == 0:
        return torch.cat([x[:, :num_prefix], p, x[:, num_prefix:]], dim=1)
    if p.shape[1] != num_prompts:
        raise ValueError(f"Prompt count changed from {num_prompts} to {p.shape[1]} between blocks.")
    return torch.cat([x[:, :num_prefix], p, x[:, num_prefix + num_prompts :]], dim=1)


def _linear(mod: nn.Linear, inp: Tensor, steer: Steer | None, layer: int, site: str) -> Tensor:
    out = mod(inp)
    if steer is not None:
        delta = steer.linear_delta(layer, site, inp)
        if delta is not None:
            out = out + delta
    return out


def _value_change(attn: Attention, steer: Steer, layer: int, dtype: torch.dtype) -> Tensor | None:
    """What the steer adds to the values of `layer`: its value delta plus W_v·td (+ b_v if asked)."""
    dv = steer.value_delta(layer)
    td = steer.value_signal(layer)
    if td is not None:
        C = attn.num_heads * attn.head_dim
        bias = attn.qkv.bias
        b_v = bias[2 * C :] if (steer.value_signal_bias and bias is not None) else None
        from_td = F.linear(td.to(dtype), attn.qkv.weight[2 * C :], b_v)
        dv = from_td if dv is None else dv + from_td
    return None if dv is None else dv.to(dtype)


def _attention_by_image(
    q: Tensor, k: Tensor, v: Tensor, scale: float, keep_logits: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Explicit softmax attention (logits if kept, map, A·V) computed image by image into
    whole-batch outputs, for CPU passes without a graph: each image's N×N block is still in cache
    when its softmax and its A·V product read it (a batch's maps are megabytes), and without
    `keep_logits` the softmax runs in place, so the full-map capture needs one N×N buffer per block,
    not two. Same values as the batch-wide form."""
    B, H, N, D = q.shape
    weights, o = q.new_empty(B, H, N, N), q.new_empty(B, H, N, D)
    logits = q.new_empty(B, H, N, N) if keep_logits else None
    for i in range(B):
        row = weights[i] if logits is None else logits[i]
        torch.matmul(q[i] * scale, k[i].transpose(-2, -1), out=row)
        torch.softmax(row, dim=-1, out=weights[i])
        torch.matmul(weights[i], v[i], out=o[i])
    return logits, weights, o


def _attention(
    blk: Block,
    u: Tensor,
    layer: int,
    steer: Steer | None,
    want_row: bool,
    want_map: bool,
    want_logits: bool,
    has_cls: bool,
    out: SteeredOutput,
    query_rows: int | None = None,
) -> Tensor:
    """One block's attention on the normed stream `u`; with `query_rows`, only the first rows'
    queries are computed (keys and values from every token): the trimmed last block."""
    attn = blk.attn
    B, N, _ = u.shape
    H, D = attn.num_heads, attn.head_dim
    C = H * D
    gate = attn.gate(u).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = _linear(attn.qkv, u, steer, layer, "qkv")
    qkv = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dv = _value_change(attn, steer, layer, u.dtype) if steer is not None else None
    if dv is not None:
        v = v + dv.reshape(B, N, H, D).transpose(1, 2)
    override = steer.attention_override(layer) if steer is not None else None
    if query_rows is not None:
        q, N = q[:, :, :query_rows], query_rows
        gate = None if gate is None else gate[:, :query_rows]
        override = None if override is None else override[:, :, :query_rows]
    explicit = want_map or want_logits or override is not None or (want_row and not has_cls)
    if explicit:
        graph = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        by_image = not (graph or override is not None or (attn.training and attn.attn_drop.p)) and q.is_cpu
        if by_image:
            logits, weights, o = _attention_by_image(q, k, v, attn.scale, want_logits)
        else:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            weights = logits.softmax(dim=-1)
        if want_logits:
            out.attn_logits[layer] = logits
        if want_map:
            out.attn[layer] = weights
        if want_row:
            out.cls_attn[layer] = weights[:, :, 0] if has_cls else weights.mean(dim=2)
        if override is not None:
            weights = override.to(weights.dtype)
            if want_map:  # report the map the block used, as a graph node so gradient views reach it
                if torch.is_grad_enabled() and not weights.requires_grad:
                    weights = weights.detach().requires_grad_(True)
                out.attn[layer] = weights
        if not by_image:
            o = attn.attn_drop(weights) @ v
    elif torch.is_grad_enabled() and v.requires_grad and not (q.requires_grad or k.requires_grad):
        # Only the values carry a gradient (the first block a value signal reaches): the fused
        # kernel's backward recomputes the whole attention, while here it is one matmul Aᵀ·dO.
        with torch.no_grad():
            weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if want_row:
            out.cls_attn[layer] = weights[:, :, 0]  # has_cls here: the explicit branch takes the rest
        o = attn.attn_drop(weights) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        if want_row:
            row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out.cls_attn[layer] = row[:, :, 0]
    o = o.transpose(1, 2).reshape(B, N, C)
    o = getattr(attn, "norm", nn.Identity())(o)
    if gate is not None:
        o = o * gate
    return attn.proj_drop(_linear(attn.proj, o, steer, layer, "proj"))


def _mlp(blk: Block, u: Tensor, layer: int, steer: Steer | None) -> Tensor:
    mlp = blk.mlp
    h = _linear(mlp.fc1, u, steer, layer, "fc1")
    h = mlp.act(h)
    h = mlp.drop1(h)
    h = mlp.norm(h)
    h = _linear(mlp.fc2, h, steer, layer, "fc2")
    return mlp.drop2(h)


def steered_forward(
    model: VisionTransformer,
    images: Tensor | None,
    steer: Steer | None = None,
    capture: Capture = NOTHING,
    *,
    start_block: int = 0,
    hidden: Tensor | None = None,
    num_prompts: int = 0,
    grid: tuple[int, int] | None = None,
    stop_block: int | None = None,
) -> SteeredOutput:
    """Run `model` with the steering touch points and return the final-norm tokens and captures.

    With `hidden` (required when `start_block > 0`), that is the residual stream entering
    `start_block` (e.g. reused from an earlier pass; at block 0 the embedded stream, so the patch
    embedding and `transform_input` are skipped) and `images` is ignored. `stop_block` runs blocks [start_block, stop_block) only;
    `tokens` is then the final norm applied to that intermediate stream.
    """
    check_supported(model)
    depth = len(model.blocks)
    stop = depth if stop_block is None else stop_block
    if not 0 <= start_block <= stop <= depth:
        raise IndexError(f"Blocks [{start_block}, {stop}) are out of range for depth {depth}.")
    has_cls = model.cls_token is not None
    num_prefix = int(model.num_prefix_tokens)
    rows = resolve_layers(capture.cls_attn, depth)
    maps = resolve_layers(capture.attn, depth)
    logit_layers = resolve_layers(capture.attn_logits, depth)
    ins = resolve_layers(capture.block_inputs, depth)
    outs = resolve_layers(capture.block_outputs, depth)

    if hidden is None:
        if start_block > 0:
            raise ValueError("Starting past block 0 needs the hidden stream and its grid.")
        if images is None:
            raise ValueError("images are required when starting at block 0.")
        if steer is not None:
            images = steer.transform_input(images)
        x, grid = embed(model, images)
        num_prompts = 0
        kept = _KEEP.get()
        if kept is not None:
            x = _drop_patches(x, kept, num_prefix, grid[0] * grid[1])
    else:
        if grid is None:
            raise ValueError("Resuming from `hidden` needs its grid as well.")
        x = hidden
        kept = None  # a resumed stream already is what its first pass kept

    out = SteeredOutput(
        tokens=x, hidden=x, patch_start=num_prefix + num_prompts, num_prompts=num_prompts, grid=grid,
        kept=kept,
    )  # fmt: skip
    trim_at = _trimmed_block(model, capture, stop, depth, (rows, maps, logit_layers, outs))
    for layer in range(start_block, stop):
        blk = model.blocks[layer]
        if steer is not None:
            p = steer.prompts(layer, x.shape[0])
            if p is not None:
                x = _with_prompts(x, p, num_prefix, num_prompts)
                num_prompts = p.shape[1]
        if layer in ins:
            out.block_inputs[layer] = x
        query_rows = 1 if layer == trim_at else None
        a = _attention(
            blk,
            blk.norm1(x),
            layer,
            steer,
            layer in rows,
            layer in maps,
            layer in logit_layers,
            has_cls,
            out,
            query_rows,
        )
        if query_rows is not None:
            x = x[:, :query_rows]
        x = x + blk.drop_path1(blk.ls1(a))
        x = x + blk.drop_path2(blk.ls2(_mlp(blk, blk.norm2(x), layer, steer)))
        if layer in outs:
            out.block_outputs[layer] = x
    out.hidden = x
    out.tokens = model.norm(x)
    out.num_prompts = num_prompts
    out.patch_start = num_prefix + num_prompts
    return out


def _trimmed_block(
    model: VisionTransformer, capture: Capture, stop: int, depth: int, captured: tuple[frozenset[int], ...]
) -> int | None:
    """The block that computes only its CLS row (`Capture.all_tokens` False), or None: only the last
    block of a full-depth pass, under CLS pooling, with none of its rows captured."""
    last = depth - 1
    if capture.all_tokens or stop != depth or model.cls_token is None:
        return None
    if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        return None
    if any(last in layers for layers in captured):
        return None
    return last


def pool(model: VisionTransformer, out: SteeredOutput) -> Tensor:
    """Image feature from the final tokens, as timm's pre-logits computes it, with prompts excluded.

    One deliberate difference: for DeiT distilled models timm averages the CLS and distillation
    tokens; here the feature is the CLS token, as every method's spec reads it.
    """
    tokens = out.tokens
    patches = tokens[:, out.patch_start :]
    if getattr(model, "pool_include_prefix", False):
        patches = torch.cat([tokens[:, : int(model.num_prefix_tokens)], patches], dim=1)
    pool_type = model.global_pool
    if getattr(model, "attn_pool", None) is not None:
        feat = model.attn_pool(patches)
    elif pool_type == "token":
        feat = tokens[:, 0]
    elif pool_type == "avg":
        feat = patches.mean(dim=1)
    elif pool_type == "max":
        feat = patches.amax(dim=1)
    elif pool_type == "avgmax":
        feat = 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))
    else:  # no pooling configured: still one vector per image
        feat = tokens[:, 0] if model.cls_token is not None else tokens[:, out.patch_start :].mean(dim=1)
    return model.fc_norm(feat)
