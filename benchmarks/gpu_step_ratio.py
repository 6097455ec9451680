"""How much faster one training step is on the GPU than on the CPU, through the real run manager.

The same run (method, task, batch size, steps) is submitted twice to a `RunManager` in a temporary
registry, once forced to the CPU and once to CUDA, and the step times come from the runs' own
records (`timings.train_ms_per_img`, which leaves out the first step's one-off costs).
`gpu_vs_cpu_step_ratio` = GPU ms per step / CPU ms per step (below 1: the GPU is faster);
`gpu_speedup` is its inverse. Without a GPU the last line says so.

Default: the embedded backbone and the built-in 'stars' task at its 96 px. `--smoke` uses the tiny
random fixture backbone at 32 px so the script runs in seconds anywhere.

    python benchmarks/gpu_step_ratio.py [--smoke] [--method lora] [--steps 30] [--batch-size 32] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from toast_core.core.backbone import Backbone, load_backbone, tiny_fixture_backbone
from toast_core.runs import RunConfig, RunManager, RunStatus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random fixture backbone (seconds, no checkpoint)"
    )
    ap.add_argument("--method", default="lora")
    ap.add_argument("--task", default="stars")
    ap.add_argument("--steps", type=int, default=None, help="default 30 (smoke: 6)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 (smoke: 8)")
    ap.add_argument(
        "--per-class", type=int, default=None, help="training images per class (default 8, smoke 1)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads for the CPU run (default: all cores)"
    )
    return ap.parse_args(argv)


def load(smoke: bool) -> Backbone:
    return tiny_fixture_backbone() if smoke else load_backbone("embedded", device="cpu")


def timed_run(manager: RunManager, config: RunConfig) -> RunStatus:
    status = manager.wait(manager.submit(config), timeout=1800)
    if status.state != "done":
        raise SystemExit(f"The {config.device} run ended {status.state}: {status.error}")
    return status


def ms_per_step(status: RunStatus, batch_size: int) -> float:
    return float(status.timings["train_ms_per_img"]) * batch_size


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    steps = args.steps or (6 if args.smoke else 30)
    batch = args.batch_size or (8 if args.smoke else 32)
    per_class = args.per_class or (1 if args.smoke else 8)
    backbone = load(args.smoke)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[tuple[str, RunStatus]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-step-ratio-") as root:
        manager = RunManager(root, backbone, cpu_threads=args.threads)
        try:
            for device in devices:
                config = RunConfig(
                    method=args.method,
                    task=args.task,
                    per_class=per_class,
                    val_per_class=1,
                    train=dict(steps=steps, batch_size=batch),
                    device=device,
                    snapshot_every=0,
                    checkpoint_every=0,
                )
                rows.append((device, timed_run(manager, config)))
        finally:
            manager.shutdown()

    size = backbone.layout.img_size
    print(
        f"backbone {backbone.name} ({size[0]}x{size[1]} px), method {args.method}, task {args.task}, "
        f"{steps} steps of {batch} images"
    )
    print(f"{'device':<8} {'threads':>7} {'amp':>5} {'ms/step':>9} {'ms/img':>8} {'peak MB':>8}  memory kind")
    for _device, s in rows:
        print(
            f"{s.device:<8} {s.threads or '-':>7} {s.amp:>5} {ms_per_step(s, batch):9.2f} "
            f"{s.timings['train_ms_per_img']:8.3f} {s.peak_mb or 0:8.1f}  {s.memory.get('kind')}"
        )
    if len(rows) < 2:
        print("RESULT gpu_vs_cpu_step_ratio=n/a reason=no-cuda")
        return
    cpu, gpu = ms_per_step(rows[0][1], batch), ms_per_step(rows[1][1], batch)
    print(
        f"RESULT gpu_vs_cpu_step_ratio={gpu / cpu:.4f} gpu_speedup={cpu / gpu:.2f} "
        f"cpu_ms_per_step={cpu:.2f} gpu_ms_per_step={gpu:.2f} device={torch.cuda.get_device_name(0).replace(' ', '_')}"
    )


if __name__ == "__main__":
    main()
