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
are queued and reported (as LeakWarning) by ``pool.stats()``, ``reclaim()``, ``trim()`` or
:func:`bufpool.report_leaks`.

Leaks as errors, for an application rather than a test suite (pytest's ``filterwarnings``):

* ``BUFPOOL_LEAKS=error`` in the environment (any action of the ``warnings`` module:
  ``error``, ``ignore``, ``always``, ``default``, ``module``, ``once``) installs that filter for
  LeakWarning when bufpool is imported, so the call that reports a leak raises it.
* ``python -W error::bufpool.LeakWarning`` (or the same in ``PYTHONWARNINGS``): CPython reads
  ``-W`` before bufpool can be imported, prints "Invalid -W option ignored: invalid module
  name: 'bufpool'" and drops it; bufpool applies such options (category ``bufpool.LeakWarning``
  or ``bufpool._errors.LeakWarning``) itself when imported.
* Without bufpool's help: ``-W "error:bufpool:ResourceWarning"`` (message prefix "bufpool",
  category ResourceWarning, of which LeakWarning is a subclass) works in CPython as is.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Final, Literal

from ._errors import LeakWarning

__all__ = ["LEVELS", "SAMPLE_INTERVAL", "apply_warning_switches", "capture_site", "format_site"]

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


#: How ``-W``/``PYTHONWARNINGS`` may name the category (CPython cannot import it at startup).
_CATEGORY_NAMES: Final = ("bufpool.LeakWarning", "bufpool._errors.LeakWarning")
Action = Literal["error", "ignore", "always", "default", "module", "once"]
_ACTIONS: Final[tuple[Action, ...]] = ("error", "ignore", "always", "default", "module", "once")


def apply_warning_switches() -> None:
    """Install the LeakWarning filters asked for by ``-W``/``PYTHONWARNINGS`` options that name
    bufpool's category (in their order, as CPython would have) and then by ``BUFPOOL_LEAKS``
    (which wins).  Called once, when bufpool is imported.  A malformed setting is reported as
    a RuntimeWarning, never an import failure."""
    for option in sys.warnoptions:
        parts = [p.strip() for p in option.split(":")]
        if len(parts) < 3 or len(parts) > 5 or parts[2] not in _CATEGORY_NAMES:
            continue
        action, message, _, module, lineno = [*parts, "", ""][:5]
        try:
            warnings.filterwarnings(
                _action(action),
                message=_literal(message),
                category=LeakWarning,
                module=_literal(module) + (r"\Z" if module else ""),
                lineno=int(lineno) if lineno else 0,
            )
        except ValueError as exc:
            warnings.warn(f"bufpool: -W {option!r} ignored: {exc}", RuntimeWarning, 2)
    env = os.environ.get("BUFPOOL_LEAKS", "").strip()
    if env:
        try:
            warnings.filterwarnings(_action(env), category=LeakWarning)
        except ValueError as exc:
            warnings.warn(f"bufpool: BUFPOOL_LEAKS={env!r} ignored: {exc}", RuntimeWarning, 2)


def _action(name: str) -> Action:  # the warnings module's action names
    for action in _ACTIONS:
        if action.startswith(name) and name:  # CPython accepts prefixes ("e" for "error")
            return action
    raise ValueError(f"unknown action {name!r}: use one of {', '.join(_ACTIONS)}")


def _literal(text: str) -> str:
    import re

    return re.escape(text) if text else ""
