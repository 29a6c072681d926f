"""Leak detection levels and acquisition-site capture, in the manner of Netty's
ResourceLeakDetector.

Levels:

``"off"``
    A lease that is garbage-collected unreleased still gives its slot back (once no view of it
    is alive) and counts in ``PoolStats.leaked``, but no warning is emitted.
``"sample"`` (default)
    Every leak emits :class:`~bufpool.LeakWarning`; about 1 lease in 128 also records where it
    was acquired, so a steady leak soon reports its source.  Cost: one counter decrement per
    acquire, plus a short stack walk on sampled leases.
``"paranoid"``
    Every lease records its acquisition site.  For tests and debugging.

Warnings are not raised from ``__del__`` (where Python would only print them): leaked leases
are queued and reported by the next pool operation on a miss, by ``pool.stats()``, or by
:func:`bufpool.report_leaks`, so ``-W error::bufpool.LeakWarning`` fails the code that leaked.
"""

from __future__ import annotations

import os
import sys
from typing import Final

__all__ = ["LEVELS", "SAMPLE_INTERVAL", "capture_site", "format_site"]

LEVELS: Final = ("off", "sample", "paranoid")
#: One lease in this many records its acquisition site at level "sample".
SAMPLE_INTERVAL: Final = 128
#: Frames recorded per acquisition site.
SITE_DEPTH: Final = 6

Site = tuple[tuple[str, int, str], ...]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def capture_site() -> Site:
    """Up to SITE_DEPTH (file, line, function) frames of the caller, bufpool frames skipped."""
    frame = sys._getframe(1)
    out: list[tuple[str, int, str]] = []
    while frame is not None and len(out) < SITE_DEPTH:
        code = frame.f_code
        if not code.co_filename.startswith(_PKG_DIR) or out:
            out.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(out)


def format_site(site: Site | None) -> str:
    """Human-readable acquisition site, innermost frame first."""
    if not site:
        return (
            "acquisition site not recorded (leak_detection='paranoid' records every lease; "
            "'sample' records about 1 in 128)"
        )
    return "acquired at:\n" + "\n".join(f"  {f}:{ln} in {fn}" for f, ln, fn in site)
