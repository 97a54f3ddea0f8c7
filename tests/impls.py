"""The two table implementations, for tests that name one or both explicitly."""

from __future__ import annotations

import os
from typing import Any

import pytest

from presence_core.table import _py as _table_py

try:
    from presence_core.table import _fast
except ImportError as exc:  # pragma: no cover - only on a broken build
    _fast = None
    _FAST_ERROR: ImportError | None = exc
else:
    _FAST_ERROR = None

REQUIRE_EXTENSION = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get(
    "PRESENCE_CORE_REQUIRE_EXTENSION", ""
) not in ("", "0")


def impl(name: str) -> Any:
    """The PresenceTable class of `name` ("c" or "py"); fails or skips if "c" is not built."""
    if name == "py":
        return _table_py.PresenceTable
    if _fast is None:
        if REQUIRE_EXTENSION:
            pytest.fail(f"the compiled extension is required here but failed: {_FAST_ERROR}")
        pytest.skip("compiled extension not built")
    return _fast.PresenceTable
