"""The README's op table is generated from the registries; keep it current."""

from pathlib import Path

from qnnjit import optable

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_op_table_is_current():
    text = README.read_text()
    assert optable.BEGIN in text and optable.END in text
    assert optable.replace_section(text) == text, (
        "README op table is stale: run `python -m qnnjit.optable --write`"
    )


def test_readme_quick_start_matches_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = 'pip install -e ".[test]" && python -m pytest -q'
    assert test_command in README.read_text()
    assert test_command in ci
