"""Size classes: which slot size serves a request of ``n`` bytes.

A class has a nominal ``size`` (what users configure and what stats are keyed by) and a
``slot_size`` = size + headroom, the bytes actually reserved per slot.  Headroom lets the
16 KiB class hold a maximal TLS 1.2 record with its header (16384 + 2048 + 5 = 18437 bytes),
which would otherwise spill to 64 KiB and waste about 72% of it.

Routing is a ``bisect`` over the sorted slot sizes: O(log classes) per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_HEADROOM",
    "TLS12_MAX_RECORD",
    "TLS13_MAX_RECORD",
    "SizeClass",
    "build_classes",
]

#: Nominal class sizes in bytes.
DEFAULT_CLASSES: tuple[int, ...] = (64, 256, 1024, 4096, 16384, 65536)
#: Largest TLS 1.2 record on the wire: 5-byte header + 16384 plaintext + 2048 expansion.
TLS12_MAX_RECORD = 5 + 16384 + 2048
#: Largest TLS 1.3 record on the wire: 5-byte header + 16384 + 256.
TLS13_MAX_RECORD = 5 + 16384 + 256
#: Extra bytes per slot by nominal class size: the 16 KiB class holds a full TLS record.
DEFAULT_HEADROOM: Mapping[int, int] = {16384: TLS12_MAX_RECORD - 16384}


@dataclass(frozen=True, slots=True)
class SizeClass:
    """One size class: ``size`` nominal bytes, ``slot_size`` bytes reserved per slot."""

    size: int
    slot_size: int


def build_classes(
    classes: Iterable[int], headroom: Mapping[int, int] | None
) -> tuple[SizeClass, ...]:
    """Validate class sizes and apply headroom; raise ValueError/TypeError on nonsense."""
    sizes = list(classes)
    if not sizes:
        raise ValueError("classes must name at least one size class")
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool):
            raise TypeError(f"class sizes must be int, got {type(s).__name__} {s!r}")
        if s <= 0:
            raise ValueError(f"class sizes must be positive, got {s}")
    for a, b in pairwise(sizes):
        if b <= a:
            raise ValueError(f"classes must be strictly increasing, got {a} then {b}")
    extra = dict(DEFAULT_HEADROOM if headroom is None else headroom)
    for k, v in extra.items():
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"headroom for class {k} must be a non-negative int, got {v!r}")
    out = tuple(SizeClass(s, s + extra.get(s, 0)) for s in sizes)
    for lo, hi in pairwise(out):
        if hi.slot_size <= lo.slot_size:
            raise ValueError(
                f"headroom makes class {lo.size} ({lo.slot_size} B slots) no smaller than "
                f"class {hi.size} ({hi.slot_size} B slots)"
            )
    return out
