"""Immutable stats snapshots of a BufferPool, exportable as dict/JSON or Prometheus text."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PoolStats", "TierStats"]


@dataclass(frozen=True, slots=True)
class TierStats:
    """One size class at snapshot time.  Sizes in bytes, counts cumulative since creation."""

    size: int  #: nominal class size
    slot_size: int  #: bytes reserved per slot (size + headroom)
    slots: int  #: slots allocated (free + in use + quarantined)
    free: int  #: slots ready to hand out
    in_use: int  #: slots held by live leases
    quarantined: int  #: released slots still referenced by some view
    high_water: int  #: most slots in use at once
    hits: int  #: requests for this class served from its free list
    misses: int  #: requests for this class that needed growth, a spill or the heap
    spills: int  #: requests for this class served by a larger class
    leased_bytes: int  #: slot capacity handed out by this tier, cumulative
    requested_bytes: int  #: bytes asked for by leases this tier served, cumulative


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Snapshot of a pool.  ``waste_ratio`` = slot bytes not asked for / slot bytes leased."""

    in_use: int  #: live pooled leases
    reserved_bytes: int  #: bytes of all slots allocated (the budget in use)
    max_bytes: int  #: the budget
    hits: int
    misses: int
    spills: int
    heap_fallbacks: int  #: leases served from unpooled memory (policy "heap" or oversize)
    heap_in_use: int  #: live heap-backed leases
    heap_bytes: int  #: bytes of heap leases alive or still viewed (bounded by max_heap_bytes)
    max_heap_bytes: int  #: the heap fallbacks' budget
    oversize: int  #: requests above the largest class
    quarantined: int  #: released slots some view still holds (exact when the snapshot is taken)
    leaked: int  #: leases garbage-collected without release
    waiting: int  #: acquire_async callers waiting for a slot (acquire_chain_async: or its turn)
    timeouts: int  #: acquire_async calls that ran out of time (a chain counts once)
    trimmed_bytes: int  #: bytes given back by trim(), cumulative
    hit_rate: float
    waste_ratio: float
    tiers: tuple[TierStats, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every field, tiers as a list of dicts."""
        return asdict(self)

    def prometheus(self, prefix: str = "bufpool") -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        scalars = {
            "in_use": ("gauge", "Live pooled leases"),
            "reserved_bytes": ("gauge", "Bytes of slots allocated"),
            "max_bytes": ("gauge", "Byte budget of the pool"),
            "hits": ("counter", "Requests served from the class free list"),
            "misses": ("counter", "Requests that needed growth, a spill or the heap"),
            "spills": ("counter", "Requests served by a larger class"),
            "heap_fallbacks": ("counter", "Leases served from unpooled memory"),
            "heap_in_use": ("gauge", "Live heap-backed leases"),
            "heap_bytes": ("gauge", "Bytes of heap leases alive or still viewed"),
            "max_heap_bytes": ("gauge", "Byte budget of heap fallbacks"),
            "oversize": ("counter", "Requests above the largest class"),
            "quarantined": ("gauge", "Released slots still referenced by a view"),
            "leaked": ("counter", "Leases garbage-collected without release"),
            "waiting": ("gauge", "acquire_async callers waiting"),
            "timeouts": ("counter", "acquire_async timeouts"),
            "trimmed_bytes": ("counter", "Bytes given back by trim"),
            "hit_rate": ("gauge", "hits / (hits + misses)"),
            "waste_ratio": ("gauge", "Unrequested slot bytes over leased slot bytes"),
        }
        for name, (kind, help_) in scalars.items():
            metric = f"{prefix}_{name}" + ("_total" if kind == "counter" else "")
            lines.append(f"# HELP {metric} {help_}")
            lines.append(f"# TYPE {metric} {kind}")
            lines.append(f"{metric} {getattr(self, name)}")
        tier_fields = {
            "slots": "gauge",
            "free": "gauge",
            "in_use": "gauge",
            "quarantined": "gauge",
            "high_water": "gauge",
            "hits": "counter",
            "misses": "counter",
            "spills": "counter",
        }
        for name, kind in tier_fields.items():
            metric = f"{prefix}_tier_{name}" + ("_total" if kind == "counter" else "")
            lines.append(f"# TYPE {metric} {kind}")
            for t in self.tiers:
                lines.append(
                    f'{metric}{{size="{t.size}",slot_size="{t.slot_size}"}} {getattr(t, name)}'
                )
        return "\n".join(lines) + "\n"
