"""RESULTS.md sections: each benchmark rewrites only the text between its own markers, so the
sections beside it (and their markers) survive — the task-switch writer once replaced everything up
to the next heading and took the next section's start marker with it."""

from __future__ import annotations

from pathlib import Path

from toast_core.storage.results_file import write_section
from toast_core.training.zoo.report import RESULTS_HEADING, write_results_section, zoo_rows

NEIGHBOURS = "# Benchmark results\n\nintro\n\n<!-- other:start -->\n## other\n\nkeep me\n<!-- other:end -->\n\nnotes\n"


def test_a_section_is_appended_then_replaced_and_its_neighbours_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(NEIGHBOURS)
    write_section(path, "mine", "## mine\n\nfirst")
    write_section(path, "mine", "## mine\n\nsecond")
    text = path.read_text()
    assert text.startswith(NEIGHBOURS.rstrip("\n"))  # everything that was there, unchanged
    assert text.count("<!-- mine:start -->") == 1 and "second" in text and "first" not in text


def test_the_zoo_section_leaves_the_next_sections_marker_in_place(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"  # the zoo's section first, another section right after it
    path.write_text(f"<!-- zoo:start -->\n{RESULTS_HEADING}\n\nold\n<!-- zoo:end -->\n\n" + NEIGHBOURS.split("\n\n", 2)[2])
    rows = zoo_rows(task="stars")[:2]  # two shipped cards' rows (no backbone needed to read them)
    assert rows
    write_results_section(rows, "RESULT modules=1", path)
    write_results_section(rows, "RESULT modules=2", path)
    text = path.read_text()
    assert text.count(RESULTS_HEADING) == 1 and "RESULT modules=2" in text and "RESULT modules=1" not in text
    assert "<!-- other:start -->\n## other\n\nkeep me\n<!-- other:end -->" in text and "notes" in text
    assert text.count("<!-- zoo:start -->") == 1 and text.count("<!-- zoo:end -->") == 1 and "\nold\n" not in text
