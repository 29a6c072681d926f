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

``bufpool.IMPLEMENTATION`` tells which one is active.
"""

from __future__ import annotations

import _thread
import os
import sysconfig
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Final, Literal

__all__ = ["IMPLEMENTATION", "new_lock", "speedups"]


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


#: The compiled module, or None when the pure-Python core runs.
speedups: Final = _load()
#: "c" when the compiled hot paths are active, "python" otherwise.
IMPLEMENTATION: Final[Literal["c", "python"]] = "python" if speedups is None else "c"
#: Factory of the pool lock: the compiled paths read the state of their own lock type.
#: (``_speedups.FastLock`` has threading.Lock's methods; typed as the stdlib lock.)
new_lock: Final[Callable[[], _thread.LockType]] = (
    threading.Lock if speedups is None else speedups.FastLock
)
