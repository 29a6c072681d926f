"""Type stub of the compiled hot paths (bufpool/_speedups.c); see bufpool._impl."""

from collections.abc import Callable
from typing import Any

class FastLock:
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def _is_owned(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *args: object) -> None: ...

class TierCore:
    free: list[bytearray]
    quarantine: list[bytearray]
    waiters: Any
    zeros: bytes
    index: int
    size: int
    slot_size: int
    min_slots: int
    chunk_slots: int
    slots: int
    in_use: int
    high_water: int
    hits: int
    misses: int
    spills: int
    extra_served: int
    requested_bytes: int

class PoolCore:
    _tiers: tuple[TierCore, ...]
    _lock: FastLock
    _slow_release: bool
    _sampling: bool
    _countdown: int
    _interval: int
    def acquire(self, size: int, /) -> Lease: ...

class Lease:
    def __new__(
        cls,
        pool: PoolCore,
        tier: TierCore | None,
        buf: bytearray,
        view: memoryview | None,
        size: int,
        site: object,
    ) -> Lease: ...
    @property
    def view(self) -> memoryview: ...
    def __len__(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def pooled(self) -> bool: ...
    @property
    def refcount(self) -> int: ...
    @property
    def released(self) -> bool: ...
    def retain(self) -> Lease: ...
    def release(self) -> None: ...
    def truncate(self, size: int, /) -> None: ...
    def tobytes(self) -> bytes: ...
    def __enter__(self) -> Lease: ...
    def __exit__(self, *exc_info: object) -> None: ...

def setup(
    *,
    released_error: type[BaseException],
    py_release: Callable[..., None],
    py_truncate: Callable[..., None],
    bad_size: Callable[[object], None],
    pkg_dir: str,
    site_depth: int,
) -> None: ...
