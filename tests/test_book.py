"""The book's own checks: every notebook is listed, executed, Colab-ready and complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(
    p for p in (ROOT / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
)


def _config_value(key: str) -> str:
    """A top-level `key:` value from the repository block of _config.yml."""
    text = (ROOT / "_config.yml").read_text()
    block = text.split("\nrepository:", 1)[1]
    return re.search(rf"^\s+{key}:\s*(\S+)", block, re.M).group(1)


def _toc_files() -> set[str]:
    text = (ROOT / "_toc.yml").read_text()
    return set(re.findall(r"(?:root|file):\s*(\S+)", text))


def _cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_there_are_notebooks():
    assert NOTEBOOKS, "book/ holds no notebooks"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_the_table_of_contents(nb):
    assert str(nb.relative_to(ROOT).with_suffix("")) in _toc_files()


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_executed_without_errors(nb):
    code = [c for c in _cells(nb) if c["cell_type"] == "code" and _source(c).strip()]
    assert code, "no code cells"
    assert all(c["execution_count"] is not None for c in code), "unexecuted cells"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        "not executed top to bottom in one run"
    )
    for c in code:
        for out in c["outputs"]:
            assert out["output_type"] != "error", _source(c)[:80]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_installs_attn_lib_from_the_configured_repository_in_colab(nb):
    first = next(_source(c) for c in _cells(nb) if c["cell_type"] == "code")
    url = _config_value("url")
    assert 'if "google.colab" in sys.modules:' in first
    assert f"attn_lib @ git+{url}" in first


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_has_goals_summary_and_exercises_with_solutions(nb):
    text = "\n".join(_source(c) for c in _cells(nb) if c["cell_type"] == "markdown")
    assert re.search(r"^#+ Learning goals", text, re.M)
    assert re.search(r"^#+ Summary", text, re.M)
    assert re.search(r"^#+ Exercises", text, re.M)
    exercises = re.findall(r"```\{exercise(?:-start)?\}", text)
    solutions = re.findall(r"```\{solution-start\}", text)
    assert len(exercises) >= 3, "fewer than three exercises"
    assert len(solutions) >= len(exercises), "an exercise without an executed solution"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_fit_the_page(nb):
    # The Colab install line holds the whole repository URL and cannot wrap.
    for c in _cells(nb):
        if c["cell_type"] == "code":
            for line in _source(c).splitlines():
                if line.strip().startswith("%pip install"):
                    continue
                assert len(line) <= 80, line
