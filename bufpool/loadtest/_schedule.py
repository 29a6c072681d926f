"""When each request is sent, and what it carries.

Supports two load shapes and one request-mix description:

* ``OpenLoop`` -- a constant arrival rate.  Request ``k`` is *due* at ``start + k / rate``
  whether or not earlier requests have finished; its latency is measured from that due time,
  not from when a connection got round to sending it.  This is the coordinated-omission
  correction wrk2 introduced: a server that stalls for one second is charged for every request
  that should have been sent during that second, instead of for one slow request.
* ``ClosedLoop`` -- each connection sends its next request as soon as the previous response
  ends (maximum throughput); latency runs from the actual send.
* ``Mix`` -- weighted choices of request body size, reply size and method, parsed from
  ``"1k:1,16k:1,256k:1"`` and expanded into a fixed, seeded sequence so that every
  configuration in an A/B run sees exactly the same requests in the same order.

Goals: O(1) per request, no allocation per request, deterministic.  Times are integers in
nanoseconds of ``time.monotonic_ns()`` (system-wide on Linux, so worker processes share it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "ClosedLoop",
    "Mix",
    "OpenLoop",
    "Schedule",
    "parse_size",
]

_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?\s*$")
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

#: Length of the expanded request sequence (cycled); long enough for small weights to mix.
SEQUENCE_LENGTH: Final = 4096


def parse_size(text: str) -> int:
    """Bytes from ``"4096"``, ``"16k"``, ``"1.5M"``, ``"256KiB"`` (binary units)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"bad size {text!r}: expected a number with an optional k/m/g suffix")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Schedule(Protocol):
    """Hands out due times (ns) for requests; None once the run's end has been reached."""

    def next_due(self, now_ns: int) -> int | None: ...


class OpenLoop:
    """Constant rate: request k is due at ``start_ns + phase_ns + k * interval``.

    Shared by all connections of one load process: an idle connection takes the next due
    slot, so slots are never skipped when the server is slow -- they pile up, and their
    latency (measured from the due time) shows the queueing.
    """

    __slots__ = ("_end", "_interval", "_next", "rate")

    def __init__(self, rate: float, start_ns: int, end_ns: int, phase_ns: int = 0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate}")
        self.rate = rate
        self._interval = 1e9 / rate
        self._next = float(start_ns + phase_ns)
        self._end = end_ns

    def next_due(self, now_ns: int) -> int | None:
        due = int(self._next)
        if due >= self._end:
            return None
        self._next += self._interval
        return due


class ClosedLoop:
    """Send as soon as a connection is free: the due time is "now" until the end."""

    __slots__ = ("_end",)

    def __init__(self, end_ns: int) -> None:
        self._end = end_ns

    def next_due(self, now_ns: int) -> int | None:
        return now_ns if now_ns < self._end else None


@dataclass(frozen=True, slots=True)
class Mix:
    """Weighted values, e.g. body sizes ``((1024, 1), (16384, 1), (262144, 1))``."""

    choices: tuple[tuple[int | str, int], ...]

    @classmethod
    def parse_sizes(cls, text: str) -> Mix:
        """``"1k:1,16k:1,256k:1"`` -> sizes in bytes with integer weights (default 1)."""
        return cls(tuple((parse_size(v), w) for v, w in _weighted(text)))

    @classmethod
    def parse_methods(cls, text: str) -> Mix:
        """``"POST:3,GET:1"`` -> upper-case methods with weights."""
        out: list[tuple[int | str, int]] = []
        for v, w in _weighted(text):
            method = v.strip().upper()
            if not method.isalpha():
                raise ValueError(f"bad HTTP method {v!r}")
            out.append((method, w))
        return cls(tuple(out))

    def values(self) -> tuple[int | str, ...]:
        return tuple(v for v, _ in self.choices)

    def describe(self) -> str:
        return ",".join(f"{_fmt(v)}:{w}" for v, w in self.choices)

    def sequence(self, rng: random.Random, length: int = SEQUENCE_LENGTH) -> list[int]:
        """Indices into ``choices``, in proportion to the weights, shuffled by ``rng``."""
        total = sum(w for _, w in self.choices)
        out: list[int] = []
        for i, (_, w) in enumerate(self.choices):
            out.extend([i] * max(1, round(length * w / total)))
        rng.shuffle(out)
        return out


def request_sequence(mixes: Sequence[Mix], seed: int) -> list[tuple[int, ...]]:
    """A fixed cycle of index tuples, one index per mix, drawn independently per mix."""
    rng = random.Random(seed)
    seqs = [m.sequence(rng) for m in mixes]
    n = max(len(s) for s in seqs)
    return [tuple(s[i % len(s)] for s in seqs) for i in range(n)]


def _weighted(text: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        value, _, weight = part.partition(":")
        try:
            w = int(weight) if weight.strip() else 1
        except ValueError:
            raise ValueError(f"bad weight {weight!r} in {part!r}: expected an integer") from None
        if w <= 0:
            raise ValueError(f"weight must be > 0 in {part!r}")
        out.append((value, w))
    if not out:
        raise ValueError(f"empty mix {text!r}")
    return out


def _fmt(v: int | str) -> str:
    if isinstance(v, str):
        return v
    for unit, scale in (("m", 1 << 20), ("k", 1 << 10)):
        if v >= scale and v % scale == 0:
            return f"{v // scale}{unit}"
    return str(v)
