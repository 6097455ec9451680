"""Shared test setup: few threads (the machine is shared), fixed seeds, one tiny frozen backbone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from toast_core.core.backbone import Backbone, tiny_fixture_backbone

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every test module starts on one thread, whatever an earlier module set (the slow ones use 2)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _deterministic_seeds() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixture_backbone() -> Backbone:
    """The random-init tiny ViT (32 px, patch 8, width 32, 2 blocks, 2 heads), frozen, on CPU."""
    return tiny_fixture_backbone()


@pytest.fixture(scope="session")
def fixture_images() -> torch.Tensor:
    """A small batch of normalised images that fits the fixture backbone."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=gen)
