"""Faithfulness in the front ends, on the fixture backbone: the Explorer's tab (AppTest: curves and
the AUC table appear when switched on, show the library's numbers, follow the deletion settings), the
Benchmark page's columns and the Gradio table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_app_pages import lab_env  # noqa: F401 - the fixture backbone and a temporary registry

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # seconds per script run, as test_app_pages
MORF = "MoRF AUC (lower = faithful)"


def _faith_table(at):
    tables = [d.value for d in at.dataframe if MORF in d.value.columns]
    assert len(tables) == 1, [list(d.value.columns) for d in at.dataframe]
    return tables[0]


def test_faithfulness_tab_shows_curves_and_aucs_beside_focus() -> None:
    from streamlit.testing.v1 import AppTest

    from toast_core.frontends.app_state import session
    from toast_core.views import cls_view, compare, deletion_curves

    at = AppTest.from_file(str(ROOT / "pages/explorer.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert not any(MORF in d.value.columns for d in at.dataframe)  # nothing computed until asked
    at.number_input(key="ex_faith_steps").set_value(8)
    at.toggle(key="ex_faith_on").set_value(True).run()
    assert not at.exception, at.exception
    assert any(c.key == "ex_faith_fig" for c in at.get("plotly_chart"))
    table = _faith_table(at)
    assert list(table["module"]) == ["base backbone (no head)"]
    assert {"LeRF AUC (higher = faithful)", "random AUC", "LeRF − MoRF", "focus ratio"} <= set(table.columns)
    # the page shows the library's numbers: the base module's CLS map on the same scene, 8 steps
    backbone = session.shared_backbone(session.spec_from_env())
    image = compare.scene_image(at.selectbox(key="ex_task").value, "test", 0, int(backbone.layout.img_size[0]))
    method = compare.base_module(backbone)
    x = compare.model_input(backbone, image.rgb)
    expected = deletion_curves(method, x, cls_view(method, x).map, steps=8).summary()
    assert float(table[MORF][0]) == pytest.approx(expected["morf_auc"], abs=1e-6)
    assert float(table["LeRF − MoRF"][0]) == pytest.approx(expected["gap"], abs=1e-6)
    assert 0.0 <= float(table[MORF][0]) <= 1.0 and np.isfinite(float(table["focus ratio"][0]))
    # pixel mean-fill without the random baseline: other numbers, no random column
    at.radio(key="ex_faith_mode").set_value("Mean-fill the pixels (for comparison)")
    at.toggle(key="ex_faith_random").set_value(False).run()
    assert not at.exception
    filled = _faith_table(at)
    assert "random AUC" not in filled.columns
    assert float(filled[MORF][0]) != pytest.approx(float(table[MORF][0]), abs=1e-9)


def test_benchmark_page_measures_faithfulness_of_a_finished_run() -> None:
    from streamlit.testing.v1 import AppTest

    from toast_core.frontends import app_state as S

    manager = S.run_manager(S.spec_from_env())
    run_id = manager.submit(
        {"method": "linear", "task": "stars", "per_class": 1, "val_per_class": 1, "snapshot_every": 0,
         "checkpoint_every": 0, "train": {"steps": 3, "batch_size": 4, "eval_every": 0}}
    )  # fmt: skip
    assert manager.wait(run_id, timeout=120).state == "done"
    at = AppTest.from_file(str(ROOT / "pages/benchmark.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    table = at.dataframe[-1].value
    assert table["MoRF AUC"].isna().all()  # off by default: it costs a forward per step
    at.toggle(key="bm_faith_on").set_value(True).run()
    assert not at.exception, at.exception
    row = at.dataframe[-1].value.iloc[0]
    assert 0.0 <= row["MoRF AUC"] <= 1.0 and np.isfinite(row["LeRF − MoRF"])
    lo, hi = (float(v) for v in row["gap 95% CI"].strip("[]").split(","))
    assert lo <= row["LeRF − MoRF"] <= hi
    expected = S.run_faithfulness(S.spec_from_env().key, run_id, float(manager.status(run_id).ended or 0), "stars")
    assert row["MoRF AUC"] == pytest.approx(expected["morf_auc"]) and expected["n"] == S.FOCUS_IMAGES


def test_gradio_table_has_the_deletion_aucs_of_each_shown_map(tmp_path: Path) -> None:
    from toast_core.data.images import load_image
    from toast_core.frontends import cli
    from toast_core.frontends.cli import backbone_from_spec
    from toast_core.frontends.gradio_app import (
        FAITH_STEPS,
        TABLE_HEADERS,
        DemoContext,
        run_comparison,
        write_examples,
    )
    from toast_core.runs.registry import list_runs
    from toast_core.views import cls_view, deletion_curves
    from toast_core.views.compare import load_module_ref, model_input

    assert cli.main(["train", "--method", "linear", "--task", "stars", "--per-class", "1", "--val-per-class", "0",
                     "--steps", "2", "--batch-size", "4", "--threads", "1", "--quiet", "--backbone", "fixture",
                     "--runs-dir", str(tmp_path / "runs")]) == 0  # fmt: skip
    run_id = list_runs(tmp_path / "runs")[0].run_id
    example = str(write_examples(tmp_path / "examples", size=64)[0])
    backbone = backbone_from_spec("fixture")
    ctx = DemoContext(backbone, tmp_path / "runs", cpu_threads=1)
    try:
        _, table, _, _ = run_comparison(ctx, example, ["base", run_id], "cls", -1, "mean")
    finally:
        ctx.close()
    col = {name: i for i, name in enumerate(TABLE_HEADERS)}
    base, run = table
    assert base[col["MoRF AUC"]] is None  # no trained head: no prediction to follow
    method = load_module_ref(run_id, backbone, [tmp_path / "runs"])
    x = model_input(backbone, load_image(Path(example)))
    expected = deletion_curves(method, x, cls_view(method, x).map, steps=FAITH_STEPS, orders=("morf", "lerf"))
    assert run[col["MoRF AUC"]] == pytest.approx(expected.summary()["morf_auc"], abs=1e-6)
    assert run[col["LeRF − MoRF"]] == pytest.approx(expected.summary()["gap"], abs=1e-6)
