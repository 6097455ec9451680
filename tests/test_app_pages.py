"""The Streamlit pages, driven by AppTest on the fixture backbone with a temporary run registry.

Each test runs a page script the way Streamlit does, sets widgets, and checks what a person would
see: no exception, the comparison or the run, and a clear message (never a traceback) for bad input.
"""

from __future__ import annotations

import importlib.util
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # seconds per script run; the CI machine is shared and slow


@pytest.fixture(scope="module", autouse=True)
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fixture backbone and a fresh run registry for this module (env is read on every page run)."""
    runs = tmp_path_factory.mktemp("lab_runs")
    old = {k: os.environ.get(k) for k in ("TOAST_LAB_BACKBONE", "TOAST_LAB_RUNS_DIR")}
    os.environ["TOAST_LAB_BACKBONE"] = "fixture"
    os.environ["TOAST_LAB_RUNS_DIR"] = str(runs)
    yield runs
    from toast_core.frontends import app_state as S

    try:
        S.run_manager(S.spec_from_env()).shutdown(timeout=30)
    except Exception:
        pass
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def page(name: str):
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / name), default_timeout=TIMEOUT)


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (120, 80), dtype=np.uint8) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size=(size[1], size[0]), dtype=np.uint16)
        im = Image.fromarray(arr)
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 255, size=(size[1], size[0], channels), dtype=dtype)
        im = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def manager():
    from toast_core.frontends.app_state import session

    return session._cached_manager(str(session.runs_root()), session.spec_from_env().key)


def submit_tiny_run(at, method: str = "linear", **settings) -> str:
    at.selectbox(key="tl_method").set_value(method).run()
    at.number_input(key="tl_steps").set_value(3)
    at.number_input(key="tl_batch").set_value(4)
    at.number_input(key="tl_per_class").set_value(1)
    at.number_input(key="tl_val").set_value(1)
    at.number_input(key="tl_eval").set_value(0)
    for name, value in settings.items():
        widget = at.get_by_key(f"tl_{method}_{name}")
        widget.set_value(value)
    at.button(key="tl_submit").click().run()
    assert not at.exception, at.exception
    assert any("Submitted run" in s for s in texts(at.success)), texts(at.error)
    return str(at.session_state["tl_selected"])


# --- home ---------------------------------------------------------------------------------------
def test_home_shows_fixture_backbone_runs_and_presets() -> None:
    from toast_core.frontends import app_state as S

    at = page("app.py").run()
    assert not at.exception
    assert any(S.FIXTURE_LABEL in w for w in texts(at.warning))
    assert any(S.FIXTURE_LABEL in m for m in texts(at.markdown))
    assert len([b for b in at.button if str(b.key).startswith("preset_")]) == len(S.PRESETS)
    assert any("No trained modules yet" in i for i in texts(at.info))


def test_streamlit_run_app_py_serves_itself_with_the_backbone_warmed(monkeypatch) -> None:
    """`streamlit run app.py` finds the st.App (ASGI mode) that serves app.py itself; its warm-up fills
    the very cache the pages read, so the first page loads no backbone itself."""
    from streamlit.web.server.app_discovery import discover_asgi_app

    from toast_core.frontends import app_state as S

    found = discover_asgi_app(ROOT / "app.py")
    assert found.is_asgi_app and found.app_name == "app"
    assert found.import_string == "app:app"
    spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")  # what the server does:
    served = importlib.util.module_from_spec(spec)  # a module import named `app`, not a script run
    spec.loader.exec_module(served)
    assert Path(served.app._script_path).resolve() == (ROOT / "app.py").resolve()
    S.warm_up()

    def no_second_load(spec):
        raise AssertionError(f"the page loaded {spec} again")

    monkeypatch.setattr(S.session, "load_spec", no_second_load)
    assert S.shared_backbone(S.spec_from_env()).source == "fixture"


# --- explorer -----------------------------------------------------------------------------------
def test_explorer_compares_on_a_builtin_scene_with_its_mask() -> None:
    at = page("pages/explorer.py").run()
    assert not at.exception
    assert at.session_state["explorer_rendered"] == 1  # the base backbone's map
    focus = at.dataframe[0].value
    assert list(focus["module"]) == ["base backbone (no head)"]
    assert 0.0 <= float(focus["focus share"][0]) <= 1.0
    assert any("ground-truth mask" in c for c in texts(at.caption))
    # the gradient views need a trained head, which the fixture backbone does not have: a clear warning
    at.selectbox(key="ex_view").set_value("Grad-CAM").run()
    assert not at.exception
    assert any("needs a trained head" in w for w in texts(at.warning))


def test_explorer_mixed_scene_fixes_the_split_and_scores_the_chosen_object() -> None:
    """Task 'mixed' (one star + one digit): a test set only, so the split is fixed; the focus radio
    says which of the two objects the Focus table scores."""
    at = page("pages/explorer.py").run()
    at.selectbox(key="ex_split").set_value("train").run()
    at.selectbox(key="ex_task").set_value("mixed").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="ex_split").value == "test" and at.selectbox(key="ex_split").disabled
    assert any("Compared 1 module on mixed/test/0" in c for c in texts(at.caption))
    on_star = float(at.dataframe[0].value["focus share"][0])
    at.radio(key="ex_mixed_focus").set_value("digit").run()
    assert not at.exception
    on_digit = float(at.dataframe[0].value["focus share"][0])
    assert on_star != on_digit and 0.0 <= min(on_star, on_digit) and max(on_star, on_digit) <= 1.0


def test_explorer_preset_sets_scene_and_view() -> None:
    from toast_core.frontends import app_state as S

    p = S.PRESETS[1]
    at = page("pages/explorer.py")
    at.session_state["explorer_preset"] = p.key
    at.run()
    assert not at.exception
    assert at.selectbox(key="ex_task").value == p.task
    assert at.number_input(key="ex_index").value == p.index
    assert S.VIEW_LABELS[at.selectbox(key="ex_view").value] == p.view
    assert any(p.title in i for i in texts(at.info))


BAD_UPLOADS = [
    ("notes.png", b"this is not an image at all", "not an image in a supported format"),
    ("cut.png", png_bytes()[:60], "corrupt or truncated"),
    ("huge.png", b"\x89PNG" + b"0" * (21 * 1024 * 1024), "over the 20.0 MB limit"),
]


def test_explorer_refuses_bad_uploads_and_accepts_odd_modes() -> None:
    """Non-image, truncated and over-limit uploads each give one clear error and no comparison;
    grayscale, RGBA and 16-bit PNGs are converted and compared."""
    at = page("pages/explorer.py").run()
    at.radio(key="ex_source").set_value("Upload an image").run()
    uploader = lambda: at.file_uploader(key="ex_upload")  # noqa: E731 - re-read after each run
    for name, data, message in BAD_UPLOADS:
        at.session_state["explorer_rendered"] = 0
        uploader().clear()
        uploader().upload(name, data, "image/png").run()
        assert not at.exception
        errors = texts(at.error)
        assert len(errors) == 1 and message in errors[0], errors
        assert at.session_state["explorer_rendered"] == 0
    for mode in ("L", "RGBA", "I;16"):
        uploader().clear()
        uploader().upload(f"pic_{mode.replace(';', '')}.png", png_bytes(mode), "image/png").run()
        assert not at.exception
        assert not at.error, texts(at.error)
        assert at.session_state["explorer_rendered"] == 1
    # no mask on an upload: a typed box gives the focus table
    at.number_input(key="ex_x0").set_value(0)
    at.number_input(key="ex_x1").set_value(60).run()
    assert not at.exception
    assert len(at.dataframe) == 1 and float(at.dataframe[0].value["area share (chance)"][0]) > 0


# --- tuning lab, then everything that lists runs -----------------------------------------------
def test_tuning_lab_runs_a_module_that_appears_in_explorer_and_benchmark() -> None:
    at = page("pages/tuning_lab.py").run()
    assert not at.exception
    toast_id = submit_tiny_run(at, "toast", init="scratch")
    run_id = submit_tiny_run(at, "linear")
    for rid in (toast_id, run_id):
        status = manager().wait(rid, timeout=120)
        assert status.state == "done", status.error
    at.run()
    assert not at.exception
    assert any("Done: 3 steps" in s for s in texts(at.success))
    assert any(run_id in str(o) for o in at.selectbox(key="tl_selected").options) or at.selectbox(key="tl_selected").value == run_id

    ex = page("pages/explorer.py").run()
    assert not ex.exception
    assert {run_id, toast_id} <= set(ex.multiselect(key="ex_modules").value)
    assert ex.session_state["explorer_rendered"] == 3
    captions = texts(ex.caption)
    assert not any("Only the base backbone" in c for c in captions)
    # the two maps can be subtracted: the difference figure is drawn
    assert not any("at least two modules" in i for i in texts(ex.info))
    assert len(ex.get("plotly_chart")) >= 3  # heat maps, difference, layers x heads
    # TOAST pass 1 vs pass 2: two maps of the TOAST module; the others say why they have none
    ex.selectbox(key="ex_view").set_value("TOAST pass 1 vs pass 2").run()
    assert not ex.exception
    assert ex.session_state["explorer_rendered"] == 2
    assert sum("TOAST views exist only for TOAST modules" in w for w in texts(ex.warning)) == 2
    assert [r.endswith(("pass 1", "pass 2")) for r in ex.dataframe[0].value["module"]] == [True, True]

    bm = page("pages/benchmark.py").run()
    assert not bm.exception
    table = bm.dataframe[0].value
    assert {"linear", "toast"} <= set(table["method"])
    row = table[table["method"] == "linear"].iloc[0]
    assert row["state"] == "done" and 0 < row["trainable %"] < 100
    assert row["focus ratio"] is not None and np.isfinite(row["focus ratio"])


def test_tuning_lab_opens_every_lecture_recipe_in_its_widgets() -> None:
    """Each built-in task's recipe fills the widgets (stars' full fine-tuning wants 1200 images per
    class, above an earlier widget limit of 1000: the page must take every recipe as it is)."""
    from toast_core.training.recipes import RECIPES, run_defaults

    at = page("pages/tuning_lab.py").run()
    for task, table in RECIPES.items():
        at.selectbox(key="tl_task").set_value(task).run()
        for method in sorted({r.method for r in table.values() if r.kind == "task"}):
            at.selectbox(key="tl_method").set_value(method).run()
            assert not at.exception, (task, method, at.exception)
            want = run_defaults(task, method)
            got = (at.number_input(key="tl_per_class").value, at.number_input(key="tl_steps").value)
            assert got == (want["per_class"], want["steps"]), (task, method, got)


def test_tuning_lab_shows_a_failed_run_and_refuses_bad_settings() -> None:
    at = page("pages/tuning_lab.py").run()
    # a padding prompt wider than half the 96 px input passes the config check but fails in the worker
    run_id = submit_tiny_run(at, "visual_prompt", size="60")
    status = manager().wait(run_id, timeout=120)
    assert status.state == "failed"
    at.run()
    assert not at.exception
    assert any("Run failed" in e and "Padding width 60" in e for e in texts(at.error)), texts(at.error)
    # a setting the config refuses never becomes a run
    at.selectbox(key="tl_method").set_value("vpt").run()
    at.get_by_key("tl_vpt_dropout").set_value("1.5")
    at.button(key="tl_submit").click().run()
    assert not at.exception
    assert any("not submitted" in e for e in texts(at.error)), texts(at.error)


def snapshot_captions(at) -> list[str]:
    return [c for img in at.image for c in img.captions if "CLS attention" in c]


def test_tuning_lab_runs_fort_and_always_shows_a_finished_runs_final_attention() -> None:
    """FORT methods are submittable (prompts come from the run's training images); a done run shows
    its final module's attention, also when its record lacks the snapshot (e.g. an imported bundle)."""
    at = page("pages/tuning_lab.py").run()
    at.selectbox(key="tl_method").set_value("fort_lora").run()
    assert any("position prompts" in i for i in texts(at.info))
    assert not at.button(key="tl_submit").disabled
    run_id = submit_tiny_run(at, "fort_lora")
    status = manager().wait(run_id, timeout=120)
    assert status.state == "done", status.error
    assert all(h["fort_attention"] > 0 for h in status.history)
    at.run()
    assert not at.exception
    assert any("Done: 3 steps" in s for s in texts(at.success))
    assert snapshot_captions(at) == ["Probe image, last-layer CLS attention at step 3 (final module)"]

    # a record without its snapshot (bundles carry none): the page computes it from the saved module
    folder = manager().run_dir(run_id)
    (folder / "snapshot.npy").unlink()
    (folder / "status.json").write_text((folder / "status.json").read_text())  # a new mtime: re-read
    manager().rescan()
    assert manager().status(run_id).snapshot is None
    at.run()
    assert not at.exception
    assert snapshot_captions(at) == ["Probe image, last-layer CLS attention at step 3 (final module)"]
    assert not any("No attention snapshot" in c for c in texts(at.caption))
    from toast_core.frontends import app_state as S

    grid, step = S.run_snapshot(manager().status(run_id), 96)
    assert step == 3
    np.testing.assert_allclose(grid, status.snapshot, atol=1e-6)  # the same map the run recorded


def test_tuning_lab_zip_upload_checks(tmp_path: Path) -> None:
    def make_zip(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n, d in files.items():
                zf.writestr(n, d)
        return buf.getvalue()

    at = page("pages/tuning_lab.py").run()
    at.radio(key="tl_source").set_value("Uploaded zip of class folders").run()
    at.file_uploader(key="tl_zip").upload("evil.zip", make_zip({"../escape.png": png_bytes()}), "application/zip").run()
    assert not at.exception
    assert any("cannot be used" in e and "leave the folder" in e for e in texts(at.error)), texts(at.error)
    assert at.button(key="tl_submit").disabled

    at.file_uploader(key="tl_zip").clear()
    good = make_zip({f"{c}/{i}.png": png_bytes() for c in ("cat", "dog") for i in range(3)})
    at.file_uploader(key="tl_zip").upload("pets.zip", good, "application/zip").run()
    assert not at.exception
    assert any("2 classes, 6 images" in s for s in texts(at.success)), texts(at.success) + texts(at.error)
    assert not at.button(key="tl_submit").disabled

    at.file_uploader(key="tl_zip").clear()
    at.file_uploader(key="tl_zip").upload("notzip.zip", b"PK\x03\x04 broken", "application/zip").run()
    assert any("not a valid or supported zip" in e for e in texts(at.error)), texts(at.error)


# --- backbones ----------------------------------------------------------------------------------
def test_backbones_page_explains_failures(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    at = page("pages/backbones.py").run()
    assert not at.exception
    assert any("random weights" in w for w in texts(at.warning))
    at.radio(key="bb_choice").set_value("Local weights file").run()
    at.text_input(key="bb_path").set_value(str(tmp_path / "missing.safetensors"))
    at.button(key="bb_file_load").click().run()
    assert any("does not exist" in e for e in texts(at.error)), texts(at.error)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"not_a_vit.weight": torch.zeros(2, 2)}, str(wrong))
    at.text_input(key="bb_arch").set_value("vit_tiny_patch16_224")
    at.text_input(key="bb_path").set_value(str(wrong))
    at.button(key="bb_file_load").click().run()
    assert not at.exception
    assert any("do not match" in e for e in texts(at.error)), texts(at.error)

    at.radio(key="bb_choice").set_value("timm model from the hub").run()
    at.text_input(key="bb_hub_name").set_value("no_such_model_xyz")
    at.button(key="bb_hub_load").click().run()
    assert any("not a timm model name" in e for e in texts(at.error)), texts(at.error)
    # the fixture is still in use after every failure
    assert any("random weights" in w for w in texts(at.warning))


# --- few-shot -----------------------------------------------------------------------------------
def test_fewshot_prompts_and_ft_vs_fort() -> None:
    at = page("pages/fewshot.py")
    at.run()
    assert not at.exception, at.exception
    at.number_input(key="fs_way").set_value(2)
    at.number_input(key="fs_query").set_value(1).run()
    assert not at.exception
    assert any("Mean share of prompt mass" in c for c in texts(at.caption))
    at.selectbox(key="fs_base").set_value("bitfit")
    at.number_input(key="fs_steps").set_value(2)
    at.button(key="fs_run").click().run()
    assert not at.exception, at.exception
    labels = [str(m.label) for m in at.metric]
    assert labels == ["bitfit", "bitfit + FORT"]
    runs = at.session_state["fewshot_result"]["runs"]
    assert all(0.0 <= r.result.acc <= 1.0 for r in runs) and runs[1].result.prompt_on_object is not None
    assert runs[0].view.map.shape[0] == 2  # 2-way x 1 query


def test_fewshot_refuses_an_episode_the_upload_cannot_fill() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for c in ("ants", "bees"):
            for i in range(2):
                zf.writestr(f"{c}/{i}.png", png_bytes())
    at = page("pages/fewshot.py").run()
    at.radio(key="fs_source").set_value("Uploaded zip of class folders").run()
    at.file_uploader(key="fs_zip").upload("tiny.zip", buf.getvalue(), "application/zip").run()
    at.number_input(key="fs_shot").set_value(2).run()
    assert not at.exception
    assert any("No episode of that shape" in e for e in texts(at.error)), texts(at.error)
