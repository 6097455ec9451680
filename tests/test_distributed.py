"""Distributed training (toast_core.training.distributed): the pieces alone, and N torchrun processes = 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toast_core.training import distributed

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("n,size", [(8, 2), (7, 2), (5, 3), (1, 2)])
def test_rank_slices_cover_the_global_batch_once_in_order(n: int, size: int) -> None:
    parts = [distributed.rank_slice(n, distributed.World(r, size, r, "gloo")) for r in range(size)]
    covered = [i for p in parts for i in range(n)[p]]
    assert covered == list(range(n))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_not_launched_means_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    assert distributed.init_from_env() is None
    assert distributed.current() is None
    assert distributed.device_for(None, "cpu") == "cpu"


def test_two_gloo_processes_train_the_same_module_as_one() -> None:
    """benchmarks/ddp_equivalence.py: full fine-tune, LoRA and TOAST, 1 process batch 8 vs 2 x 4."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/ddp_equivalence.py"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.fullmatch(
        r"RESULT procs=2 max_abs_diff=(\S+) methods=3 adamw_max_abs_diff=(\S+) adamw_key_bias_diff=(\S+)", last
    )
    assert found, last
    sgd, adamw, key_bias = (float(v) for v in found.groups())
    assert sgd <= 1e-5 and adamw <= 1e-5
    assert key_bias < 1e-3  # rounding noise amplified by AdamW, bounded by a few lr-sized steps
    assert "ranks agree to 0.0e+00" in done.stdout


# --- whole runs under torchrun, launched the way the run manager launches them ------------------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    for child in _children(torchrun_pid):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return child
    return None


def _status(runs_dir: Path, run_id: str) -> dict:
    import json

    try:
        return json.loads((runs_dir / run_id / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _launch(runs_dir: Path, steps: int):
    from toast_core.runs import RunConfig, torchrun

    config = RunConfig(method="lora", task="stars", per_class=4, val_per_class=2, device="cpu", seed=1,
                       snapshot_every=0, checkpoint_every=0,
                       train={"steps": steps, "batch_size": 8, "lr": 1e-3})
    run = torchrun.launch(config, runs_dir, "fixture", nproc=2, env={"OMP_NUM_THREADS": "1"})
    run_id = run.wait_for_id(timeout=180)
    deadline = time.monotonic() + 180
    while _status(runs_dir, run_id).get("step", 0) < 2:
        assert run.process.poll() is None, run.log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the run never started stepping"
        time.sleep(0.2)
    return run, run_id


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_run_as_failed_within_seconds(tmp_path: Path) -> None:
    run, run_id = _launch(tmp_path, steps=5000)
    victim = _rank_pid(run.process.pid, 1)
    assert victim is not None
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    code = run.wait(timeout=120)
    elapsed = time.monotonic() - t0
    status = _status(tmp_path, run_id)
    assert code != 0 and status["state"] == "failed", status
    assert "another rank of this distributed run stopped" in status["error"]
    assert elapsed < 30, elapsed
    print(f"rank 1 killed at step {status['step']}: torchrun exited {code} after {elapsed:.1f} s; {status['error']}")
    from toast_core.runs import RunManager

    with RunManager(tmp_path, None, cpu_workers=0) as manager:  # the registry still reads
        (only,) = manager.list()
        assert only.run_id == run_id and only.state == "failed" and not manager.unreadable


def test_cancelling_a_torchrun_run_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run, run_id = _launch(tmp_path, steps=5000)
    run.cancel()
    run.wait(timeout=120)
    status = _status(tmp_path, run_id)
    assert status["state"] == "cancelled", status
    assert status["step"] < 5000
    assert (tmp_path / run_id / "checkpoint_last.safetensors").is_file()
