"""Build the native presence table (``presence_core.table._fast``) with Cython.

The extension is optional, as in multidict and yarl: when it cannot be built (no C compiler,
no Python headers, no Cython) the build prints a warning and the package installs with the
pure-Python twin alone (``presence_core.USING_EXTENSION`` is then False).  Environment
variables read at build time:

``PRESENCE_CORE_NO_EXTENSIONS=1``
    skip the extension: a pure-Python wheel (also the default on interpreters other than
    CPython).
``PRESENCE_CORE_REQUIRE_EXTENSION=1``
    a failed extension build fails the whole build instead of falling back (CI sets it).
``PRESENCE_CORE_DEBUG=1``
    build with invariant checks after every mutating operation (LRU, wheel and dirty links are
    verified), line tracing and an annotated HTML next to the source.  Never ship that build:
    it is O(n) per call.

Cython runs inside ``build_ext``, not when this file is imported, so making an sdist or the
package metadata needs neither Cython nor a compiler, and the sdist carries the ``.pyx`` (not
a generated ``.c``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


NO_EXTENSIONS = _flag("PRESENCE_CORE_NO_EXTENSIONS") or sys.implementation.name != "cpython"
REQUIRE_EXTENSION = _flag("PRESENCE_CORE_REQUIRE_EXTENSION")
DEBUG = _flag("PRESENCE_CORE_DEBUG")

if NO_EXTENSIONS and REQUIRE_EXTENSION:
    sys.exit(
        "presence-core: PRESENCE_CORE_REQUIRE_EXTENSION=1 asks for the compiled table, but "
        + (
            "PRESENCE_CORE_NO_EXTENSIONS is set"
            if _flag("PRESENCE_CORE_NO_EXTENSIONS")
            else f"{sys.implementation.name} cannot build it"
        )
        + ": unset one of them."
    )

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "linetrace": DEBUG,
    "embedsignature": True,
}

# The marker below is what tests/test_packaging.py looks for in the build log.
FALLBACK_BANNER = """
********************************************************************************
WARNING: presence-core could not build its compiled table (presence_core.table._fast):
    {reason}
Installing the pure-Python twin instead: identical behaviour, several times slower.
presence_core.USING_EXTENSION will be False.  To get the compiled table, install a C
compiler and the Python headers (e.g. apt-get install build-essential python3-dev) and
reinstall without pip's cache (pip install --no-cache-dir ...).  Set
PRESENCE_CORE_REQUIRE_EXTENSION=1 to make this an error, or
PRESENCE_CORE_NO_EXTENSIONS=1 to skip the compiled table without this warning.
********************************************************************************
"""


class BuildFailed(Exception):
    """The extension could not be built; the message says why."""


class OptionalBuildExt(build_ext):
    """Cythonize, then compile; if that fails, warn and leave the extension out.

    Only a missing toolchain falls back (no Cython, no compiler, compiler or linker errors).
    A Cython compile error in our own ``.pyx`` is a bug and always fails the build.
    """

    def run(self) -> None:
        try:
            self._cythonize()
            super().run()
        except BuildFailed as exc:
            self._fall_back(str(exc))
        except PlatformError as exc:  # no usable compiler configured at all
            self._fall_back(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError) as exc:
            raise BuildFailed(f"{type(exc).__name__}: {exc}") from exc

    def _cythonize(self) -> None:
        try:
            from Cython.Build import cythonize
        except ImportError as exc:
            raise BuildFailed(f"Cython is not installed ({exc})") from exc
        cythonized = cythonize(
            self.extensions,
            annotate=DEBUG,
            compiler_directives=CYTHON_DIRECTIVES,
            force=self.force,
            quiet=not self.verbose,
        )
        # Keep our Extension objects (finalize_options has already annotated them), with the
        # generated .c as their source.
        sources = {ext.name: ext.sources for ext in cythonized}
        for ext in self.extensions:
            ext.sources = sources[ext.name]

    def _fall_back(self, reason: str) -> None:
        if REQUIRE_EXTENSION:
            raise SystemExit(
                "presence-core: the compiled table failed to build and "
                f"PRESENCE_CORE_REQUIRE_EXTENSION=1 is set: {reason}"
            )
        sys.stderr.write(FALLBACK_BANNER.format(reason=reason))
        sys.stderr.flush()
        # Nothing was built: drop the extension so that no later step (an editable install's
        # copy back into the source tree, `install --record`) looks for its missing file.
        self.extensions = []


def extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        print("presence-core: PRESENCE_CORE_NO_EXTENSIONS is set: pure-Python build")
        return []
    return [
        Extension(
            "presence_core.table._fast",
            ["src/presence_core/table/_fast.pyx"],
            define_macros=(
                [("PRESENCE_CORE_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
            ),
            extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        )
    ]


setup_args: dict[str, Any] = {"ext_modules": extensions()}
if setup_args["ext_modules"]:
    setup_args["cmdclass"] = {"build_ext": OptionalBuildExt}
setup(**setup_args)
