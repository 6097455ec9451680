"""Faults: a training run whose process dies (kill -9 of the CLI; the Streamlit server killed during a
Tuning Lab run) shows as interrupted in every front end within seconds — the CLI's `list` (in-process
and as a subprocess), a RunManager, the Tuning Lab and Benchmark pages, and the Gradio demo (which
offers only finished modules) — can be resumed to the end or deleted, and no other run's files change.

The processes are real: `python -m toast_core train` and `streamlit run app.py`, killed with SIGKILL
(no handler runs, nothing is written on the way down) and reaped, as a shell would."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toast_core.core.backbone import tiny_fixture_backbone
from toast_core.frontends import cli
from toast_core.frontends.cli_common import FIXTURE_KWARGS

REPO = Path(__file__).resolve().parent.parent
FIX = ["--backbone", "fixture"]
SECONDS = 10.0  # "within seconds": from the kill to every front end saying interrupted
# bitfit runs the backbone every step (a linear probe trains on cached features and would finish 600
# steps in a fraction of a second, before it could be killed)
LONG_STEPS = 2000  # long enough to be killed mid-run on any machine, short enough to resume in CI
SLOW = 300


def fixture():
    """The backbone `--backbone fixture` loads in the CLI (same weights hash, so its runs fit)."""
    return tiny_fixture_backbone(**FIXTURE_KWARGS)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _train_args(root: Path, steps: int, seed: int = 0) -> list[str]:
    return ["train", "--method", "bitfit", "--task", "stars", "--per-class", "2", "--val-per-class", "1",
            "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "10", "--snapshot-every", "0",
            "--seed", str(seed), "--threads", "1", "--quiet", "--runs-dir", str(root), *FIX]


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under a run folder: content hash and modification time (ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _states(root: Path, capsys) -> dict[str, dict]:
    """`python -m toast_core list --json`, in-process (the same code as the subprocess, without its start-up)."""
    assert cli.main(["list", "--json", "--runs-dir", str(root)]) == 0
    out, _ = capsys.readouterr()
    return {r["id"]: r for r in json.loads(out)}


def _wait(predicate, timeout: float, what: str, interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _running_past(root: Path, known: set[str], step: int, capsys) -> str | None:
    for run_id, row in _states(root, capsys).items():
        if run_id not in known and row["state"] == "running" and row["steps"] >= step:
            return run_id
    return None


def _other_run(root: Path, capsys) -> tuple[str, dict[str, tuple[str, int]]]:
    """A finished run in the same registry, and a fingerprint of its files."""
    assert cli.main(_train_args(root, 2, seed=7)) == 0
    capsys.readouterr()
    (other,) = _states(root, capsys)
    return other, _files(root / other)


def _gradio_offers(root: Path) -> set[str]:
    from toast_core.frontends.gradio_app import DemoContext

    return {value for _, value in DemoContext(fixture(), root).choices()}


def _pages_show_interrupted(root: Path, run_id: str, monkeypatch) -> None:
    """The Tuning Lab lists the run as interrupted and says so when it is selected; the Benchmark
    page lists it as interrupted."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("TOAST_LAB_BACKBONE", "fixture")
    monkeypatch.setenv("TOAST_LAB_RUNS_DIR", str(root))
    at = AppTest.from_file(str(REPO / "pages/tuning_lab.py"), default_timeout=SLOW).run()
    assert not at.exception, at.exception
    at.selectbox(key="tl_selected").set_value(run_id).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert "interrupted" in set(table["state"]), table
    assert any("nterrupted" in str(w.value) for w in at.warning), [w.value for w in at.warning]
    bench = AppTest.from_file(str(REPO / "pages/benchmark.py"), default_timeout=SLOW).run()
    assert not bench.exception, bench.exception
    bench.multiselect(key="bm_states").set_value(["interrupted"]).run()
    assert not bench.exception, bench.exception
    assert any("interrupted" in set(df.value.get("state", [])) for df in bench.dataframe if "state" in df.value)


def test_cli_run_killed_with_sigkill_is_interrupted_everywhere_and_resumes(tmp_path, capsys, monkeypatch) -> None:
    root = tmp_path / "runs"
    other, before = _other_run(root, capsys)
    proc = subprocess.Popen([sys.executable, "-m", "toast_core", *_train_args(root, LONG_STEPS)], cwd=tmp_path,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_id = _wait(lambda: _running_past(root, {other}, 20, capsys), SLOW, "the CLI run to pass step 20")
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)  # reaped, as a shell would
    killed_at = time.monotonic()

    # the CLI's list says so within seconds, in-process and as a subprocess (one reader for both)
    _wait(lambda: _states(root, capsys)[run_id]["state"] == "interrupted", SECONDS, "list to say interrupted")
    assert time.monotonic() - killed_at <= SECONDS
    listed = subprocess.run([sys.executable, "-m", "toast_core", "list", "--json", "--runs-dir", str(root)],
                            env=_env(), capture_output=True, text=True, timeout=SLOW)
    assert {r["id"]: r["state"] for r in json.loads(listed.stdout)} == {other: "done", run_id: "interrupted"}

    # a run manager, the Gradio demo and the pages agree
    from toast_core.runs import RunManager

    with RunManager(root, fixture(), cpu_workers=1, gpu_workers_per_device=0, cpu_threads=1) as manager:
        assert manager.status(run_id).state == "interrupted"
    offered = _gradio_offers(root)
    assert other in offered and run_id not in offered  # the demo offers finished modules only
    _pages_show_interrupted(root, run_id, monkeypatch)

    # resumed from its last checkpoint, through the CLI, to the end
    resumed = subprocess.run([sys.executable, "-m", "toast_core", "resume", run_id, "--runs-dir", str(root),
                              "--threads", "1", "--quiet", *FIX], env=_env(), capture_output=True, text=True,
                             timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    row = _states(root, capsys)[run_id]
    assert row["state"] == "done" and row["steps"] == LONG_STEPS, row
    assert _files(root / other) == before  # nothing of the other run was touched


@pytest.mark.browser
def test_streamlit_server_killed_during_a_tuning_lab_run(tmp_path, capsys) -> None:
    from benchmarks.app_latency import CHROMIUM, LabServer, launch_chromium, settle, wait_text

    if not CHROMIUM.is_file():
        pytest.skip("No /usr/bin/chromium (install Debian's chromium: apt-get install -y chromium).")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    root = tmp_path / "runs"
    other, before = _other_run(root, capsys)
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(SLOW * 1000)
        server = LabServer(root, "fixture", tmp_path / "server1.log").start()
        try:
            server.wait_ready(SLOW)
            page.goto(f"{server.url}/tuning_lab")
            page.get_by_role("button", name="Submit run").wait_for()
            for label, value in (("Steps", 100_000), ("Batch size", 4), ("Training images per class", 2),
                                 ("Validation images per class", 1), ("Evaluate every (steps, 0 = end)", 0),
                                 ("Attention snapshot every", 0)):
                field = page.get_by_label(label, exact=True)
                field.fill(str(value))
                field.press("Enter")
                settle(page, timeout_s=SLOW)
            page.get_by_role("button", name="Submit run").click()
            note = page.get_by_text("Submitted run").first
            note.wait_for()
            run_id = re.search(r"Submitted run\s+(\S+)", note.inner_text()).group(1).strip("`.")
            _wait(lambda: _states(root, capsys)[run_id]["steps"] >= 5, SLOW, "the Tuning Lab run to pass step 5")
            os.killpg(server.proc.pid, signal.SIGKILL)  # the server's own process group, nothing else
            server.proc.wait(timeout=30)
            killed_at = time.monotonic()
        finally:
            server.stop()
        _wait(lambda: _states(root, capsys)[run_id]["state"] == "interrupted", SECONDS, "list to say interrupted")
        assert time.monotonic() - killed_at <= SECONDS
        assert run_id not in _gradio_offers(root)

        # the restarted app shows it as interrupted; deleted from a run manager, it leaves the page
        server = LabServer(root, "fixture", tmp_path / "server2.log").start()
        try:
            server.wait_ready(SLOW)
            page.goto(f"{server.url}/tuning_lab")
            shown = time.monotonic()
            wait_text(page, "interrupted", SLOW)
            assert time.monotonic() - shown <= 60  # one page load (the backbone is warmed at start)
            from toast_core.runs import RunManager

            with RunManager(root, fixture(), cpu_workers=1, gpu_workers_per_device=0) as manager:
                assert manager.status(run_id).state == "interrupted"
                manager.delete(run_id)
            assert not (root / run_id).exists()
            page.reload()
            page.get_by_role("button", name="Submit run").wait_for()
            settle(page, timeout_s=SLOW)
            assert page.get_by_text("interrupted").count() == 0
            assert "Traceback" not in server.log()
        finally:
            server.stop()
            browser.close()
    assert set(_states(root, capsys)) == {other}
    assert _files(root / other) == before
