"""TOAST training-step time against full fine-tuning and against a two-pass reference written the
way the released code (bfshi/TOAST, vit_top_down.py) computes.

Why: TOAST runs the backbone twice, so its cost is the question users ask first. This project's
TOAST runs pass 1 without an autograd graph through fused attention, and sends td through W_v only;
the released code runs both passes with explicit softmax attention and sends td through the whole
qkv Linear. Late feedback (k = L/2) runs only the top half in pass 2 (pass 1 still runs every block:
the selection reads the top-layer tokens).

Two floors are timed alongside: the frozen backbone's share of any two-pass method whose signal
enters the values at block k (k = 0: TOAST; k = L/2: late feedback) — pass 1 without a graph, pass 2
from the pass-1 stream at block k with one trainable value change there, so the backward runs from
the top down to block k; no selection, no decoders. With the backbone run as it is, TOAST cannot cost
less than its floor, so a ratio target below the floor's cannot be met by TOAST's own code.

Cached rows (issue 17): within a run the images are fixed, so `train()` keeps pass 1's output per
image (`toast_core.training.feature_cache`) and a step after the first epoch runs selection, feedback and
pass 2 only (`*_cached`: a filled cache read per step). The first epoch still computes pass 1 and
stores it (`*_fill`: the cost of a step whose images are not cached yet), reported beside it.

Every contender but the reference runs the forward a training step takes: `Capture(all_tokens=False)`,
so the last block computes its CLS row only (the reference is the released code's structure, which
computes every row). Full fine-tuning gets the same saving, so `*_vs_full` compares like with like.

Default: timm vit_tiny_patch16_224 (random init, no download), 224 px, batch 16, CPU, one thread.
Every contender is timed once per round in rotating order (interleaved, so load drifts hit all
alike), after warm-up rounds; medians are reported. The default clock is the process's CPU time
(`--clock cpu`): on a machine shared with other jobs, wall time mostly measures waiting for a core,
while single-threaded CPU time measures the work. `--clock wall` for an idle machine.
`--smoke` runs the tiny fixture backbone in seconds.
Last line: `RESULT toast_vs_ref=… toast_vs_full=… lite_vs_ref=… late_vs_ref=… floor_vs_ref=…
late_floor_vs_ref=… toast_cached_vs_ref=… late_cached_vs_ref=… toast_cached_vs_full=…
toast_fill_vs_ref=… late_fill_vs_ref=…`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toast_core.core.backbone import Backbone, _wrap, tiny_fixture_backbone
from toast_core.core.forward import POOLED_ONLY, Capture, Steer, pool, steered_forward
from toast_core.methods.base import SteeringMethod
from toast_core.methods.full import FullFineTune
from toast_core.methods.toast import Toast, ToastConfig, ToastLite
from toast_core.training.feature_cache import FrozenCache

TARGETS = {
    "toast_vs_ref": 0.70,
    "toast_vs_full": 1.10,
    "late_vs_ref": 0.50,
    "toast_cached_vs_ref": 0.55,
    "late_cached_vs_ref": 0.35,
    "toast_cached_vs_full": 0.80,
}


class ReleasedTopDown(nn.Module):
    """The released two-pass forward on the same frozen backbone: explicit softmax attention, a
    grad-enabled first pass, td through the full qkv Linear (bias included) with q, k discarded."""

    def __init__(self, vit: nn.Module, source: Toast) -> None:
        super().__init__()
        self._vit = (vit,)  # frozen, shared; not registered so the optimiser never sees it
        d = source.layout.embed_dim
        self.decoders = nn.ModuleList()
        for dec in source.decoders:
            block = nn.Module()
            block.linear = nn.Linear(d, d, bias=False)
            block.linear2 = nn.Linear(d, d, bias=False)
            block.linear.weight.data.copy_(dec.linear.weight.data)
            block.linear2.weight.data.copy_(dec.linear2.weight.data)
            self.decoders.append(block)
        self.prompt = nn.Parameter(source.xi.detach().clone())
        self.top_down_transform = nn.Parameter(source.P.detach().clone(), requires_grad=False)
        self.head = nn.Linear(d, source.num_classes)
        self.head.load_state_dict(source.head.state_dict())

    def _attention(self, blk: nn.Module, x: Tensor, td: Tensor | None) -> Tensor:
        attn = blk.attn
        B, N, C = x.shape
        H = attn.num_heads
        q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        if td is not None:
            v = v + attn.qkv(td).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)[2]
        a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        return attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))

    def forward_features(self, images: Tensor, td: list[Tensor] | None = None) -> Tensor:
        vit = self._vit[0]
        x = vit._pos_embed(vit.patch_embed(images))
        for i, blk in enumerate(vit.blocks):
            x = x + self._attention(blk, blk.norm1(x), td[i] if td is not None else None)
            x = x + blk.mlp(blk.norm2(x))
        return vit.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        x = self.forward_features(images)
        cos = F.normalize(x, dim=-1) @ F.normalize(self.prompt[None, ..., None], dim=1)
        x = (x * cos.clamp(0, 1)) @ self.top_down_transform
        td: list[Tensor] = []
        for depth in range(len(self.decoders) - 1, -1, -1):
            x = self.decoders[depth].linear(x)
            td = [self.decoders[depth].linear2(x), *td]
        return self.head(self.forward_features(images, td)[:, 0])


class _ValueAt(Steer):
    """One value change at one block: the cheapest signal a two-pass method can send down."""

    def __init__(self, layer: int, delta: Tensor) -> None:
        self.layer, self.delta = layer, delta

    def value_delta(self, layer: int) -> Tensor | None:
        return self.delta if layer == self.layer else None


class TwoPassFloor(nn.Module):
    """The frozen backbone's share of a two-pass method whose signal enters the values at block
    `start`: pass 1 with no graph, pass 2 resumed from the pass-1 stream at `start` with a trainable
    value change there (the backward runs from the top down to `start`), a head; nothing else."""

    def __init__(self, bb: Backbone, num_classes: int, start: int) -> None:
        super().__init__()
        self._vit = (bb.model,)  # frozen, shared; not registered
        self.start = start
        layout = bb.layout
        self.delta = nn.Parameter(
            torch.zeros(layout.num_prefix_tokens + layout.num_patches, layout.embed_dim)
        )
        self.head = nn.Linear(layout.embed_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        vit = self._vit[0]
        with torch.no_grad():
            first = steered_forward(vit, images, capture=Capture(block_inputs=[self.start]))
        second = steered_forward(
            vit,
            None,
            steer=_ValueAt(self.start, self.delta.expand(images.shape[0], -1, -1)),
            capture=POOLED_ONLY,
            start_block=self.start,
            hidden=first.block_inputs[self.start],
            grid=first.grid,
        )
        return self.head(pool(vit, second))


def make_step(
    model: nn.Module,
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    clock: Callable[[], float],
) -> Callable[[], float]:
    """One training step (forward, cross-entropy, backward, AdamW) over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        start = clock()
        loss = F.cross_entropy(forward(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return clock() - start

    return step


def method_forward(method: SteeringMethod) -> Callable[[Tensor], Tensor]:
    """The forward a training step takes (`train()` asks for the pooled feature only)."""
    return lambda x: method(x, POOLED_ONLY).logits


def cached_forward(method: SteeringMethod, images: Tensor, filled: bool) -> Callable[[Tensor], Tensor]:
    """The training forward through the run's frozen-stage cache, as `train()` takes it: `filled`
    = every image already cached (a step after the first epoch), else a fresh cache per call (a
    first-epoch step: pass 1 computed and stored, then the rest)."""
    index = torch.arange(len(images))

    def fresh() -> FrozenCache:
        return FrozenCache(len(images), "bench", method.frozen_stage_kind or "", 2**34)

    full = fresh()
    full.get(index, lambda rows: method.frozen_stage(images[rows]))

    def forward(x: Tensor) -> Tensor:
        cache = full if filled else fresh()
        stage = cache.get(index, lambda rows: method.frozen_stage(x[rows]))
        return method.forward_frozen(stage, POOLED_ONLY).logits

    return forward


def load_inputs(args: argparse.Namespace) -> tuple[Backbone, Tensor, Tensor, int, str]:
    if args.smoke:
        bb = tiny_fixture_backbone(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
        desc = "tiny fixture (32 px, width 32, 4 blocks), random data"
        size, batch = 32, 4
    else:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        bb = _wrap(model, "vit_tiny_patch16_224 (random init)", "fixture", "cpu")
        desc = f"timm vit_tiny_patch16_224 (random init), {args.size} px"
        size, batch = args.size, args.batch
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, args.classes, (batch,), generator=gen)
    return bb, images, labels, batch, desc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny fixture backbone; runs in seconds")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    bb, images, labels, batch, desc = load_inputs(args)
    depth = bb.layout.depth
    full = FullFineTune(bb, args.classes)
    toast = Toast(bb, args.classes)
    compat = Toast(bb, args.classes, ToastConfig(official_compat=True))
    compat.load_state_dict(toast.state_dict())
    reference = ReleasedTopDown(bb.model, compat)
    lite = ToastLite(bb, args.classes)
    late = Toast(bb, args.classes, ToastConfig(feedback_to=depth // 2))
    toast_c = Toast(bb, args.classes)
    toast_c.load_state_dict(toast.state_dict())
    late_c = Toast(bb, args.classes, ToastConfig(feedback_to=depth // 2))
    late_c.load_state_dict(late.state_dict())
    floor = TwoPassFloor(bb, args.classes, 0)
    late_floor = TwoPassFloor(bb, args.classes, depth // 2)

    # The reference must compute what TOAST's official form computes, or the comparison is void.
    with torch.no_grad():
        diff = (reference(images) - compat(images).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"The reference and TOAST (official_compat) disagree by {diff:.2e}.")
    with torch.no_grad():
        cdiff = max(
            (cached_forward(c, images, True)(images) - m(images).logits).abs().max().item()
            for c, m in ((toast_c, toast), (late_c, late))
        )
    if cdiff > 1e-5:
        raise SystemExit(f"The cached and the uncached TOAST forward disagree by {cdiff:.2e}.")

    steps = {
        "full": make_step(full, method_forward(full), images, labels, clock),
        "reference": make_step(reference, reference, images, labels, clock),
        "toast": make_step(toast, method_forward(toast), images, labels, clock),
        "toast_lite": make_step(lite, method_forward(lite), images, labels, clock),
        f"late_k{depth // 2}": make_step(late, method_forward(late), images, labels, clock),
        "toast_cached": make_step(toast_c, cached_forward(toast_c, images, True), images, labels, clock),
        "toast_fill": make_step(toast_c, cached_forward(toast_c, images, False), images, labels, clock),
        "late_cached": make_step(late_c, cached_forward(late_c, images, True), images, labels, clock),
        "late_fill": make_step(late_c, cached_forward(late_c, images, False), images, labels, clock),
        "floor": make_step(floor, floor, images, labels, clock),
        f"floor_k{depth // 2}": make_step(late_floor, late_floor, images, labels, clock),
    }
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.warmup + args.repeats):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            elapsed = steps[name]()
            if rnd >= args.warmup:
                times[name].append(elapsed)
    med = {n: statistics.median(t) for n, t in times.items()}

    print(
        f"TOAST train-step time: {desc}, batch {batch}, {args.threads} thread(s), CPU, "
        f"{args.clock} clock, {args.warmup} warm-up + {args.repeats} timed rounds"
    )
    print(f"reference check: max |logit diff| reference vs TOAST official_compat = {diff:.1e}")
    print(f"cache check: max |logit diff| cached vs uncached forward (TOAST, late) = {cdiff:.1e}")
    print(f"{'method':<12} {'median ms':>10} {'min ms':>8} {'x full':>7} {'x ref':>7}  trainable")
    counts = {
        "full": full.trainable_count(),
        "reference": sum(p.numel() for p in reference.parameters() if p.requires_grad),
        "toast": toast.trainable_count(),
        "toast_lite": lite.trainable_count(),
        f"late_k{depth // 2}": late.trainable_count(),
        "toast_cached": toast_c.trainable_count(),
        "toast_fill": toast_c.trainable_count(),
        "late_cached": late_c.trainable_count(),
        "late_fill": late_c.trainable_count(),
        "floor": sum(p.numel() for p in floor.parameters()),
        f"floor_k{depth // 2}": sum(p.numel() for p in late_floor.parameters()),
    }
    for name in names:
        print(
            f"{name:<12} {med[name] * 1e3:>10.1f} {min(times[name]) * 1e3:>8.1f} "
            f"{med[name] / med['full']:>7.2f} {med[name] / med['reference']:>7.2f}  {counts[name]:,}"
        )
    result = {
        "toast_vs_ref": med["toast"] / med["reference"],
        "toast_vs_full": med["toast"] / med["full"],
        "lite_vs_ref": med["toast_lite"] / med["reference"],
        "late_vs_ref": med[f"late_k{depth // 2}"] / med["reference"],
        "floor_vs_ref": med["floor"] / med["reference"],
        "late_floor_vs_ref": med[f"floor_k{depth // 2}"] / med["reference"],
        "toast_cached_vs_ref": med["toast_cached"] / med["reference"],
        "late_cached_vs_ref": med["late_cached"] / med["reference"],
        "toast_cached_vs_full": med["toast_cached"] / med["full"],
        "toast_fill_vs_ref": med["toast_fill"] / med["reference"],
        "late_fill_vs_ref": med["late_fill"] / med["reference"],
    }
    verdicts = [f"{k} {result[k]:.2f} {'<=' if result[k] <= v else '>'} {v:.2f}" for k, v in TARGETS.items()]
    print("targets: " + "; ".join(verdicts))
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
