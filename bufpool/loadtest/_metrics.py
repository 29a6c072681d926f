"""What one run measured: client-side latency and counters, server-side memory and CPU.

* ``LoadResult`` -- counters and an HDR latency histogram (the ``hdrhistogram`` package) of one
  load process; results of several processes or rounds merge exactly (histograms add).
* ``ServerSampler`` -- psutil samples of a server's process tree: RSS over time (bytes), minor
  and major page faults and CPU seconds as deltas over the run.
* ``scrape_pool_stats`` -- the pool's JSON stats endpoint, read before and after a run.

Latency is recorded in microseconds, 1 us .. 1 hour, 3 significant digits (HdrHistogram's
usual setting: about 0.1% value error, a few hundred KiB per histogram).  Costs: recording is
an array append per request (histogram insertion is batched at the end of the run); a server
sample is a handful of /proc reads.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from typing import Any, Final

import psutil
from hdrh.histogram import HdrHistogram

__all__ = [
    "MAX_REPLY_SIZES",
    "PERCENTILES",
    "LoadResult",
    "ServerSampler",
    "ServerUsage",
    "new_histogram",
    "scrape_pool_stats",
]

#: Percentiles reported everywhere (table, JSON, markdown).
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
_LOWEST_US: Final = 1
_HIGHEST_US: Final = 3_600_000_000
_DIGITS: Final = 3
#: Distinct reply body sizes counted one by one in ``LoadResult.replies``.
MAX_REPLY_SIZES: Final = 64


def new_histogram() -> HdrHistogram:
    """An empty latency histogram in microseconds."""
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)


@dataclass
class LoadResult:
    """Client-side outcome of one run in one load process.

    ``requests`` counts responses that completed (any status) within the run, ``late`` those
    that completed after its end (still in the latency histogram); ``errors`` counts
    failures by kind (``connect``, ``disconnect``, ``timeout``, ``bad_response``) and
    ``status`` counts responses by HTTP status code.  Bytes are on-the-wire HTTP bytes.
    ``send_lag`` is how late the generator itself sent requests (open loop; microseconds).
    ``replies`` counts responses by body size in bytes (what actually came back), at most
    ``MAX_REPLY_SIZES`` distinct sizes; responses of further sizes are counted under -1.
    """

    duration_s: float = 0.0
    requests: int = 0
    late: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    status: Counter[int] = field(default_factory=Counter)
    latency: HdrHistogram = field(default_factory=new_histogram)
    send_lag: HdrHistogram = field(default_factory=new_histogram)
    replies: Counter[int] = field(default_factory=Counter)

    def count_reply(self, body_bytes: int) -> None:
        """Count one response body of ``body_bytes`` bytes."""
        replies = self.replies
        if body_bytes in replies or len(replies) < MAX_REPLY_SIZES:
            replies[body_bytes] += 1
        else:
            replies[-1] += 1

    @staticmethod
    def record_all(hist: HdrHistogram, values_ns: array[int]) -> None:
        """Insert nanosecond values into a microsecond histogram (clamped to its range)."""
        record = hist.record_value
        for v in values_ns:
            us = v // 1000
            record(_LOWEST_US if us < _LOWEST_US else min(us, _HIGHEST_US))

    def merge(self, other: LoadResult) -> None:
        """Add another process's result for the same time window (durations: the longest)."""
        self.duration_s = max(self.duration_s, other.duration_s)
        self.requests += other.requests
        self.late += other.late
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.errors.update(other.errors)
        self.status.update(other.status)
        for size, n in other.replies.items():
            if size in self.replies or len(self.replies) < MAX_REPLY_SIZES:
                self.replies[size] += n
            else:
                self.replies[-1] += n
        self.latency.add(other.latency)
        self.send_lag.add(other.send_lag)

    def append(self, other: LoadResult) -> None:
        """Add a later run of the same configuration (durations add up)."""
        duration = self.duration_s + other.duration_s
        self.merge(other)
        self.duration_s = duration

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def error_count(self) -> int:
        return sum(self.errors.values()) + sum(n for s, n in self.status.items() if s >= 400)

    def latency_ms(self) -> dict[str, float]:
        """p50/p90/p99/p99.9/max/mean in milliseconds (zeros when nothing completed)."""
        h = self.latency
        if h.get_total_count() == 0:
            return {**{_pkey(p): 0.0 for p in PERCENTILES}, "max": 0.0, "mean": 0.0}
        out = {_pkey(p): h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
        out["max"] = h.get_max_value() / 1000
        out["mean"] = h.get_mean_value() / 1000
        return out

    def percentile_curve(self) -> list[tuple[float, float]]:
        """(percentile, latency ms) points for a percentile-distribution chart."""
        if self.latency.get_total_count() == 0:
            return []
        return [
            (item.percentile_level_iterated_to, item.value_iterated_to / 1000)
            for item in self.latency.get_percentile_iterator(5)
        ]

    def to_wire(self) -> dict[str, Any]:
        """Picklable form for passing between processes (histograms HDR-encoded)."""
        return {
            "duration_s": self.duration_s,
            "requests": self.requests,
            "late": self.late,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "errors": dict(self.errors),
            "status": dict(self.status),
            "replies": dict(self.replies),
            "latency": self.latency.encode(),
            "send_lag": self.send_lag.encode(),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LoadResult:
        res = cls(
            duration_s=data["duration_s"],
            requests=data["requests"],
            late=data["late"],
            bytes_sent=data["bytes_sent"],
            bytes_received=data["bytes_received"],
            errors=Counter(data["errors"]),
            status=Counter(data["status"]),
            replies=Counter(data.get("replies", {})),
        )
        for name in ("latency", "send_lag"):
            if data[name]:
                getattr(res, name).decode_and_add(data[name])
        return res


def _pkey(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_"))


@dataclass
class ServerUsage:
    """Server process tree over one run.  RSS in bytes, CPU in seconds."""

    rss_samples: list[tuple[float, int]] = field(default_factory=list)  #: (s since start, RSS)
    rss_peak: int = 0
    minor_faults: int = 0
    major_faults: int = 0
    cpu_seconds: float = 0.0

    def append(self, other: ServerUsage) -> None:
        """Add a later run: samples continue on the time axis; peak is the max."""
        offset = self.rss_samples[-1][0] if self.rss_samples else 0.0
        self.rss_samples.extend((t + offset, v) for t, v in other.rss_samples)
        self.rss_peak = max(self.rss_peak, other.rss_peak)
        self.minor_faults += other.minor_faults
        self.major_faults += other.major_faults
        self.cpu_seconds += other.cpu_seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "rss_peak_bytes": self.rss_peak,
            "minor_faults": self.minor_faults,
            "major_faults": self.major_faults,
            "cpu_seconds": round(self.cpu_seconds, 3),
            "rss_samples": [[round(t, 3), v] for t, v in self.rss_samples],
        }


class ServerSampler:
    """Samples a server's process tree (the root pid and all its descendants).

    ``start()`` then ``sample()`` periodically then ``stop()`` -> ServerUsage.  Processes that
    come and go (gunicorn workers) are included while alive; their faults and CPU are counted
    from when the sampler first saw them.
    """

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self._t0 = 0.0
        self._base: dict[int, tuple[int, int, float]] = {}
        self._last: dict[int, tuple[int, int, float]] = {}
        self._usage = ServerUsage()

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _counters(self, proc: psutil.Process) -> tuple[int, int, float]:
        cpu = proc.cpu_times()
        minflt, majflt = _faults(proc.pid)
        return minflt, majflt, cpu.user + cpu.system

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._usage = ServerUsage()
        self._base.clear()
        self._last.clear()
        self.sample()

    def sample(self) -> int:
        """Take one RSS sample (bytes, summed over the tree); returns it."""
        rss = 0
        for proc in self._procs():
            try:
                rss += proc.memory_info().rss
                counters = self._counters(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
                continue
            self._base.setdefault(proc.pid, counters)
            self._last[proc.pid] = counters
        u = self._usage
        u.rss_samples.append((time.monotonic() - self._t0, rss))
        u.rss_peak = max(u.rss_peak, rss)
        return rss

    def stop(self) -> ServerUsage:
        self.sample()
        u = self._usage
        for pid, last in self._last.items():
            base = self._base[pid]
            u.minor_faults += last[0] - base[0]
            u.major_faults += last[1] - base[1]
            u.cpu_seconds += last[2] - base[2]
        return u


def _faults(pid: int) -> tuple[int, int]:
    """(minor, major) page faults of one process so far, from /proc/PID/stat (Linux)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0, 0
    fields = raw[raw.rindex(b")") + 2 :].split()
    # after "pid (comm) ": state=0 ppid=1 ... minflt=7 cminflt=8 majflt=9
    return int(fields[7]), int(fields[9])


def scrape_pool_stats(
    url: str, timeout: float = 5.0, ssl_context: SSLContext | None = None
) -> dict[str, Any] | None:
    """GET the pool stats endpoint as JSON; None if the server has none (404) or it fails."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl_context) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pool_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Pool figures for one run: gauges from ``after``, hit rate over the run's own requests."""
    if after is None:
        return {}
    out: dict[str, Any] = {
        k: after.get(k)
        for k in ("in_use", "quarantined", "reserved_bytes", "waste_ratio", "heap_fallbacks")
        if k in after
    }
    hits = after.get("hits")
    misses = after.get("misses")
    if isinstance(hits, int) and isinstance(misses, int) and before is not None:
        dh = hits - int(before.get("hits", 0))
        dm = misses - int(before.get("misses", 0))
        out["hit_rate"] = dh / (dh + dm) if dh + dm else after.get("hit_rate")
        out["hits"] = dh
        out["misses"] = dm
    else:
        out["hit_rate"] = after.get("hit_rate")
    return out
