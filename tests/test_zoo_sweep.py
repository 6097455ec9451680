"""The recipe sweep's variants: an --arm names recipe fields and method settings, and a smoke sweep
trains each arm and names the best one (the validation split only)."""

from __future__ import annotations

import pytest

from benchmarks import zoo_sweep as sweep
from toast_core.training.recipes import recipe


def test_an_arm_sets_recipe_fields_and_method_settings() -> None:
    arm = sweep.parse_arm("lr=0.01,head_lr_scale=10,r=8,targets=q+v+proj")
    assert arm == {"lr": 0.01, "head_lr_scale": 10, "r": 8, "targets": ("q", "v", "proj")}
    base = recipe("glyphs", "lora")
    varied = sweep.apply_arm(base, arm)
    assert (varied.lr, varied.head_lr_scale) == (0.01, 10)
    assert varied.method_config == {**base.method_config, "r": 8, "targets": ("q", "v", "proj")}
    assert (varied.steps, varied.entry) == (base.steps, base.entry)  # nothing else moves
    assert sweep.arm_label(arm) == "lr=0.01,head_lr_scale=10,r=8,targets=q+v+proj"
    with pytest.raises(SystemExit, match="key=value"):
        sweep.parse_arm("lr")


def test_a_smoke_sweep_trains_every_arm(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        sweep.main(["--smoke", "--entries", "lora", "--arm", "lr=0.02", "--arm", "r=2,targets=q+v+proj"]) == 0
    )
    out = capsys.readouterr().out
    own = f"lora recipe lr {recipe('glyphs', 'lora').lr:g}"
    assert own in out and "lora lr=0.02 lr 0.02" in out and "lora r=2,targets=q+v+proj" in out
    assert out.strip().splitlines()[-1].startswith("RESULT task=glyphs") and "lora=" in out.splitlines()[-1]


def test_the_ceiling_benchmark_trains_on_the_control_and_scores_both_splits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import representation_ceiling as ceiling

    assert ceiling.main(["--smoke", "--tasks", "glyphs", "--entries", "linear"]) == 0
    out = capsys.readouterr().out
    assert "[glyphs] linear" in out and "trained clean -> clean" in out and "cluttered" in out
    assert out.strip().splitlines()[-1].startswith("RESULT glyphs_linear_ceiling=")
