"""benchmarks/toast_study.py: the smoke run's table and RESULT line, selection on validation only,
its own RESULTS.md section, the head learning-rate arm and the zoo-card reuse rule."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks import toast_study as study
from toast_core.training.recipes import recipe

REAL_RESULTS = Path(study.__file__).resolve().parent / "RESULTS.md"
OLD_SMOKE = "<!-- toast-study-smoke:start -->\nOLD SMOKE SECTION\n<!-- toast-study-smoke:end -->\n"
FAVOURED = 4  # the 4th arm scored on validation (lr_x3) is made to win there
ARMS = [a.name for a in study.arms_for(2, recipe("glyphs", "toast"))]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One in-process smoke run with --append-results on a copy of RESULTS.md, with spies on the
    scoring (which split, in which order) and on the selection (what it was given)."""
    results = tmp_path_factory.mktemp("toast_study") / "RESULTS.md"
    original = (REAL_RESULTS.read_text() if REAL_RESULTS.exists() else "# Benchmark results\n") + "\n" + OLD_SMOKE
    results.write_text(original)
    events: list[tuple[str, Any]] = []
    real_score, real_choose = study.score, study.choose_best
    val_calls = {"n": 0}

    def score(method: Any, data: Any, split: str) -> dict[str, Any]:
        out = real_score(method, data, split)
        events.append(("score", split))
        if split == "val":
            if val_calls["n"] == FAVOURED:  # call 0 is the frozen backbone, 1 the baseline arm
                out["correct"] = out["correct"] | True
                out["acc"] = 1.0
            val_calls["n"] += 1
        return out

    def choose(rows: list[dict[str, Any]], *args: Any) -> str:
        events.append(("choose", [dict(r) for r in rows]))
        return real_choose(rows, *args)

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr(study, "score", score)
        mp.setattr(study, "choose_best", choose)
        rc = study.main(["--smoke", "--append-results", "--results", str(results)])
    return {"rc": rc, "out": buf.getvalue(), "events": events, "original": original, "results": results}


def _result(out: str) -> dict[str, str]:
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    return dict(kv.split("=", 1) for kv in last.split()[1:])


def test_smoke_prints_every_arm_and_the_result_keys(smoke: dict[str, Any]) -> None:
    assert smoke["rc"] == 0
    out = smoke["out"]
    arms = ARMS
    table = [line for line in out.splitlines() if line.startswith("| ")]
    for name in arms:
        assert any(line.startswith(f"| {name} ") for line in table), name
    res = _result(out)
    for key in ("complete", "minutes", "task", "arms", "best_arm", "best_val_acc", "baseline_val_acc", "smoke"):
        assert key in res, key
    assert res["smoke"] == "1" and res["complete"] == "1" and int(res["arms"]) == len(arms)


def test_validation_alone_chooses_the_best_arm(smoke: dict[str, Any]) -> None:
    events = smoke["events"]
    chooses = [i for i, (kind, _) in enumerate(events) if kind == "choose"]
    assert len(chooses) == 1
    before = [split for kind, split in events[: chooses[0]] if kind == "score"]
    after = [split for kind, split in events[chooses[0] :] if kind == "score"]
    assert "test" not in before and set(before) == {"val"}
    assert after == ["test"]  # the chosen recipe is scored on test once, afterwards
    rows = events[chooses[0]][1]
    assert all(set(r) == {"arm", "val_hits", "val_n"} for r in rows)
    favoured = ARMS[FAVOURED - 1]
    assert _result(smoke["out"])["best_arm"] == favoured  # the arm that wins on validation, nothing else


def test_choose_best_prefers_the_recipe_on_ties() -> None:
    rows = [{"arm": "baseline", "val_hits": 50, "val_n": 200}, {"arm": "lr_x3", "val_hits": 51, "val_n": 200}]
    assert study.choose_best(rows) == "baseline"
    rows[1]["val_hits"] = 53
    assert study.choose_best(rows) == "lr_x3"


def test_append_results_replaces_only_its_own_section(smoke: dict[str, Any]) -> None:
    text, original = smoke["results"].read_text(), smoke["original"]
    start, end = "<!-- toast-study-smoke:start -->", "<!-- toast-study-smoke:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    assert "OLD SMOKE SECTION" not in text
    section = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    assert section.sub("", text) == section.sub("", original)  # everything else byte for byte
    body = section.search(text).group(0)
    assert "## toast_study: TOAST ablations on validation (issue 16)" in body and "RESULT " in body


def test_write_section_appends_then_replaces(tmp_path: Path) -> None:
    path = tmp_path / "R.md"
    path.write_text("# R\n\n<!-- other:start -->\nkeep\n<!-- other:end -->\n\ntail\n")
    study.write_section(path, "toast-study", "first")
    study.write_section(path, "toast-study", "second")
    text = path.read_text()
    assert text.startswith("# R\n\n<!-- other:start -->\nkeep\n<!-- other:end -->\n\ntail\n")
    assert "second" in text and "first" not in text and text.count("<!-- toast-study:start -->") == 1


def test_head_lr_arm_sets_the_loops_head_scale_and_flips_the_recipe() -> None:
    r = recipe("glyphs", "toast")
    arms = {a.name: a for a in study.arms_for(6, r)}
    head = [a for a in arms.values() if a.head_lr is not None]
    if not study.HEAD_LR:
        assert not head  # a loop without a separate head lr: the arm is left out, not faked
        return
    (arm,) = head
    assert arm.head_lr == (10.0 if study.head_scale(r) == 1.0 else 1.0)
    assert study.arm_config(arm, r, 36, 0).head_lr_scale == arm.head_lr
    base = study.arm_config(arms["baseline"], r, 36, 0)
    assert base.head_lr_scale == study.head_scale(r) and base.steps == 36 and base.lr == r.lr
    assert 1 <= base.warmup_steps < r.train_config().warmup_steps  # warmup scaled with the budget


def test_zoo_card_stands_for_the_recipe_only_when_trained_with_it() -> None:
    r = recipe("glyphs", "toast")
    card = {"recipe": {**r.describe(), "note": "any note"}}
    assert study.card_is_recipe(card, r)
    card["recipe"] = {**card["recipe"], "lr": r.lr * 3}
    assert not study.card_is_recipe(card, r)
    card["recipe"] = {k: v for k, v in r.describe().items() if k != "head_lr_scale"}  # an older card
    assert study.card_is_recipe(card, r) == (study.head_scale(r) == 1.0)
    assert not study.card_is_recipe(None, r)
