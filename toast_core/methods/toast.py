"""TOAST: top-down attention steering (Shi et al., ICCV 2023; official code bfshi/TOAST).

Forward (methods.md §5):
1. pass 1: the frozen backbone runs once with no autograd graph; z = final-norm tokens (B, N, d);
2. selection, token-wise on every token (CLS included): m_i = clamp(cos(z_i, ξ), 0, 1),
   z̃_i = (m_i z_i) P;
3. feedback, top to bottom, one decoder per block (two bias-free d×d linears, no activation):
   h = z̃; for l = L-1 … 0: h = W1_l h, td_l = W2_l h;
4. pass 2: the backbone runs again and block l adds W_v td_l to its values (queries and keys
   unchanged); the logits come from pass 2.

Decoder l serves block l, exactly as the released `feedback()` indexes `decoders[depth]` (it walks
depth = L-1 … 0 and hands `td[depth]` to block `depth`), so official checkpoints map one to one.

Variants (paper §limitations), both given in 0-based block indices:
- `feedback_from = k` (early feedback): pass 1 runs blocks [0, k) only and the selection reads the
  final LayerNorm of the stream after those k blocks, i.e. of the output of block k-1 ("selection
  read from block k, pass 1 stops at k", blocks counted from 1 as in the paper). The feedback then
  starts at decoder k-1 and reaches blocks [0, k); blocks ≥ k run unsteered in pass 2. Starting at
  decoder k-1 keeps every decoder next to the block it was pre-tuned to invert (W1_l ≈ block l⁻¹).
- `feedback_to = k` (late feedback): td reaches only blocks [k, L) (decoders L-1 … k); pass 2
  starts at block k from the pass-1 stream entering block k (blocks below k see no feedback, so
  their pass-2 activations would equal pass 1's), and runs only the top L-k blocks.
Decoders outside the feedback range stay in the module (checkpoints keep one layout) but frozen.
`feedback_from = L` and `feedback_to = 0` are the default TOAST exactly.

TOAST-Lite: both decoder linears frozen plus a LoRA update (rank 4, alpha 1 → scale 0.25, B = 0,
A Kaiming, loralib's layout), trainable with ξ, P and the head.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from toast_core.core.backbone import Backbone
from toast_core.core.forward import (
    NOTHING,
    Capture,
    Steer,
    SteeredOutput,
    pool,
    resolve_layers,
    steered_forward,
)
from toast_core.methods.base import MethodConfig, MethodOutput, SteeringMethod
from toast_core.methods.toast_decoder import ToastDecoder, check_pretuned_state, decoder_matrix

CAPTURE_FIELDS = ("cls_attn", "attn", "attn_logits", "block_inputs", "block_outputs")
INIT_MODES = ("auto", "pretuned", "scratch")
PRETUNED_STEM = Path(__file__).resolve().parents[2] / "checkpoints" / "toast_pretuned"


@dataclass
class ToastConfig(MethodConfig):
    """TOAST settings. Defaults: the paper form, all blocks, official trainable set."""

    #: add the value bias b_v a second time (the released code sends td through the full qkv Linear)
    official_compat: bool = False
    #: early feedback: selection read after the first k blocks (pass 1 stops at k); None = L
    feedback_from: int | None = None
    #: late feedback: td only to blocks >= k, pass 2 starts at block k; None = 0
    feedback_to: int | None = None
    #: TOAST-Lite: frozen decoder linears plus LoRA updates
    lite: bool = False
    lora_rank: int = 4
    lora_alpha: float = 1.0
    #: train the channel selection P (official TOAST keeps it at identity; TOAST-Lite trains it)
    train_P: bool = False
    #: λ of the variational loss (0 in tuning, 0.1 in pre-tuning)
    var_loss_weight: float = 0.0
    #: where decoders and ξ start: "auto" = the pre-tuned module shipped for this backbone when there
    #: is one (else random), "pretuned" = require it, "scratch" = random init (to measure the difference)
    init: str = "auto"

    def __post_init__(self) -> None:
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {', '.join(INIT_MODES)}, got {self.init!r}.")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}.")
        if self.var_loss_weight < 0:
            raise ValueError(f"var_loss_weight must be >= 0, got {self.var_loss_weight}.")
        for name in ("feedback_from", "feedback_to"):
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be a block index >= 0 (or None), got {value}.")


@dataclass
class ToastLiteConfig(ToastConfig):
    """TOAST-Lite: LoRA rank 4 (alpha 1) on both decoder linears; ξ, P and the head trainable."""

    lite: bool = True
    train_P: bool = True


class _TopDownSignal(Steer):
    """The per-call touch point of pass 2: block l adds ΔV_l = W_v·td_l (+ b_v in official form) to V.

    A fresh object per forward keeps the module free of per-image state, so one TOAST module can
    serve several threads (a training run and a page view) at once.
    """

    def __init__(self, deltas: Mapping[int, Tensor]) -> None:
        self.deltas = deltas

    def value_delta(self, layer: int) -> Tensor | None:
        return self.deltas.get(layer)


def _capture(depth: int, **fields: frozenset[int] | set[int]) -> Capture:
    """A Capture from explicit layer sets (empty set → nothing)."""
    return Capture(**{name: (tuple(sorted(fields.get(name, ()))) or False) for name in CAPTURE_FIELDS})


def _merge_below(target: SteeredOutput, source: SteeredOutput, start: int) -> None:
    """Copy captures of blocks below `start` (not run in late-feedback pass 2) from pass 1."""
    for name in CAPTURE_FIELDS:
        dst: dict[int, Tensor] = getattr(target, name)
        for layer, value in getattr(source, name).items():
            if layer < start and layer not in dst:
                dst[layer] = value
        setattr(target, name, dict(sorted(dst.items())))


class Toast(SteeringMethod):
    """TOAST (paper form by default; `official_compat` reproduces the released code's logits).

    Call the module (`forward`): td depends on the image, so pass 2 gets a per-call steer and the
    module's own Steer touch points stay the defaults (a bare steered_forward with steer=module is
    the unsteered backbone).
    """

    name: ClassVar[str] = "toast"
    config_cls: ClassVar[type[MethodConfig]] = ToastConfig
    extra_views: ClassVar[tuple[str, ...]] = ("toast_pass1", "selection")
    #: pass 1 reads only the frozen backbone: a run caches its tokens and the stream pass 2 resumes from
    frozen_stage_kind: ClassVar[str | None] = "pass1"
    config: ToastConfig

    def __init__(self, backbone: Backbone, num_classes: int, config: ToastConfig | None = None):
        cfg = config if config is not None else self.config_cls()
        if not isinstance(cfg, ToastConfig):
            raise TypeError(f"{type(self).__name__} needs a ToastConfig, got {type(cfg).__name__}.")
        depth = backbone.layout.depth
        self.feedback_start, self.feedback_stop = _feedback_range(cfg, depth)
        self.resume_block = self.feedback_start if cfg.feedback_to else 0  # where pass 2 starts
        super().__init__(backbone, num_classes, cfg)
        self.init_source = self._initialise(cfg.init)

    def _initialise(self, mode: str) -> str:
        """Start from the shipped pre-tuned module when it belongs to this backbone (stage 2 default)."""
        if mode == "scratch":
            return "scratch"
        weights, card_path = PRETUNED_STEM.with_suffix(".safetensors"), PRETUNED_STEM.with_suffix(".json")
        card = json.loads(card_path.read_text()) if card_path.is_file() else None
        fits = (
            card is not None
            and weights.is_file()
            and card.get("backbone", {}).get("weights_hash") == self.backbone.weights_hash
        )
        if not fits:
            if mode == "pretuned":
                raise ValueError(
                    "No pre-tuned TOAST module for this backbone (hash "
                    f"{self.backbone.weights_hash}); run `python -m toast_core.training.pretune` or use init='scratch'."
                )
            return "scratch (no pre-tuned module for this backbone)"
        self.load_pretuned(load_file(str(weights)))
        self.to(self.backbone.device)
        return f"pre-tuned ({weights.name})"

    # --- construction ---------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.config
        d, depth = self.layout.embed_dim, self.layout.depth
        self.decoders = nn.ModuleList(
            ToastDecoder(d, cfg.lite, cfg.lora_rank, cfg.lora_alpha) for _ in range(depth)
        )
        self.xi = nn.Parameter(torch.randn(d))  # task embedding ξ (released: `prompt`)
        # channel selection (released: `top_down_transform`); identity and fixed unless train_P
        self.P = nn.Parameter(torch.eye(d), requires_grad=cfg.train_P)
        for layer, dec in enumerate(self.decoders):
            if not self.feedback_start <= layer < self.feedback_stop:
                dec.requires_grad_(False)  # outside the variant's range: kept for the layout, never used

    @property
    def feedback_blocks(self) -> range:
        """Blocks that receive a top-down signal in pass 2."""
        return range(self.feedback_start, self.feedback_stop)

    def load_pretuned(self, state_dict: Mapping[str, Tensor]) -> None:
        """Initialise decoders and ξ (and P if given) from a pre-tuned TOAST module's state dict.

        Accepts the state dict of a full `Toast` (decoder keys `decoders.{l}.linear.weight` /
        `.linear2.weight`); a TOAST-Lite module takes them as its frozen base weights and keeps its
        LoRA update at zero. The head is task-specific and never loaded.
        """
        check_pretuned_state(state_dict, self.layout.depth, self.layout.embed_dim)
        with torch.no_grad():
            for l, dec in enumerate(self.decoders):
                dec.linear.weight.copy_(state_dict[f"decoders.{l}.linear.weight"])
                dec.linear2.weight.copy_(state_dict[f"decoders.{l}.linear2.weight"])
                if self.config.lite:
                    for lin in (dec.linear, dec.linear2):
                        lin.lora_B.zero_()
            self.xi.copy_(state_dict["xi"])
            if "P" in state_dict:
                self.P.copy_(state_dict["P"])

    # --- the four steps -------------------------------------------------------------------------
    def select(self, z: Tensor) -> Tensor:
        """Token-wise selection mask m = clamp(cos(z_i, ξ), 0, 1), (B, N), on every token."""
        return (F.normalize(z, dim=-1) @ F.normalize(self.xi, dim=0)).clamp(0, 1)

    def feedback(self, z: Tensor, m: Tensor, fold: bool | None = None) -> dict[int, Tensor]:
        """td_l for the feedback blocks: z̃ = (m·z) P, then top to bottom h = W1_l h, td_l = W2_l h.

        The path is linear and token-wise, so td_l = m·(T_l z) with T_l = W2_l W1_l … W1_top Pᵀ.
        With many tokens (rows > 2d: training batches) the d×d operators are multiplied first
        (~2L d³ flops) and every td comes from one matmul on the pass-1 tokens, scaled by m
        afterwards: L token-sized matmuls instead of 2L + 1, and in the backward only the
        operator's gradient is a matmul (z carries no gradient; m's is an elementwise product).
        Small inputs run the chain directly. Same values either way, up to float rounding.
        """
        return self._signal(z, m, fold, into_values=False)[0]

    def value_deltas(self, z: Tensor, m: Tensor, fold: bool | None = None) -> dict[int, Tensor]:
        """What pass 2 adds to the values of each feedback block: ΔV_l = W_v,l·td_l (+ b_v,l in the
        official form). Folded, W_v,l joins the operator (W_v,l T_l, one more d³ product), so the
        whole signal is one matmul on the tokens, forward and backward, instead of that plus a
        token-sized W_v product per block and its transpose in the backward."""
        return self._signal(z, m, fold, into_values=True)[0]

    def _signal(
        self, z: Tensor, m: Tensor, fold: bool | None, into_values: bool, sizes: bool = True
    ) -> tuple[dict[int, Tensor], Tensor | None]:
        """The per-block signal (td_l, or ΔV_l with `into_values`) and td's size (see `_rms`; None
        without `sizes`)."""
        d = z.shape[-1]
        blocks = list(self.feedback_blocks)
        value_maps = [self._value_map(layer) for layer in blocks] if into_values else None
        if fold is None:
            fold = z.numel() // d > 2 * d
        if not fold:
            h = (z * m.unsqueeze(-1)) @ self.P
            td: dict[int, Tensor] = {}
            for layer in reversed(blocks):
                h, td[layer] = self.decoders[layer](h)
            size = None
            if sizes:
                with torch.no_grad():
                    size = self._per_block(
                        torch.stack([td[l].pow(2).sum(dim=-1).mean(dim=1).sqrt() for l in blocks], dim=1)
                    )
            if value_maps is not None:
                td = {l: F.linear(td[l], w, b) for l, (w, b) in zip(blocks, value_maps)}
            return td, size
        ops = self._operators(blocks)
        size = self._per_block(_rms(z, m, ops)) if sizes else None
        if value_maps is not None:
            ops = [w @ op for op, (w, _) in zip(ops, value_maps)]
        stacked = F.linear(z, torch.cat(ops, dim=0)).unflatten(-1, (len(blocks), d))  # (B, N, nb, d)
        stacked = stacked * m[..., None, None]
        if value_maps is not None and value_maps[0][1] is not None:
            stacked = stacked + torch.stack([b for _, b in value_maps])  # b_v is not scaled by m
        return dict(zip(blocks, stacked.unbind(dim=-2))), size  # unbind: one stack backward

    def _operators(self, blocks: list[int]) -> list[Tensor]:
        """T_l = W2_l W1_l … W1_top Pᵀ for `blocks` (ascending), so that td_l = m·(T_l z)."""
        ops: list[Tensor] = []
        chain = self.P.t()  # column form of z̃ = (m·z) P
        for layer in reversed(blocks):
            dec = self.decoders[layer]
            chain = decoder_matrix(dec.linear) @ chain
            ops.append(decoder_matrix(dec.linear2) @ chain)
        ops.reverse()
        return ops

    def _value_map(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """W_v of block `layer` and, in the official form, its b_v (the released code adds it twice)."""
        qkv = self.vit.blocks[layer].attn.qkv
        d = qkv.out_features // 3
        bias = qkv.bias[2 * d :] if (self.config.official_compat and qkv.bias is not None) else None
        return qkv.weight[2 * d :], bias

    def _per_block(self, sizes: Tensor) -> Tensor:
        """(B, nb) over the feedback blocks → (B, L), zero for blocks that get no feedback."""
        out = sizes.new_zeros(sizes.shape[0], self.layout.depth)
        out[:, self.feedback_start : self.feedback_stop] = sizes
        return out

    def pass1_capture(self, capture: Capture = NOTHING) -> Capture:
        """What pass 1 records: the caller's CLS rows (pass-1 vs pass-2 views), the stream entering
        the first feedback block (pass 2 starts there), and every capture of blocks pass 2 skips."""
        depth = self.layout.depth
        start = self.resume_block
        wanted = {name: set(resolve_layers(getattr(capture, name), depth)) for name in CAPTURE_FIELDS}
        fields = {name: {l for l in layers if l < start} for name, layers in wanted.items()}
        fields["cls_attn"] |= wanted["cls_attn"]
        fields["block_inputs"].add(start)  # pass 2 resumes from it (a reference, no copy)
        return _capture(depth, **fields)

    def pass2_capture(self, capture: Capture = NOTHING) -> Capture:
        """The caller's capture plus block inputs/outputs of the feedback blocks for the variational loss."""
        if self.config.var_loss_weight <= 0:
            return capture
        depth = self.layout.depth
        fields = {name: set(resolve_layers(getattr(capture, name), depth)) for name in CAPTURE_FIELDS}
        fields["block_inputs"] |= set(self.feedback_blocks)
        fields["block_outputs"] |= set(self.feedback_blocks)
        return _capture(depth, **fields)

    def forward(self, images: Tensor, capture: Capture = NOTHING) -> MethodOutput:
        # (1) pass 1: nothing before the selection is trainable, so no graph (unless the caller
        # wants gradients with respect to the input image, e.g. for saliency).
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            first = steered_forward(
                self.vit, images, capture=self.pass1_capture(capture), stop_block=self.feedback_stop
            )
        return self._after_pass1(first, capture)

    def frozen_stage_signature(self) -> str:
        return f"pass1 blocks [0, {self.feedback_stop}), resume at {self.resume_block}"

    def frozen_stage(self, images: Tensor) -> dict[str, Tensor]:
        """Pass 1's final-norm tokens (what the selection and feedback read) and the stream entering
        the block pass 2 resumes at, per image: what a cached training step needs of pass 1."""
        start = self.resume_block
        with torch.no_grad():
            first = steered_forward(
                self.vit, images, capture=Capture(block_inputs=[start]), stop_block=self.feedback_stop
            )
        return {"tokens": first.tokens, "resume": first.block_inputs[start]}

    def forward_frozen(self, stage: dict[str, Tensor], capture: Capture = NOTHING) -> MethodOutput:
        """`forward` from cached pass-1 rows (`frozen_stage`): selection, feedback and pass 2 only."""
        start, depth = self.resume_block, self.layout.depth
        asked = self.pass1_capture(capture)
        if any(
            resolve_layers(getattr(asked, n), depth) - ({start} if n == "block_inputs" else set())
            for n in CAPTURE_FIELDS
        ):
            raise ValueError("A cached pass 1 holds no captures; ask pass-1 views of `forward`.")
        tokens, grid = stage["tokens"], self.layout.grid
        first = SteeredOutput(
            tokens, tokens, self.layout.num_prefix_tokens, 0, grid, block_inputs={start: stage["resume"]}
        )
        return self._after_pass1(first, capture)

    def _after_pass1(self, first: SteeredOutput, capture: Capture) -> MethodOutput:
        """Steps 2-4 on pass 1's output: selection, feedback into value space, pass 2."""
        vit, late_start = self.vit, self.resume_block
        # (2) selection and (3) feedback, sent straight into value space (ΔV_l = W_v,l td_l)
        m = self.select(first.tokens)
        deltas, td_norm = self._signal(first.tokens, m, None, into_values=True, sizes=capture.all_tokens)
        # (4) pass 2, restarted from the pass-1 stream entering the first feedback block: the
        # embedding (and, in late feedback, every block below) would only recompute pass 1
        second = steered_forward(
            vit,
            None,
            steer=_TopDownSignal(deltas),
            capture=self.pass2_capture(capture),
            start_block=late_start,
            hidden=first.block_inputs[late_start],
            num_prompts=first.num_prompts,
            grid=first.grid,
        )
        if late_start > 0:
            _merge_below(second, first, late_start)
        features = pool(vit, second)
        extras: dict[str, Any] = {"pass1": first, "selection": m}
        if td_norm is not None:  # a view's quantity: a pooled-only (training, scoring) step skips it
            extras["td_norm"] = td_norm
        return MethodOutput(logits=self.head(features), features=features, out=second, extras=extras)

    # --- pre-tuning loss ------------------------------------------------------------------------
    def capture_for_loss(self) -> Capture:
        if self.config.var_loss_weight <= 0:
            return NOTHING
        blocks = set(self.feedback_blocks)
        return _capture(self.layout.depth, block_inputs=blocks, block_outputs=blocks)

    def variational_loss(self, output: MethodOutput) -> Tensor:
        """λ Σ_l MSE(W1_l·sg(out_l), sg(in_l)) over the feedback blocks of pass 2: W1_l learns to
        invert block l; inputs are detached so only W1 (its LoRA update in Lite) gets a gradient."""
        out = output.out
        missing = [l for l in self.feedback_blocks if l not in out.block_inputs or l not in out.block_outputs]
        if missing:
            raise ValueError(
                f"The variational loss needs pass-2 block inputs/outputs of blocks {missing}; run "
                "forward with var_loss_weight > 0 or with capture=method.capture_for_loss()."
            )
        terms = [
            F.mse_loss(self.decoders[l].linear(out.block_outputs[l].detach()), out.block_inputs[l].detach())
            for l in self.feedback_blocks
        ]
        return self.config.var_loss_weight * torch.stack(terms).sum()

    def extra_losses(self, output: MethodOutput, labels: Tensor) -> dict[str, Tensor]:
        if self.config.var_loss_weight <= 0:
            return {}
        return {"variational": self.variational_loss(output)}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["form"] = "official (b_v added twice)" if self.config.official_compat else "paper (W_v td)"
        info["init"] = getattr(self, "init_source", self.config.init)
        info["feedback_blocks"] = [self.feedback_start, self.feedback_stop]
        info["trainable_share_of_total"] = self.trainable_share_of_total()
        return info

    def trainable_share_of_total(self) -> float:
        """Trainable parameters over backbone + this module: the official code's count (~14% / ~0.9%)."""
        total = sum(p.numel() for p in self.backbone.model.parameters())
        total += sum(p.numel() for p in self.parameters())
        return self.trainable_count() / max(total, 1)


class ToastLite(Toast):
    """TOAST-Lite: LoRA (rank 4, alpha 1) on the frozen decoder linears; ξ, P and head trainable."""

    name: ClassVar[str] = "toast_lite"
    config_cls: ClassVar[type[MethodConfig]] = ToastLiteConfig

    def __init__(self, backbone: Backbone, num_classes: int, config: ToastConfig | None = None):
        cfg = config if config is not None else ToastLiteConfig()
        if not cfg.lite:
            raise ValueError("TOAST-Lite needs a config with lite=True (use ToastLiteConfig).")
        super().__init__(backbone, num_classes, cfg)


def _rms(z: Tensor, m: Tensor, ops: list[Tensor]) -> Tensor:
    """Root-mean-square over tokens of ‖td_l‖ (B, nb) without forming td, from moments:
    mean_i m_i² z_iᵀ (T_lᵀ T_l) z_i = ⟨T_lᵀ T_l, S⟩ / N with S = Σ_i m_i² z_i z_iᵀ per image
    (B·N·d² + nb·d³ flops instead of a token-sized matmul per block)."""
    with torch.no_grad():
        weighted = z * m.unsqueeze(-1)
        moments = weighted.transpose(1, 2) @ weighted  # (B, d, d)
        t = torch.stack(ops)
        grams = t.transpose(1, 2) @ t  # (nb, d, d)
        return (torch.einsum("lij,bij->bl", grams, moments) / z.shape[1]).clamp_min(0).sqrt()


def _feedback_range(cfg: ToastConfig, depth: int) -> tuple[int, int]:
    """[start, stop) of the blocks that receive feedback, checked against the backbone's depth."""
    stop = depth if cfg.feedback_from is None else int(cfg.feedback_from)
    start = 0 if cfg.feedback_to is None else int(cfg.feedback_to)
    if not 1 <= stop <= depth:
        raise ValueError(f"feedback_from must be in [1, {depth}] (blocks run in pass 1), got {stop}.")
    if not 0 <= start < depth:
        raise ValueError(f"feedback_to must be in [0, {depth - 1}], got {start}.")
    if start >= stop:
        raise ValueError(
            f"feedback_to ({start}) must be below feedback_from ({stop}): no block would get feedback."
        )
    return start, stop
