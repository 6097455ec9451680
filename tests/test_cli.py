"""The command line: every subcommand on the tiny fixture backbone (in-process through `main(argv)`),
exit codes 0 / 1 / 2, and one-line errors without tracebacks, checked through real subprocesses too."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from toast_core.frontends import cli
from toast_core.runs.registry import list_runs

REPO = Path(__file__).resolve().parent.parent
FIX = ["--backbone", "fixture"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str, dict]:
    """`train` once for the module: a real 2-step LoRA run on the stars task."""
    root = tmp_path_factory.mktemp("runs")
    code = cli.main(["train", "--method", "lora", "--task", "stars", "--per-class", "1", "--val-per-class", "1",
                     "--steps", "2", "--batch-size", "4", "--set", "r=2", "--set", "targets=q,v", "--threads", "1", "--quiet", "--json",
                     "--runs-dir", str(root), *FIX])
    assert code == 0
    runs = list_runs(root)
    assert len(runs) == 1
    return root, runs[0].run_id, runs[0].config


def test_train_writes_a_done_run_with_the_settings(trained, capsys):
    root, run_id, config = trained
    assert config["method"] == "lora" and config["method_config"] == {"r": 2, "targets": ["q", "v"]}
    assert config["train"]["steps"] == 2 and config["per_class"] == 1
    assert (root / run_id / "module.safetensors").is_file()
    code, out, _ = run_cli(capsys, "list", "--runs-dir", str(root), "--json")
    rows = json.loads(out)
    assert code == 0 and [r["id"] for r in rows] == [run_id]
    assert rows[0]["state"] == "done" and rows[0]["steps"] == 2 and rows[0]["val_acc"] is not None
    code, out, _ = run_cli(capsys, "list", "--runs-dir", str(root))
    assert code == 0 and run_id in out and "lora" in out.splitlines()[1]


def test_train_json_output_and_progress_on_stderr(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--method", "linear", "--task", "glyphs", "--per-class", "1",
                             "--val-per-class", "0", "--steps", "3", "--batch-size", "4", "--threads", "1",
                             "--json", "--runs-dir", str(tmp_path), *FIX)
    assert code == 0
    summary = json.loads(out)
    assert summary["state"] == "done" and summary["steps"] == 3 and "train_acc" in summary["final"]
    assert "3/3" in err  # the tqdm bar went to stderr, the JSON alone to stdout


def test_eval_reports_accuracy_and_focus(trained, capsys):
    root, run_id, _ = trained
    code, out, _ = run_cli(capsys, "eval", run_id, "--per-class", "2", "--runs-dir", str(root), "--json", *FIX)
    assert code == 0
    result = json.loads(out)
    assert result["task"] == "stars" and result["n"] == 16
    assert 0.0 <= result["acc"] <= 1.0
    assert 0.0 < result["area_share"] < 1.0 and 0.0 <= result["focus_share"] <= 1.0
    assert result["focus_ratio"] == pytest.approx(result["focus_share"] / result["area_share"])


def test_compare_writes_png_and_csv_with_shared_scale(trained, tmp_path, capsys):
    root, run_id, _ = trained
    fig, table = tmp_path / "fig.png", tmp_path / "maps.csv"
    code, out, err = run_cli(capsys, "compare", "scene:stars:test:3", "--runs", "base", run_id, "--view", "cls",
                             "--layer", "-1", "--out", str(fig), "--csv", str(table), "--json",
                             "--runs-dir", str(root), *FIX)
    assert code == 0, err
    result = json.loads(out)
    assert result["region"] == "mask" and len(result["modules"]) == 2
    with Image.open(fig) as im:
        assert im.format == "PNG"
        assert im.width > 3 * 192  # image + two overlays, each at least 192 px wide
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 12 * 12  # two modules x the 12 x 12 patch grid
    assert {r["method"] for r in rows} == {"base backbone (no head)", "lora on stars"}
    # a box instead of the mask, and a view spanning all layers
    code, out, _ = run_cli(capsys, "compare", "scene:glyphs:test:5", "--runs", "base", run_id, "--view", "rollout",
                           "--box", "0", "0", "48", "48", "--out", str(tmp_path / "box.png"), "--json",
                           "--runs-dir", str(root), *FIX)
    result = json.loads(out)
    assert code == 0 and result["region"] == "box"
    assert all(m["area_share"] == pytest.approx(0.25) for m in result["modules"])


def test_compare_of_a_view_a_module_lacks_warns_but_does_not_fail(trained, tmp_path, capsys):
    root, run_id, _ = trained
    code, _, err = run_cli(capsys, "compare", "scene:stars:test:0", "--runs", "base", run_id, "--view", "toast_pass1",
                           "--out", str(tmp_path / "none.png"), "--runs-dir", str(root), *FIX)
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("warning: base backbone") and "not a view of linear" in lines[0]
    assert lines[-1].startswith("error: None of the modules produced this view")


def test_export_and_import_round_trip(trained, tmp_path, capsys):
    root, run_id, _ = trained
    bundle = tmp_path / "bundle.zip"
    code, out, _ = run_cli(capsys, "export", run_id, "--out", str(bundle), "--runs-dir", str(root), *FIX)
    assert code == 0 and bundle.is_file() and "figures" in out
    other = tmp_path / "imported"
    code, out, _ = run_cli(capsys, "import", str(bundle), "--runs-dir", str(other), *FIX)
    assert code == 0 and f"imported run {run_id}" in out
    assert [r.run_id for r in list_runs(other)] == [run_id]
    code, _, err = run_cli(capsys, "import", str(bundle), "--runs-dir", str(tmp_path / "x"), "--backbone", "fixture:1")
    assert code == 1 and "weights hash" in err and len(err.strip().splitlines()) == 1


def test_bench_passes_arguments_through_and_reports_failures(tmp_path, monkeypatch, capfd):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "echo_args.py").write_text(
        "import sys\nprint('ARGS', ' '.join(sys.argv[1:]))\nprint('RESULT ok=1')\n"
        "sys.exit(3 if '--fail' in sys.argv else 0)\n"
    )
    monkeypatch.setattr(cli, "BENCH_DIR", bench)
    assert cli.main(["bench", "--list"]) == 0
    assert capfd.readouterr().out.split() == ["echo_args"]
    assert cli.main(["bench", "echo_args", "--", "--smoke", "--steps", "3"]) == 0
    assert "ARGS --smoke --steps 3" in capfd.readouterr().out  # the child's own stdout
    assert cli.main(["bench", "echo_args.py", "--", "--fail"]) == 1
    assert "exited with status 3" in capfd.readouterr().err
    assert cli.main(["bench", "no_such_benchmark"]) == 2
    assert "echo_args" in capfd.readouterr().err


def test_bench_knows_the_repository_benchmarks(capsys):
    code, out, _ = run_cli(capsys, "bench", "--list")
    assert code == 0 and "methods_small" in out.split()


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--task", "stars"],  # --method missing
        ["train", "--method", "no_such_method", "--task", "stars", *FIX],
        ["train", "--method", "linear", "--task", "stars", "--set", "rank", *FIX],
        ["compare", "scene:stars:test:0", "--runs", "base", "--out", "x.png", "--box", "1", "2"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["compare", "no_such_image.png", "--runs", "base", "--out", "x.png", *FIX], "not a file"),
        (["compare", "scene:stars:test:0", "--runs", "no_such_run", "--out", "x.png", *FIX], "No run or module"),
        (["compare", "scene:stars:nosplit:0", "--runs", "base", "--out", "x.png", *FIX], "Unknown split"),
        (["compare", "scene:stars:test:0", "--runs", "base", "--layer", "9", "--out", "x.png", *FIX], "Layer 9"),
        (["train", "--method", "linear", "--task", "no_such_task", *FIX], "Unknown task"),
        (["eval", "no_such_run", *FIX], "No run or module"),
        (["import", "missing.zip", *FIX], "No bundle file"),
    ],
)
def test_runtime_errors_exit_1_with_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv, "--runs-dir", str(tmp_path / "runs"))
    assert code == 1
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1


def _subprocess(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "toast_core", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_subprocess_exit_codes_and_clean_errors(tmp_path):
    usage = _subprocess("compare", "scene:stars:test:0", cwd=tmp_path)  # --runs and --out missing
    assert usage.returncode == 2 and "the following arguments are required" in usage.stderr
    failed = _subprocess("compare", "missing.png", "--runs", "base", "--out", "x.png", *FIX, cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.strip() == "error: 'missing.png' is not a file."
    helped = _subprocess("compare", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "FOR TESTS ONLY" in " ".join(helped.stdout.split())


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "checkpoints" / "embedded_vit.safetensors").is_file(), reason="no embedded checkpoint")
def test_compare_on_the_embedded_backbone_names_its_classes(tmp_path, capsys):
    from toast_core.core.backbone import load_backbone

    names = load_backbone("embedded", device="cpu").class_names
    code, out, err = run_cli(capsys, "compare", "scene:stars:test:3", "--runs", "base", "--view", "gradcam",
                             "--out", str(tmp_path / "emb.png"), "--json", "--device", "cpu",
                             "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    (row,) = json.loads(out)["modules"]
    assert row["module"] == "base backbone" and row["prediction"] in names
    assert 0.0 < row["area_share"] < 1.0
