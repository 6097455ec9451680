"""What does reading attention cost? The steered forward against timm's fused forward and hooks.

Variants, all on the same frozen ViT, eval mode, no_grad, CPU, one batch:
  fused       timm `forward_features` (fused SDPA): the baseline every ratio divides by
  steered     `steered_forward` capturing nothing (fused SDPA inside)
  cls_rows    `steered_forward` capturing the CLS attention row of every layer        target <= 1.10x
  full_maps   `steered_forward` capturing the full attention map of every layer       target <= 1.30x
  hooks       the usual way: a copy with `fused_attn=False` on every block and forward
              hooks on every `attn.attn_drop` collecting the maps

Rounds are interleaved (every variant once per round, rotating the order) after a warm-up, and
each variant's time is divided by the fused time of the same round, so that load from other
processes hits numerator and denominator alike; the reported ratio is the median over rounds.
Speed does not depend on the weights, so the model is built without them (pretrained=False).

Usage: python benchmarks/attention_capture.py [--repeats N] [--batch B] [--threads T] [--clock wall|cpu]
       [--smoke]
Last line: RESULT cls_ratio=... full_ratio=... hooks_ratio=... (plus the settings).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from toast_core.core.backbone import freeze, tiny_fixture_backbone
from toast_core.core.forward import Capture, steered_forward

TARGETS = {"cls_rows": 1.10, "full_maps": 1.30}
VARIANTS = ("fused", "steered", "cls_rows", "full_maps", "hooks")


def build_model(args: argparse.Namespace) -> VisionTransformer:
    if args.smoke:
        return tiny_fixture_backbone(img_size=args.img).model
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img)
    return freeze(model)


def hooked_copy(model: VisionTransformer) -> tuple[VisionTransformer, list[torch.Tensor]]:
    """The usual approach: unfused attention and a forward hook per block that keeps the map."""
    ref = copy.deepcopy(model)
    maps: list[torch.Tensor] = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda _m, _inp, out: maps.append(out))
    return ref, maps


def make_runners(model: VisionTransformer, images: torch.Tensor) -> dict[str, Callable[[], object]]:
    ref, maps = hooked_copy(model)

    def hooks() -> list[torch.Tensor]:
        ref.forward_features(images)
        got = list(maps)
        maps.clear()  # the caller alone holds the maps, as with `SteeredOutput.attn` (none kept between calls)
        return got

    return {
        "fused": lambda: model.forward_features(images),
        "steered": lambda: steered_forward(model, images),
        "cls_rows": lambda: steered_forward(model, images, capture=Capture(cls_attn=True)),
        "full_maps": lambda: steered_forward(model, images, capture=Capture(attn=True)),
        "hooks": hooks,
    }


def check_same_maps(runners: dict[str, Callable[[], object]]) -> float:
    """The variants must compute the same thing, or the comparison means nothing."""
    ours = runners["full_maps"]().attn  # type: ignore[attr-defined]
    theirs = runners["hooks"]()
    rows = runners["cls_rows"]().cls_attn  # type: ignore[attr-defined]
    diff = max(float((ours[i] - m).abs().max()) for i, m in enumerate(theirs))  # type: ignore[arg-type]
    diff = max(diff, max(float((rows[i] - ours[i][:, :, 0]).abs().max()) for i in ours))
    tokens = runners["steered"]().tokens  # type: ignore[attr-defined]
    return max(diff, float((tokens - runners["fused"]()).abs().max()))  # type: ignore[operator]


def time_rounds(
    runners: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per call, per variant (CPU time is what survives heavy load
    from other processes: time spent descheduled is not counted)."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always first
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            runners[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return wall, cpu


def paired_ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over rounds of (variant time / fused time in the same round)."""
    return statistics.median(t / b for t, b in zip(times[name], times["fused"]))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (each runs every variant)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true", help="tiny random fixture ViT, seconds")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="which ratios go into RESULT: wall clock, or process CPU time (use on a loaded machine)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.img, args.batch, args.repeats, args.warmup = 32, 4, min(args.repeats, 3), 1
        args.model = "fixture"

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args)
    images = torch.randn(args.batch, 3, args.img, args.img)
    with torch.inference_mode():
        runners = make_runners(model, images)
        max_diff = check_same_maps(runners)
        wall, cpu = time_rounds(runners, args.repeats, args.warmup)

    print(
        f"model={args.model} img={args.img} batch={args.batch} threads={args.threads} rounds={args.repeats} "
        f"warmup={args.warmup} device=cpu; max |diff| between variants {max_diff:.1e}"
    )
    print(
        f"{'variant':<10} {'wall ms':>9} {'min ms':>9} {'cpu ms':>9} {'wall ratio':>11} {'cpu ratio':>10}  target"
    )
    chosen = wall if args.clock == "wall" else cpu
    ratios = {name: paired_ratio(chosen, name) for name in VARIANTS}
    for name in VARIANTS:
        target = TARGETS.get(name)
        verdict = (
            "" if target is None else f"<={target:.2f} " + ("ok" if ratios[name] <= target else "MISSED")
        )
        print(
            f"{name:<10} {1e3 * statistics.median(wall[name]):>9.1f} {1e3 * min(wall[name]):>9.1f} "
            f"{1e3 * statistics.median(cpu[name]):>9.1f} {paired_ratio(wall, name):>11.3f} "
            f"{paired_ratio(cpu, name):>10.3f}  {verdict}"
        )
    print(f"(ratios: median over rounds of variant / fused in the same round; RESULT uses {args.clock} time)")
    verdict = "ok" if ratios["full_maps"] <= ratios["hooks"] else "MISSED"
    print(
        f"full maps vs timm hooks in this run: {ratios['full_maps']:.3f} vs {ratios['hooks']:.3f} ({verdict})"
    )
    print(
        f"RESULT cls_ratio={ratios['cls_rows']:.3f} full_ratio={ratios['full_maps']:.3f} "
        f"hooks_ratio={ratios['hooks']:.3f} steered_ratio={ratios['steered']:.3f} "
        f"fused_ms={1e3 * statistics.median(chosen['fused']):.1f} clock={args.clock} model={args.model} "
        f"batch={args.batch} threads={args.threads} rounds={args.repeats}"
    )
    return ratios


if __name__ == "__main__":
    main()
