"""A CLI training process killed with SIGKILL: `list` (the registry's read-only reader) says
"interrupted" at once, as `RunManager.list()` does, and `resume <run-id>` finishes the run from its
last checkpoint. A real `python -m toast_core train` subprocess on the fixture backbone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from toast_core.frontends import cli
from toast_core.runs import RunManager

REPO = Path(__file__).resolve().parent.parent
# bitfit, not linear: a linear probe trains on cached features (600 steps in ~0.3 s), too fast to be
# killed mid-run; bitfit runs the backbone every step (~7 ms a step here), so the run lasts seconds.
STEPS, EVERY = 2000, 10


def _on_disk(root: Path) -> dict | None:
    for status in root.glob("*/status.json"):
        try:
            return json.loads(status.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # being replaced right now; read again
    return None


def _train_until_checkpoint(root: Path) -> str:
    """Start a CLI run, kill -9 it once it has saved a checkpoint_last; returns the run id."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "toast_core", "train", "--method", "bitfit", "--task", "stars",
            "--per-class", "1", "--val-per-class", "0", "--steps", str(STEPS), "--batch-size", "4",
            "--checkpoint-every", str(EVERY), "--snapshot-every", "0", "--threads", "1", "--quiet",
            "--runs-dir", str(root), "--backbone", "fixture"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # the interpreter start (torch, timm) is slow on a busy machine
        while time.monotonic() < deadline and proc.poll() is None:
            raw = _on_disk(root)
            if raw and raw["state"] == "running" and (raw.get("checkpoint_last_step") or 0) >= EVERY:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        assert raw and raw["state"] == "running", "the CLI run never reached its first checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert raw["step"] < STEPS
    return raw["run_id"]


def test_a_killed_cli_run_lists_as_interrupted_and_resumes_to_done(tmp_path, capsys):
    root = tmp_path / "runs"
    run_id = _train_until_checkpoint(root)
    assert json.loads((root / run_id / "status.json").read_text())["state"] == "running"  # as the process left it

    started = time.monotonic()
    code = cli.main(["list", "--runs-dir", str(root), "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert code == 0 and [(r["id"], r["state"]) for r in listed] == [(run_id, "interrupted")]
    assert time.monotonic() - started < 5.0  # no waiting for another process to adopt the run
    assert json.loads((root / run_id / "status.json").read_text())["state"] == "running"  # list wrote nothing

    manager = RunManager(root)  # the other reader agrees (and, opening the registry, records it)
    try:
        assert [(s.run_id, s.state) for s in manager.list(history=False)] == [(run_id, "interrupted")]
    finally:
        manager.shutdown()

    code = cli.main(["resume", run_id, "--runs-dir", str(root), "--backbone", "fixture", "--threads", "1",
                     "--quiet", "--json"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["state"] == "done" and summary["steps"] == STEPS
    assert summary["resumed_from"] >= EVERY and summary["resumed_from"] % EVERY == 0
    code = cli.main(["list", "--runs-dir", str(root), "--json"])
    assert [(r["id"], r["state"], r["steps"]) for r in json.loads(capsys.readouterr().out)] == [(run_id, "done", STEPS)]


def test_resume_refuses_a_run_that_is_done(tmp_path, capsys):
    root = tmp_path / "runs"
    code = cli.main(["train", "--method", "linear", "--task", "stars", "--per-class", "1", "--val-per-class", "0",
                     "--steps", "2", "--batch-size", "4", "--threads", "1", "--quiet", "--json",
                     "--runs-dir", str(root), "--backbone", "fixture"])  # fmt: skip
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    assert code == 0
    code = cli.main(["resume", run_id, "--runs-dir", str(root), "--backbone", "fixture", "--quiet"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "is done" in err and "can be resumed" in err
