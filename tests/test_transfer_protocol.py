"""benchmarks/transfer_protocol.py at smoke scale: generated FGVC + VTAB-1k folders, fixture ViT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("Linear", "Fine-tune", "VPT", "LoRA", "TOAST", "TOAST-Lite")


def test_protocol_smoke_writes_the_table_beside_the_published_numbers(tmp_path: Path) -> None:
    out = tmp_path / "fgvc.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/transfer_protocol.py", "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.fullmatch(r"RESULT datasets=2 methods=6 mean_test_acc=[0-9.]+", done.stdout.strip().splitlines()[-1])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "Method" not in line]
    published = [r for r in rows if "(published)" in r]
    ours = [r for r in rows if "(this run" in r]
    assert len(published) == 6 and len(ours) == 6
    assert all("ViT-B/16 ImageNet-1k" in r for r in published)  # the backbone beside every number
    assert all("| fixture |" in r for r in ours)
    assert "| TOAST (published) | ViT-B/16 ImageNet-1k (TOAST model zoo) | 85.0 |" in out.read_text()
    assert all(r.count("n=12") == 2 for r in ours)  # both data sets' test splits, every image scored
    assert all("pre-tuned: official checkpoint" in r for r in ours if r.startswith("| TOAST"))
    cells = json.loads(out.with_suffix(".json").read_text())
    assert sorted({c["label"] for c in cells}) == sorted(METHODS)
    for c in cells:
        if c["tried"]:  # the chosen setting is the first best on the val split
            best = max(c["tried"], key=lambda t: t["val_acc"])
            assert c["val_acc"] == best["val_acc"] and c["chosen"]["lr"] == best["lr"]
    lora = next(c for c in cells if c["label"] == "LoRA")
    assert lora["chosen"]["r"] == 4 and lora["chosen"]["lr"] in (0.1 / 256 * 32, 0.05 / 256 * 32)
    toast_cub = next(c for c in cells if c["label"] == "TOAST" and c["dataset"] == "CUB_200_2011")
    assert toast_cub["chosen"]["lr"] == 0.03 and not toast_cub["tried"]  # the released CUB lr, no search
