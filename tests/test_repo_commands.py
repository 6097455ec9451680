"""The README's two commands are the ones that work: CI runs the test command verbatim."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_and_ci_share_the_test_command() -> None:
    command = (ROOT / ".ci" / "test-command.txt").read_text().strip()
    assert command in (ROOT / "README.md").read_text()
    assert command in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in command and "requirements-dev.txt" in command


def test_readme_app_command_installs_and_starts_streamlit() -> None:
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "streamlit run app.py" in l)
    assert "pip install -r requirements.txt" in line and line.startswith("python3.11 -m venv")
    for name in ("embedded_vit.safetensors", "embedded_vit.json", "toast_pretuned.safetensors", "toast_pretuned.json"):
        assert (ROOT / "checkpoints" / name).is_file(), name
