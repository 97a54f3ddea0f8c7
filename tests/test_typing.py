"""The types a checker infers for PresenceTable, checked by running mypy --strict.

`tests/typing/check_table.py` states them with `typing.assert_type`; this runs mypy on it in
process (`mypy.api.run`) and fails with mypy's report if any of them is wrong.  Type checkers
see the pure twin (see `presence_core.table`), whose annotations the stub of the compiled
table (`_fast.pyi`) repeats.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHECKS = Path(__file__).parent / "typing"


@pytest.mark.parametrize("path", sorted(CHECKS.glob("check_*.py")), ids=lambda p: p.name)
def test_inferred_types(path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    try:
        from mypy import api
    except ImportError:  # pragma: no cover - mypy is in the test extra
        pytest.skip("mypy is not installed: the type checks need it (pip install mypy)")
    cache = tmp_path_factory.getbasetemp() / "mypy_cache"
    stdout, stderr, status = api.run(
        ["--strict", "--no-error-summary", "--cache-dir", str(cache), str(path)]
    )
    assert status == 0 and not stdout.strip(), f"mypy --strict {path.name}:\n{stdout}{stderr}"
