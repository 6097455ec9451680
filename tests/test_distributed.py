"""Distributed training (toast_core.distributed): the pieces alone, and N torchrun processes = 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toast_core import distributed

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
