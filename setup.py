"""Build the native presence table (``presence_core.table._fast``) with Cython.

``PRESENCE_CORE_DEBUG=1`` builds with invariant checks after every mutating
operation (LRU, wheel and dirty links are verified), line tracing and an
annotated HTML next to the source.  Never ship that build: it is O(n) per call.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PRESENCE_CORE_DEBUG", "") not in ("", "0")

macros = [("PRESENCE_CORE_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]

extensions = [
    Extension(
        "presence_core.table._fast",
        ["src/presence_core/table/_fast.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "linetrace": DEBUG,
            "embedsignature": True,
        },
    )
)
