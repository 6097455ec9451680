"""The project is an installed package (`pip install -e .`, in both README commands): every
benchmark imports as `python benchmarks/<name>.py` would run it — benchmarks/ first on sys.path, no
repository root, no PYTHONPATH — and carries no sys.path trick of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
#: not stand-alone scripts of their own kind: servers.py is the Gradio server helper that tests and
#: load.py import; load.py imports it and app_latency as the `benchmarks` package, so it still puts
#: the repository root on sys.path itself (its owner's to change)
NEEDS_THE_ROOT = {"servers", "load"}

CHECK = r"""
import importlib.util, json, sys
from pathlib import Path
bench, names = Path(sys.argv[1]), sys.argv[2:]
sys.path[0] = str(bench)  # what `python benchmarks/<name>.py` puts first; the root is not on the path
failed = {}
for name in names:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", bench / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    try:
        spec.loader.exec_module(module)  # not __main__: main() does not run
    except BaseException as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
import toast_core
print(json.dumps({"failed": failed, "toast_core": toast_core.__file__}))
"""


def _benchmarks() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.stem not in NEEDS_THE_ROOT)


def test_every_benchmark_imports_from_the_installed_package_without_pythonpath(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHECK, str(BENCH), *_benchmarks()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert Path(result["toast_core"]).resolve() == (ROOT / "toast_core" / "__init__.py").resolve()  # this checkout


def test_benchmarks_carry_no_sys_path_tricks():
    tricks = [name for name in _benchmarks() if "sys.path.insert" in (BENCH / f"{name}.py").read_text()]
    assert tricks == []
