"""Where runs go: which devices have workers, which device a run is queued for, and the frozen
backbone copy a run on another device than the shared backbone's gets."""

from __future__ import annotations

import copy
import dataclasses
import os
import threading

import torch

from toast_core.core.backbone import Backbone


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_devices(cpu_workers: int, gpu_workers_per_device: int) -> list[str]:
    """One entry per worker thread: `cpu_workers` × "cpu", then each visible GPU's workers."""
    devices = ["cpu"] * cpu_workers
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices += [f"cuda:{i}"] * gpu_workers_per_device
    return devices


def target_device(device: str, cpu_workers: int, gpu_workers_per_device: int) -> str:
    """Where a run will be queued: 'cpu', 'cuda' (any GPU) or 'cuda:<i>'; refuses what is not here."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and gpu_workers_per_device > 0 else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"Device '{device}' was asked for but no CUDA GPU is visible to PyTorch.")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(
                f"Device '{device}' does not exist; {torch.cuda.device_count()} GPU(s) are visible."
            )
        if gpu_workers_per_device == 0:
            raise ValueError("This RunManager has no GPU workers (gpu_workers_per_device=0).")
    elif cpu_workers == 0:
        raise ValueError("This RunManager has no CPU workers (cpu_workers=0); choose device 'cuda'.")
    return device


class BackboneCopies:
    """The shared backbone on a device: the given one where it lives, else a frozen copy made once."""

    def __init__(self) -> None:
        self._copies: dict[str, Backbone] = {}
        self._lock = threading.Lock()

    def on(self, backbone: Backbone, device: str) -> Backbone:
        if str(backbone.device) == device:
            return backbone
        with self._lock:
            if device not in self._copies:
                model = copy.deepcopy(backbone.model).to(device).eval().requires_grad_(False)
                self._copies[device] = dataclasses.replace(backbone, model=model)
            return self._copies[device]
