"""How long the attention views of one image take for six steering modules on CPU.

CLS maps (every layer × head) + rollout come from ONE forward per module (full maps captured);
target: ≤ 1.0 s for all six on the embedded backbone. Grad-CAM and gradient rollout (a backward
each) are reported separately. Class relevance (Chefer et al. 2021: one forward + backward each;
target ≤ 0.5 s for six) and MoRF + LeRF token-deletion curves of the relevance maps (20 steps, each
step one forward of both orders; target ≤ 2 s for six) are timed for the six modules together.

Modules: six from the method registry (fresh, untrained: this measures speed, not quality); where
fewer than six names are registered the rest are plain `SteeringMethod`s with distinct random heads,
and the table says which. `--smoke` uses the tiny random fixture backbone and random data.

    python benchmarks/views_speed.py [--smoke] [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from toast_core import views as A
from toast_core.core.backbone import Backbone, load_backbone, tiny_fixture_backbone
from toast_core.methods.base import MethodConfig, SteeringMethod

PREFERRED = ("linear", "lora", "vpt", "toast", "bitfit", "visual_prompt", "full")
TARGET_S = 1.0
RELEVANCE_TARGET_S = 0.5
FAITHFULNESS_TARGET_S = 2.0
FAITHFULNESS_STEPS = 20


def build_modules(
    backbone: Backbone, num_classes: int, count: int = 6
) -> list[tuple[str, str, SteeringMethod]]:
    """(label, source, module): registry methods first, random-head base methods to fill up."""
    modules: list[tuple[str, str, SteeringMethod]] = []
    try:
        from toast_core.methods import build_method, method_names

        names = method_names()
    except ImportError:
        names, build_method = [], None  # type: ignore[assignment]
    ordered = [n for n in PREFERRED if n in names] + [n for n in names if n not in PREFERRED]
    for name in ordered:
        if len(modules) == count:
            break
        try:
            modules.append((name, "registry (untrained)", build_method(name, backbone, num_classes)))
        except Exception as exc:  # a method still being written must not stop the benchmark
            print(f"note: could not build '{name}' from the registry ({type(exc).__name__}: {exc})")
    seed = 0
    while len(modules) < count:
        modules.append(
            (
                f"base#{seed}",
                "fallback: random head",
                SteeringMethod(backbone, num_classes, MethodConfig(seed=seed)),
            )
        )
        seed += 1
    return modules


def load_inputs(smoke: bool) -> tuple[Backbone, torch.Tensor, int, str]:
    """Backbone, one normalised image (1, 3, H, W), number of classes, and where the image came from."""
    if smoke:
        backbone = tiny_fixture_backbone()
        return backbone, torch.randn(1, 3, *backbone.layout.img_size), 4, "random (smoke)"
    backbone = load_backbone("embedded", device="cpu")
    lay = backbone.layout
    try:
        from toast_core.data.base import to_model_input
        from toast_core.data.scenes import make_task_split

        data = make_task_split("stars", "test", per_class=1, seed=0, size=lay.img_size[0])
        x = to_model_input(data.images[:1], lay.mean, lay.std, lay.img_size)
        return backbone, x, data.num_classes, "scenes 'stars' test image 0"
    except ImportError:
        return backbone, torch.randn(1, 3, *lay.img_size), 10, "random (scenes not available)"


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median process CPU time of `fn` over `repeats` runs, in seconds.

    On a shared machine wall time includes waiting for a core; CPU time (all threads summed) is
    what the views cost, so both are reported.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny fixture backbone, random data")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    backbone, x, num_classes, source = load_inputs(args.smoke)
    modules = build_modules(backbone, num_classes)
    print(
        f"backbone: {backbone.name} ({backbone.layout.depth} blocks, grid {backbone.layout.grid}, "
        f"width {backbone.layout.embed_dim}); image: {source}; threads: {torch.get_num_threads()}; "
        f"device: cpu; median of {args.repeats}"
    )
    if any(src.startswith("fallback") for _, src, _ in modules):
        print(
            "note: fewer than six registry methods could be built; the rest are SteeringMethod "
            "instances with distinct random heads (a speed benchmark: the weights do not matter)"
        )

    # warm-up: first calls pay for imports and allocator growth
    for _, _, m in modules:
        A.cls_and_rollout(m, x)
        A.gradcam(m, x)
        A.gradient_rollout(m, x)
    maps = [A.relevance_view(m, x).map for _, _, m in modules]
    A.deletion_curves(modules[0][2], x, maps[0], steps=2, orders=("morf", "lerf"))
    t_rel = timed(lambda: [A.relevance_view(m, x) for _, _, m in modules], args.repeats)
    t_faith = timed(
        lambda: [
            A.deletion_curves(m, x, mp, steps=FAITHFULNESS_STEPS, orders=("morf", "lerf"))
            for (_, _, m), mp in zip(modules, maps)
        ],
        args.repeats,
    )

    rows = []
    for label, src, m in modules:
        t_views = timed(lambda m=m: A.cls_and_rollout(m, x), args.repeats)
        t_cam = timed(lambda m=m: A.gradcam(m, x), args.repeats)
        t_grad = timed(lambda m=m: A.gradient_rollout(m, x), args.repeats)
        engine = "captum" if A.is_single_pass(m) and backbone.layout.depth >= 2 else "autograd"
        rows.append((label, src, engine, t_views, t_cam, t_grad))

    head = f"{'module':<16}{'source':<24}{'gradcam':<10}"
    print(head + f"{'cls+rollout ms':>18}{'gradcam ms':>16}{'grad-roll ms':>16}   (wall / cpu)")
    fmt = lambda t: f"{t[0] * 1e3:.1f} / {t[1] * 1e3:.1f}"
    for label, src, engine, tv, tc, tg in rows:
        print(f"{label:<16}{src:<24}{engine:<10}{fmt(tv):>18}{fmt(tc):>16}{fmt(tg):>16}")
    total = lambda k: (sum(r[k][0] for r in rows), sum(r[k][1] for r in rows))
    six, cam, grad = total(3), total(4), total(5)
    print(f"{'total (6)':<50}{fmt(six):>18}{fmt(cam):>16}{fmt(grad):>16}")
    verdict = "met" if six[0] <= TARGET_S else "MISSED"
    print(
        f"CLS maps + rollout for six modules: {six[0]:.3f} s wall, {six[1]:.3f} s CPU "
        f"(target ≤ {TARGET_S:.1f} s wall: {verdict})"
    )
    for name, t, target in (
        ("Class relevance", t_rel, RELEVANCE_TARGET_S),
        (f"MoRF + LeRF curves ({FAITHFULNESS_STEPS} steps)", t_faith, FAITHFULNESS_TARGET_S),
    ):
        print(
            f"{name} for six modules: {t[0]:.3f} s wall, {t[1]:.3f} s CPU "
            f"(target ≤ {target:.1f} s wall: {'met' if t[0] <= target else 'MISSED'})"
        )
    print(
        f"RESULT six_modules_s={six[0]:.4f} gradcam_s={cam[0]:.4f} grad_rollout_s={grad[0]:.4f} "
        f"six_modules_cpu_s={six[1]:.4f} gradcam_cpu_s={cam[1]:.4f} target_met={int(six[0] <= TARGET_S)} "
        f"relevance_s={t_rel[0]:.4f} relevance_cpu_s={t_rel[1]:.4f} faithfulness_s={t_faith[0]:.4f} "
        f"faithfulness_cpu_s={t_faith[1]:.4f} smoke={int(args.smoke)}"
    )


if __name__ == "__main__":
    main()
