"""Which implementation of the memory core's hot paths runs: compiled ("c") or pure Python.

``bufpool._speedups`` (C, optional) holds ``Lease``, ``BufferPool.acquire`` and the counters
they touch; the pure-Python modules stay the reference and the fallback, and the compiled
code calls back into them for everything but the hit paths (misses, growth, spill, heap,
waiters, scrub, leaks).  Chosen once, at import:

* ``BUFPOOL_NO_EXTENSIONS=1`` (any value but "" and "0") forces pure Python;
* ``BUFPOOL_REQUIRE_EXTENSIONS=1`` makes a missing or broken extension an ImportError instead
  of a silent fallback (for CI runs that mean to test the compiled path);
* free-threaded interpreters always get pure Python (the C hot paths rely on the GIL);
* otherwise the extension is used when it was built.

``bufpool.IMPLEMENTATION`` tells which one is active.  The same rules choose the TLS record
splitter's scanner (``bufpool.tls._cscan``, see ``bufpool.tls._splitter``) through
:func:`load_extension`.
"""

from __future__ import annotations

import importlib
import os
import sysconfig
from collections.abc import Callable
from types import ModuleType
from typing import Final, Literal, Protocol, cast

from ._lock import PyPoolLock

__all__ = ["IMPLEMENTATION", "PoolLock", "load_extension", "new_lock", "speedups"]


class PoolLock(Protocol):
    """What the pool needs of its lock: threading.RLock's methods, ``_is_owned`` included."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...
    def _is_owned(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *args: object) -> None: ...


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _load() -> ModuleType | None:
    if _flag("BUFPOOL_NO_EXTENSIONS"):
        return None
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    try:
        from . import _speedups
    except ImportError:
        if _flag("BUFPOOL_REQUIRE_EXTENSIONS"):
            raise
        return None
    return _speedups


def load_extension(name: str) -> ModuleType | None:
    """The compiled module ``name`` (e.g. ``"bufpool.tls._cscan"``) under the rules above, or
    None when the pure-Python twin is to run."""
    if _flag("BUFPOOL_NO_EXTENSIONS"):
        return None
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        if _flag("BUFPOOL_REQUIRE_EXTENSIONS"):
            raise
        return None


#: The compiled module, or None when the pure-Python core runs.
speedups: Final = _load()
#: "c" when the compiled hot paths are active, "python" otherwise.
IMPLEMENTATION: Final[Literal["c", "python"]] = "python" if speedups is None else "c"
#: Factory of the pool lock: re-entrant, so a finalizer that the GC runs inside one of the
#: pool's locked sections (and that releases a lease) cannot deadlock its own thread; such a
#: release is deferred (see ``Lease.release``).  The compiled paths read the state of their
#: own lock type (``_speedups.FastLock`` has threading.RLock's methods); the pure-Python hit
#: paths take the token of a ``PyPoolLock`` (an RLock plus a token list, see ``_lock``).
new_lock: Final = cast(
    Callable[[], PoolLock], PyPoolLock if speedups is None else speedups.FastLock
)
