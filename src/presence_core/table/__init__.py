"""Selects the presence table implementation: the compiled one unless told otherwise.

`PRESENCE_CORE_NO_EXTENSIONS=1` selects the pure-Python twin, as does any non-CPython
interpreter.  If the compiled module fails to import, the twin is used too, unless
`PRESENCE_CORE_REQUIRE_EXTENSION=1`, which turns that into an ImportError (CI sets it: a
broken build must fail loudly, not run the suite on the twin).  Type checkers see the twin.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from ._common import TOMBSTONE, Tombstone

__all__ = ["TOMBSTONE", "USING_EXTENSION", "PresenceTable", "Tombstone"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


if TYPE_CHECKING:
    from ._py import PresenceTable as PresenceTable

    USING_EXTENSION: bool
elif _flag("PRESENCE_CORE_NO_EXTENSIONS") or sys.implementation.name != "cpython":
    from ._py import PresenceTable

    USING_EXTENSION = False
else:
    try:
        from ._fast import PresenceTable

        USING_EXTENSION = True
    except ImportError:
        if _flag("PRESENCE_CORE_REQUIRE_EXTENSION"):
            raise
        from ._py import PresenceTable

        USING_EXTENSION = False
