"""The shipped lecture zoo end to end, on the embedded backbone: its modules load and score as their
cards say, a first visitor's Explorer compares six of them, and the Benchmark page shows the table.

Slow (the embedded backbone and real modules); the browser test drives Debian's Chromium.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from toast_core.training.recipes import RECIPES
from toast_core.training.zoo.build import ZOO_DIR
from toast_core.training.zoo.catalog import FIRST_VIEW, zoo_entries

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SLOW = 300


@pytest.fixture(scope="module")
def embedded():
    from toast_core.core.backbone import load_backbone

    return load_backbone("embedded")


def test_the_zoo_is_shipped_for_both_tasks_within_its_size_budget(embedded):
    entries = zoo_entries(embedded)
    for task in ("stars", "glyphs"):
        names = {e.entry for e in entries if e.task == task}
        assert set(FIRST_VIEW[:6]) <= names, (task, sorted(names))
        assert names == set(RECIPES[task]), (task, sorted(set(RECIPES[task]) - names))  # every recipe
    total = sum(p.stat().st_size for p in ZOO_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"the zoo is {total / 2**20:.1f} MB"
    for e in entries:  # every card states its recipe, seed, backbone and intervals
        t = e.test
        assert e.zoo["recipe"]["entry"] == e.entry and e.zoo["seed"] == 0 and not e.zoo["smoke"]
        assert t["acc_lo"] <= t["acc"] <= t["acc_hi"] and t["n"] >= 300
        assert "object_share" in t and "object_chance" in t
        faith = e.zoo["faithfulness"]
        assert faith["gap_lo"] <= faith["gap"] <= faith["gap_hi"] and faith["n"] >= 40


def test_every_zoo_module_rescores_as_its_card_says(embedded):
    from toast_core.training.zoo.catalog import first_view
    from toast_core.training.zoo.verify import verify

    summary = verify(embedded, ZOO_DIR, log=lambda _: None)  # every module: reload and re-score
    assert summary["max_card_drift"] <= 0.02, [r for r in summary["rows"] if r["drift"] > 0.02]
    assert summary["modules"] == len(zoo_entries(embedded)) >= len(first_view(embedded, "glyphs")) >= 6


def test_the_task_switch_preset_shows_each_methods_two_modules_on_one_mixed_scene(tmp_path):
    """The Home page's 'One image, two tasks' preset: a mixed scene (a star and a digit), each of LoRA,
    TOAST and the linear probe with its stars module beside its glyphs module."""
    from streamlit.testing.v1 import AppTest

    from toast_core.training.zoo.presets import read_presets

    old = {k: os.environ.get(k) for k in ("TOAST_LAB_BACKBONE", "TOAST_LAB_RUNS_DIR")}
    os.environ.update(TOAST_LAB_BACKBONE="embedded", TOAST_LAB_RUNS_DIR=str(tmp_path / "runs"))
    try:
        from toast_core.core.backbone import load_backbone

        (preset,) = [p for p in read_presets(load_backbone("embedded").weights_hash) if p.task == "mixed"]
        at = AppTest.from_file(str(ROOT / "pages" / "explorer.py"), default_timeout=SLOW)
        at.session_state["explorer_preset"] = preset.key
        at.run()
        assert not at.exception, at.exception
        assert at.selectbox(key="ex_task").value == "mixed" and at.number_input(key="ex_index").value == preset.index
        chosen = at.multiselect(key="ex_modules").value
        pairs = [f"zoo:{t}/{m}" for m in ("lora", "toast", "linear") for t in ("stars", "glyphs")]
        assert chosen[1:] == pairs, chosen
        assert any(f"Compared 7 modules on mixed/test/{preset.index}" in str(c.value) for c in at.caption)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _zoo_table(at):
    """The zoo's table on the Benchmark page (AppTest does not carry a dataframe's key: find it by columns)."""
    tables = [df.value for df in at.dataframe if {"entry", "test acc", "acc lo", "acc hi"} <= set(df.value.columns)]
    assert len(tables) == 1, [list(df.value.columns) for df in at.dataframe]
    return tables[0]


def test_benchmark_page_shows_the_zoo_table(tmp_path):
    from streamlit.testing.v1 import AppTest

    old = {k: os.environ.get(k) for k in ("TOAST_LAB_BACKBONE", "TOAST_LAB_RUNS_DIR")}
    os.environ.update(TOAST_LAB_BACKBONE="embedded", TOAST_LAB_RUNS_DIR=str(tmp_path / "runs"))
    try:
        at = AppTest.from_file(str(ROOT / "pages" / "benchmark.py"), default_timeout=SLOW).run()
        assert not at.exception
        assert any("The lecture zoo" in str(h.value) for h in at.subheader)
        table = _zoo_table(at)
        assert len(table) >= 9 and {"linear", "lora", "toast"} <= set(table["entry"])
        assert (table["acc lo"] <= table["test acc"]).all() and (table["test acc"] <= table["acc hi"]).all()
        assert any("No runs of your own" in str(i.value) for i in at.info)
        shown = at.radio(key="bm_zoo_task").value
        other = next(t for t in at.radio(key="bm_zoo_task").options if t != shown)
        at.radio(key="bm_zoo_task").set_value(other).run()
        switched = _zoo_table(at)
        assert set(switched["entry"]) >= {"linear", "lora"}
        assert list(switched["test acc"]) != list(table["test acc"])  # the other task's numbers, not a rerender
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.browser
def test_first_open_of_the_explorer_compares_six_zoo_modules(tmp_path):
    from benchmarks.app_latency import (
        CHROMIUM,
        LabServer,
        compared,
        full_screenshot,
        launch_chromium,
        settle,
        wait_text,
    )

    if not CHROMIUM.is_file():
        pytest.skip("No /usr/bin/chromium (install Debian's chromium: apt-get install -y chromium).")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    artifacts = ROOT / ".test-artifacts" / "browser"
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SLOW * 1000)
        server = LabServer(tmp_path / "runs", "embedded", artifacts / "zoo_server.log").start()
        try:
            server.wait_ready(SLOW)
            page.goto(f"{server.url}/explorer")
            wait_text(page, compared(7, "stars/test/0"), SLOW)  # the base + six zoo modules, nothing trained
            settle(page, timeout_s=SLOW)
            body = page.inner_text("body")
            zoo_tiles = set(re.findall(r"(\w+) \(stars zoo, test \d+\.\d%\)", body))
            assert len(zoo_tiles) >= 6, body[:2000]
            predictions = re.findall(r"predicted: (star\d-(?:thin|fat)) \((\d\.\d\d)\)", body)
            assert len(predictions) >= 6, body[:2000]  # each zoo module names a stars class
            full_screenshot(page, artifacts / "explorer_zoo.png")
        finally:
            server.stop()
            browser.close()
    log = (artifacts / "zoo_server.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_paired_comparison_of_two_shipped_modules_counts_the_same_images() -> None:
    from benchmarks.zoo_paired import paired

    r = paired("glyphs", "full", "lora", per_class=2)
    assert r["n"] == 20
    assert r["diff"] == pytest.approx(r["acc_a"] - r["acc_b"])
    assert r["only_a"] - r["only_b"] == round(r["diff"] * r["n"])  # discordant pairs are the difference
    assert r["lo"] <= r["diff"] <= r["hi"]
    same = paired("glyphs", "lora", "lora", per_class=2)
    assert (same["diff"], same["only_a"], same["only_b"], same["lo"], same["hi"]) == (0.0, 0, 0, 0.0, 0.0)
