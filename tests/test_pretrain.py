"""Pretraining pieces on tiny inputs: dense patch targets, the loss at two resolutions, the mAP metric."""

from __future__ import annotations

import torch

from toast_core.core.backbone import build_vit
from toast_core.training.pretrain import _SourceBatches, mean_average_precision, patch_targets, pretrain_loss


def test_patch_targets_are_the_class_mix_of_each_patch() -> None:
    class_maps = torch.zeros(1, 16, 16, dtype=torch.uint8)
    class_maps[0, :8, :8] = 3  # class 2 fills the top-left patch of a 2x2 grid
    class_maps[0, 8:, 8:12] = 1  # class 0 fills half of the bottom-right patch
    soft = patch_targets(class_maps, (2, 2), num_classes=4)
    assert soft.shape == (1, 4, 5)
    assert torch.allclose(soft.sum(-1), torch.ones(1, 4))
    assert soft[0, 0, 3] == 1.0 and soft[0, 1, 0] == 1.0
    assert torch.allclose(soft[0, 3, [0, 1]], torch.tensor([0.5, 0.5]))


def test_loss_trains_one_model_at_two_resolutions() -> None:
    """Progressive resizing: the same weights take low-res then full-res batches; every part gets gradient."""
    torch.manual_seed(0)
    model = build_vit({"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3, "dynamic_img_size": True})
    patch_head = torch.nn.Linear(32, 4)
    for size in (16, 32):
        x = torch.randn(2, 3, size, size)
        targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        class_maps = torch.randint(0, 4, (2, size, size), dtype=torch.uint8)
        model.zero_grad()
        patch_head.zero_grad()
        loss = pretrain_loss(model, patch_head, x, targets, class_maps, aux_gap=0.0, dense=1.0)
        loss.backward()
        assert torch.isfinite(loss)
        assert model.pos_embed.grad.abs().sum() > 0 and patch_head.weight.grad.abs().sum() > 0
    assert model.pos_embed.shape[1] == 1 + 16  # the table keeps its full-resolution shape


def test_source_batches_switch_resolution_at_the_phase_boundary() -> None:
    batches = _SourceBatches(seed=0, batch_size=2, steps=4, start=1, size=32, low_size=16, low_steps=2)
    assert len(batches) == 3
    assert batches[0][0].shape[-1] == 16  # step 1
    assert batches[1][0].shape[-1] == 32  # step 2
    same = _SourceBatches(seed=0, batch_size=2, steps=4, start=0, size=32, low_size=16, low_steps=0)
    assert torch.equal(same[2][0], batches[1][0]), "a step's batch depends only on (seed, step)"


def test_mean_average_precision() -> None:
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert mean_average_precision(targets.clone(), targets) == 1.0
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3], [0.0, 0.9]])
    # class 0: hits at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: its one hit at rank 3 -> 1/3
    expected = ((1 + 2 / 3) / 2 + 1 / 3) / 2
    assert abs(mean_average_precision(scores, targets) - expected) < 1e-6
