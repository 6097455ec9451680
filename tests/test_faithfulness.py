"""Class relevance (Chefer et al. 2021) and deletion faithfulness on tiny fixtures: the rule against a
plain reference on timm's own forward, its rollout limit, token deletion that keeps prefix / prompt /
register tokens, 0% deletion = the full forward, and MoRF ≤ random ≤ LeRF where the answer is known."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from toast_core import views as V
from toast_core.core.backbone import Backbone, tiny_fixture_backbone
from toast_core.core.forward import Capture, keep_patches, steered_forward
from toast_core.data.base import LabeledImages
from toast_core.methods import build_method, method_names
from toast_core.methods.base import SteeringMethod


@functools.cache
def _backbone(kind: str = "plain") -> Backbone:
    kwargs = {"registers": dict(reg_tokens=3), "no_cls": dict(class_token=False, global_pool="avg")}
    return tiny_fixture_backbone(**kwargs.get(kind, {}))


def _images(batch: int = 2, size: int = 32, seed: int = 3) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference_relevance(method: SteeringMethod, x: Tensor) -> np.ndarray:
    """The rule written out plainly, on timm's own (non-fused) forward of a copy of the backbone:
    hooks keep each block's softmax map, autograd gives ∂y_c/∂A, then R = I; R += mean_h(∇A⊙A)⁺ R."""
    model = copy.deepcopy(method.vit).eval()
    maps: list[Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        maps.append(output)

    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(keep)
    xg = x.clone().requires_grad_(True)
    logits = method.head(model.forward_head(model.forward_features(xg), pre_logits=True))
    target = logits.argmax(dim=-1)
    logits.gather(1, target[:, None]).sum().backward()
    prefix, (gh, gw) = model.num_prefix_tokens, method.layout.grid
    out = []
    for b in range(x.shape[0]):
        n = maps[0].shape[-1]
        r = np.eye(n)
        for a in maps:
            cam = np.clip(a.grad[b].double().numpy() * a[b].detach().double().numpy(), 0, None).mean(axis=0)
            r = r + cam @ r
        row = r[0, prefix:] if model.cls_token is not None else r[prefix:, prefix:].mean(axis=0)
        out.append(row.reshape(gh, gw))
    return np.stack(out)


@pytest.mark.parametrize("kind", ["plain", "registers", "no_cls"])
def test_relevance_equals_the_plain_reference_of_the_rule(kind: str) -> None:
    method = build_method("linear", _backbone(kind), 3)
    torch.nn.init.normal_(method.head.weight, std=1.0)
    x = _images()
    view = V.relevance_view(method, x)
    expected = _reference_relevance(method, x)
    assert view.name == "relevance" and view.map.shape == (2, 4, 4)
    np.testing.assert_allclose(view.map, expected, rtol=1e-4, atol=1e-7)
    assert view.map.max() > 0 and not np.allclose(view.map[0], view.map[0].mean())


def test_relevance_with_uniform_gradients_is_rollout() -> None:
    """With ∂y/∂A ≡ 1, Ā = mean_h A and R = Π(I + A) = 2^L · rollout(residual ½): same map up to scale."""
    method = SteeringMethod(_backbone(), 3)
    with torch.no_grad():
        out = steered_forward(method.vit, _images(), capture=Capture(attn=True))
    maps = [out.attn[0], out.attn[1]]
    rel = V.relevance_from(maps, [torch.ones_like(a) for a in maps], num_prefix=1)
    roll = V.attention_rollout(maps, num_prefix=1, residual=0.5)
    torch.testing.assert_close(rel, roll * 2 ** len(maps), rtol=1e-5, atol=1e-6)
    # and gradients matter: a gradient that zeroes one head's weight changes the map
    grads = [torch.ones_like(a) for a in maps]
    grads[1][:, 1] = 0
    assert not torch.allclose(V.relevance_from(maps, grads)[:, 0], rel[:, 0])


def test_relevance_target_and_every_registered_method() -> None:
    x = _images()
    for name in method_names():
        method = build_method(name, _backbone(), 3)
        torch.nn.init.normal_(method.head.weight, std=1.0)
        view = V.compute_view("relevance", method, x)
        assert view.map.shape == (2, 4, 4) and np.isfinite(view.map).all() and (view.map >= 0).all(), name
        assert "relevance" in method.views()
    method = build_method("linear", _backbone(), 3)
    torch.nn.init.normal_(method.head.weight, std=1.0)
    a, b = V.relevance_view(method, x, target=0), V.relevance_view(method, x, target=1)
    assert a.meta["target"] == [0, 0] and not np.allclose(a.map, b.map)
    assert all(p.grad is None for p in method.parameters())


# --- token deletion -----------------------------------------------------------------------------


def test_token_deletion_keeps_prefix_register_and_prompt_tokens() -> None:
    backbone = _backbone("registers")  # CLS + 3 registers
    method = build_method("vpt", backbone, 3, {"num_tokens": 2, "deep": True})
    method.eval()
    x = _images()
    keep = torch.tensor([[0, 5, 9], [2, 3, 15]])
    with torch.no_grad():
        full = steered_forward(method.vit, x, steer=method, capture=Capture(block_inputs=[0]))
        with keep_patches(keep):
            cut = steered_forward(method.vit, x, steer=method, capture=Capture(block_inputs=[0]))
            logits = method(x).logits
    prefix, prompts = backbone.layout.num_prefix_tokens, 2
    assert prefix == 4 and cut.patch_start == prefix + prompts == full.patch_start
    assert cut.tokens.shape[1] == prefix + prompts + 3 and torch.equal(cut.kept, keep)
    h_full, h_cut = full.block_inputs[0], cut.block_inputs[0]
    torch.testing.assert_close(
        h_cut[:, : prefix + prompts], h_full[:, : prefix + prompts]
    )  # CLS, regs, prompts
    for b in range(2):
        torch.testing.assert_close(h_cut[b, prefix + prompts :], h_full[b, prefix + prompts + keep[b]])
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    with pytest.raises(IndexError), torch.no_grad(), keep_patches(torch.tensor([[16]])):
        method(x)


@pytest.mark.parametrize(
    "name,kind", [("linear", "plain"), ("linear", "no_cls"), ("vpt", "registers"), ("toast", "plain"),
                  ("attn_copy", "plain"), ("visual_prompt", "plain")]
)  # fmt: skip
def test_deleting_nothing_equals_the_full_forward(name: str, kind: str) -> None:
    method = build_method(name, _backbone(kind), 3)
    torch.nn.init.normal_(method.head.weight, std=1.0)
    method.eval()
    x = _images(3)
    with torch.no_grad():
        prob = method(x).logits.softmax(-1)
    curves = V.deletion_curves(method, x, np.random.default_rng(0).random((3, 4, 4)), steps=4)
    pred = prob.argmax(-1)
    np.testing.assert_array_equal(curves.target, pred.numpy())
    for order in V.faithfulness.ORDERS:
        np.testing.assert_allclose(
            curves.probs[order][:, 0], prob.gather(1, pred[:, None])[:, 0].numpy(), rtol=1e-5
        )
    assert curves.fractions[0] == 0 and curves.fractions[-1] == 15 / 16  # one patch is always left


# --- a case where the answer is known -------------------------------------------------------------


def _bright_patch_case() -> tuple[SteeringMethod, Tensor, np.ndarray]:
    """Identity blocks (attention and MLP outputs zeroed) and mean pooling: the class-1 logit grows
    with the share of bright patches among those present. Bright patches are exactly what decides."""
    backbone = tiny_fixture_backbone(img_size=64, global_pool="avg", class_token=False, seed=1)
    with torch.no_grad():
        for blk in backbone.model.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    method = SteeringMethod(backbone, 2).eval()
    gen = torch.Generator().manual_seed(0)
    bright = torch.zeros(4, 64, dtype=torch.bool)
    for b in range(4):
        bright[b, torch.randperm(64, generator=gen)[:16]] = True
    x = torch.where(bright.reshape(4, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3), 1.0, -1.0)
    x = x.expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():  # class-1 margin: -2 with no bright patch, +2 on the images (a quarter bright)
        f1, f0 = method(torch.ones(1, 3, 64, 64)).features[0], method(-torch.ones(1, 3, 64, 64)).features[0]
        w = f1 - f0
        d0, d = float(w @ f0), (method(x).features @ w).mean()
        a = 4.0 / float(d - d0)
        method.head.weight.copy_(torch.stack([-a * w / 2, a * w / 2]))
        method.head.bias.copy_(torch.tensor([1.0, -1.0]) * (a * d0 + 2) / 2)
    return method, x, bright.reshape(4, 8, 8).float().numpy()


@pytest.mark.parametrize("mode", ["tokens", "mean_fill"])
def test_morf_below_random_below_lerf_when_the_deciding_patches_are_known(mode: str) -> None:
    method, x, truth = _bright_patch_case()
    curves = V.deletion_curves(method, x, truth, steps=16, mode=mode, seed=0)
    assert (curves.target == 1).all()  # the bright share decides for class 1
    aucs = curves.aucs()
    assert (aucs["morf"] < aucs["random"]).all() and (aucs["random"] < aucs["lerf"]).all(), aucs
    s = curves.summary()
    assert s["gap"] == pytest.approx(s["lerf_auc"] - s["morf_auc"]) and s["gap"] > 0.3
    # the ranking is what matters: the reversed map swaps the two curves
    flipped = V.deletion_curves(method, x, 1 - truth, steps=16, mode=mode, seed=0)
    np.testing.assert_allclose(flipped.probs["morf"], curves.probs["lerf"], atol=1e-5)


def test_rank_patches_orders_and_breaks_ties_by_the_seed() -> None:
    maps = np.array([[[0.1, 0.9], [0.5, 0.5]]])
    assert V.rank_patches(maps, "morf")[0][0] == 1 and V.rank_patches(maps, "lerf")[0][0] == 0
    assert sorted(V.rank_patches(maps, "random", seed=3)[0]) == [0, 1, 2, 3]
    ties = {tuple(V.rank_patches(np.zeros((1, 4, 4)), "morf", seed=s)[0]) for s in range(5)}
    assert len(ties) > 1  # not position order
    with pytest.raises(ValueError, match="order"):
        V.rank_patches(maps, "best")


def test_faithfulness_summary_over_a_data_set() -> None:
    method = build_method("linear", _backbone(), 3)
    torch.nn.init.normal_(method.head.weight, std=1.0)
    gen = torch.Generator().manual_seed(0)
    data = LabeledImages(
        torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.arange(6) % 3,
        ["a", "b", "c"],
    )
    s = V.faithfulness_summary(method, data, "relevance", steps=4, batch_size=4, n_boot=200)
    assert s["n"] == 6 and s["view"] == "relevance" and s["steps"] == 4
    for key in ("morf_auc", "lerf_auc", "random_auc", "gap"):
        assert s[f"{key}_lo"] <= s[key] <= s[f"{key}_hi"], key
    assert 0 <= s["morf_auc"] <= 1
    assert s == V.faithfulness_summary(method, data, "relevance", steps=4, batch_size=4, n_boot=200)  # seeded


def test_cli_eval_reports_deletion_aucs_with_intervals(tmp_path, capsys) -> None:
    from toast_core.frontends import cli
    from toast_core.runs.registry import list_runs

    fix = ["--backbone", "fixture", "--runs-dir", str(tmp_path)]
    assert cli.main(["train", "--method", "linear", "--task", "stars", "--per-class", "1", "--val-per-class", "0",
                     "--steps", "2", "--batch-size", "4", "--threads", "1", "--quiet", "--json", *fix]) == 0  # fmt: skip
    run_id = list_runs(tmp_path)[0].run_id
    capsys.readouterr()
    results = {}
    for mode in ("tokens", "mean_fill"):
        code = cli.main(["eval", run_id, "--per-class", "1", "--view", "relevance", "--faithfulness", "4",
                         "--deletion", mode, "--json", *fix])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        results[mode] = r = json.loads(out)
        assert r["faith_steps"] == 4 and r["deletion"] == mode and "focus_ratio" in r
        for key in ("morf_auc", "lerf_auc", "random_auc", "gap"):
            assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"], key
        assert r["gap"] == pytest.approx(r["lerf_auc"] - r["morf_auc"])
    assert results["tokens"]["morf_auc"] != pytest.approx(results["mean_fill"]["morf_auc"], abs=1e-9)
    code = cli.main(["eval", run_id, "--per-class", "1", "--json", *fix])
    assert code == 0 and "morf_auc" not in json.loads(capsys.readouterr().out)  # off unless asked


def test_focus_faithfulness_figure_script_smoke(tmp_path) -> None:
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, "benchmarks/focus_faithfulness.py", "--smoke", "--steps", "2", "--threads", "1", "--out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT task=stars n=8 modules=3 steps=2") and "smoke=1" in last
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert set(numbers) == {"linear", "lora", "vpt"} and {"cls", "relevance"} <= set(numbers["vpt"])


def test_relevance_and_deletion_on_every_token_layout() -> None:
    """Prompts (inserted before block 0 or 1), distillation and register tokens, no CLS, a non-square
    grid: relevance reads the patch columns and deletion keeps every non-patch token."""
    from test_attention import KINDS, _case, _images

    for kind in KINDS:
        method, before = _case(kind)
        torch.nn.init.normal_(method.head.weight, std=1.0)
        x = _images(method)
        view = V.relevance_view(method, x)
        assert view.map.shape == (2, *method.layout.grid) and (view.map >= 0).all() and view.map.max() > 0, kind
        keep = torch.tensor([[0, 2]])
        with torch.no_grad(), keep_patches(keep):
            out = steered_forward(method.vit, x, steer=method.eval())
        assert out.tokens.shape[1] == before + 2 and out.patch_start == before, kind
        curves = V.deletion_curves(method, x, view.map, steps=3)
        assert np.isfinite(curves.probs["morf"]).all(), kind
