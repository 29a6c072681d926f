"""The pure-Python core's pool lock: a re-entrant lock plus a one-element *token* list.

Operations: the hit paths (``BufferPool.acquire``, ``Lease.release``) touch pool state only
while they hold the token, taken by ``del token[0]`` (IndexError when someone else has it)
and given back by ``token.append(None)``.  Each is one list operation that runs no Python
code and is atomic on every build (under the GIL; under the list's own lock on free-threaded
builds), so a hit costs two list operations instead of an RLock round trip.  Everything else
(misses, stats, trim, waiters, leaks: the *sections*) takes the lock as a whole: the
``threading.RLock`` first, which orders and blocks sections among themselves, then the token,
which a hit path holds for about ten statements (sleep-and-retry).  Cost: O(1) per hit; a
section waits at most for the hit paths of other threads in progress.

Re-entrance, as ``threading.RLock``: the owner of the lock acquires it again without waiting.
Code can also run *inside* a hit path's stretch on the same thread: finalizers run by the GC
(at the C calls of the stretch on 3.12+; the stretches allocate nothing the 3.11 GC counts),
or a tracer and what it calls.  A hit path keeps the token in a local named ``held`` while it
holds it (set right after taking it, cleared right before giving it back, each on the same
line), so :func:`own_section_holds` finds it on the stack: a release from such code is queued
(``Lease.release``; done by the pool's next miss or ``stats()``), and any other pool call
re-enters the stretch in progress instead of waiting for its own thread.  Every statement of
a stretch leaves the pool consistent, so a re-entrant acquire takes another slot.
"""

from __future__ import annotations

import sys
import threading
import time
from types import CodeType

__all__ = ["GIVE", "PyPoolLock", "hot_section", "own_section_holds"]

#: What a hit path adds to give the token back (``token += GIVE``: an in-place list
#: concatenation, no call).  Not ``token.append(None)``: that is a call, and a profiler's
#: c_call event (``sys.setprofile``, ``sys.monitoring``) would run Python code after ``held``
#: was cleared but before the token was back; a release there would wait for the token
#: forever on its own thread.
GIVE: tuple[None] = (None,)

#: Code objects of the hit paths that take the token (registered by ``hot_section``).
_HOT_CODES: set[CodeType] = set()


def hot_section(code: CodeType) -> None:
    """Register a function's code as one that holds the token while its ``held`` is it."""
    _HOT_CODES.add(code)


def own_section_holds(token: list[None]) -> bool:
    """True when a hit path of the calling thread (a frame further up) holds ``token``.

    Walks this thread's stack: O(stack depth), only ever called when the token is taken."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _HOT_CODES and frame.f_locals.get("held") is token:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class PyPoolLock:
    """``threading.RLock`` (same methods, errors and re-entrance) that also takes the token."""

    __slots__ = ("_guest_depth", "_guest_thread", "_levels", "_rlock", "token")

    def __init__(self) -> None:
        self._rlock = threading.RLock()
        #: The token the hit paths take; the pool keeps a reference as ``pool._token``.
        self.token: list[None] = [None]
        #: Per nesting level of the owner: whether that level took the token (written only
        #: by the owner).  Empty while nobody holds the lock.
        self._levels: list[bool] = []
        #: Nesting depth of *guests*: code running inside this thread's own token stretch (a
        #: finalizer, weakref callback or tracer) that takes the lock.  It must not wait for
        #: the RLock: another thread's section may hold that while it waits for the very
        #: token this thread's stretch holds.  Such a section touches nothing before it has
        #: the token, so the guest runs as the stretch's re-entrance.  Written only by the
        #: guest's thread.
        self._guest_depth = 0
        self._guest_thread: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        token = self.token
        if (
            not token
            and not self._rlock._is_owned()  # type: ignore[attr-defined]
            and (self._guest_depth or own_section_holds(token))
            and (not self._guest_depth or self._guest_thread == threading.get_ident())
        ):
            self._guest_thread = threading.get_ident()
            self._guest_depth += 1
            return True
        if not self._rlock.acquire(blocking, timeout):
            return False
        levels = self._levels
        if levels:  # re-entered by the owner, which holds the token already
            levels.append(False)
            return True
        try:
            del token[0]
        except IndexError:
            # A hit path has it: another thread's, for a few bytecodes, or this thread's own
            # (a finalizer or tracer running inside it), which we re-enter as RLock would.
            if own_section_holds(token):
                levels.append(False)
                return True
            if not blocking:
                self._rlock.release()
                return False
            while True:
                time.sleep(0)
                try:
                    del token[0]
                    break
                except IndexError:
                    pass
        levels.append(True)
        return True

    def release(self) -> None:
        if self._guest_depth and self._guest_thread == threading.get_ident():
            self._guest_depth -= 1
            return
        if not self._rlock._is_owned():  # type: ignore[attr-defined]
            self._rlock.release()  # raises RuntimeError("cannot release un-acquired lock")
        if self._levels.pop():
            self.token.append(None)
        self._rlock.release()

    def _is_owned(self) -> bool:
        if self._guest_depth and self._guest_thread == threading.get_ident():
            return True
        return self._rlock._is_owned()  # type: ignore[attr-defined, no-any-return]

    def locked(self) -> bool:
        return not self.token or bool(self._levels) or bool(self._guest_depth)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *args: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<PyPoolLock {'locked' if self.locked() else 'unlocked'} at {id(self):#x}>"
