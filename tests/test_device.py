"""Device choice: auto picks the best available, a named device is honoured or refused clearly."""

from __future__ import annotations

import pytest
import torch

from toast_core.core import device as dev
from toast_core.core.device import pick_device


def _expected_auto() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if dev._mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def test_auto_picks_best_available() -> None:
    assert pick_device("auto") == _expected_auto()
    assert pick_device(None) == _expected_auto()
    assert pick_device() == _expected_auto()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_is_cpu_without_gpu() -> None:
    if dev._mps_available():
        pytest.skip("Apple MPS is available here")
    assert pick_device("auto") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cpu", "CPU", "Cpu"])
def test_cpu_honoured(name: str) -> None:
    assert pick_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_refused_when_absent(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="'cuda' was requested but no CUDA GPU is visible"):
        pick_device(name)


def test_cuda_honoured_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_mps_refused_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(RuntimeError, match="'mps' was requested but Apple MPS is not available"):
        pick_device("mps")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda0", "xla", "cpu:0:1"])
def test_garbage_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"Unknown device .*choose one of auto, cuda, mps, cpu"):
        pick_device(name)


def test_empty_means_no_preference() -> None:
    assert pick_device("") == _expected_auto()
