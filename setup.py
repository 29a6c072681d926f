"""Build script for bufpool's optional C speedups (``bufpool/_speedups.c``, the memory core's
hot paths, ``bufpool/tls/_cscan.c``, the TLS record splitter's, and
``bufpool/aiohttp/_chead.c``, the zero-copy receive path's head scan).

Metadata lives in pyproject.toml; this file only adds the extension.  The extension is
optional: when it cannot be built (no compiler, no Python headers, a free-threaded or
non-CPython interpreter, or ``BUFPOOL_NO_EXTENSIONS=1``), installation still succeeds and
bufpool runs its pure-Python core; one warning says so (``pip install -v`` shows it, and
``python -c "import bufpool; print(bufpool.IMPLEMENTATION)"`` tells at any time).
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

BUILD_FAILURES = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)


def _warn(reason: str) -> None:
    bar = "*" * 75
    sys.stderr.write(
        f"\n{bar}\nWARNING: bufpool's C speedups were not built ({reason}).\n"
        "bufpool is installed with its pure-Python core: same behaviour, slower acquire and\n"
        f"release (and TLS record scanning).\n{bar}\n\n"
    )


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into one warning instead of a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except BUILD_FAILURES as exc:
            _warn(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_FAILURES as exc:
            _warn(f"{type(exc).__name__}: {exc}")


def _skip_reason() -> str | None:
    if os.environ.get("BUFPOOL_NO_EXTENSIONS", "") not in ("", "0"):
        return "BUFPOOL_NO_EXTENSIONS is set"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} is not CPython"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "free-threaded CPython: the C hot paths rely on the GIL"
    return None


reason = _skip_reason()
if reason is not None:
    _warn(reason)
    ext_modules: list[Extension] = []
else:
    ext_modules = [
        Extension("bufpool._speedups", ["bufpool/_speedups.c"]),
        Extension("bufpool.tls._cscan", ["bufpool/tls/_cscan.c"]),
        Extension("bufpool.aiohttp._chead", ["bufpool/aiohttp/_chead.c"]),
    ]

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
