"""aligner's version: one place, read by the package, the sidecars, the run folders and the report (no import of aligner itself)."""

__version__ = "0.1.0"  # pyproject.toml [project] version says the same (tests/test_packaging.py)
