"""pytest fixtures of the benchmark suites (see benchcase.py)."""

from benchcase import run_case  # noqa: F401  (the fixture)
