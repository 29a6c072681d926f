"""Reporting a session: terminal tables (rich), JSON document, markdown tables.

The JSON document (``--json FILE``) has this shape (schema id ``bufpool-loadtest/2``; the
steady scenario keeps schema 1's top-level ``runs`` and ``summary``)::

    {"schema": "bufpool-loadtest/2", "created": ISO-8601, "host": {...},
     "settings": {..., "scenarios": [NAME, ...], "flood": {...}, "abuse": {...}},
     "runs": [RUN, ...],                       # steady: one per measured run, in run order
     "summary": {"configs": {NAME: RUN-without-round, ...},
                 "ratios": {"baseline": "no-pool", "candidate": "pool", METRIC: float, ...}},
     "scenarios": {NAME: TABLE, ...},          # in the order they ran
     "wall_s": float}                          # seconds for all scenarios, servers included

    RUN = {"config": str, "round": int, "mode": "closed"|"open", "duration_s": float,
           "requests": int, "late": int, "rps": float, "bytes_sent": int, "bytes_received": int,
           "latency_ms": {"p50","p90","p99","p99_9","max","mean": float},
           "send_lag_ms": {"p99","max": float},
           "errors": {KIND: int}, "status": {"200": int, ...},
           "reply_bytes": {"BODY-BYTES": int, ...},   # replies by body size actually received
           "server": {"rss_peak_bytes", "minor_faults", "major_faults": int,
                      "cpu_seconds": float, "cpu_us_per_request": float,
                      "rss_samples": [[seconds, bytes], ...]} | null,
           "pool": {"hit_rate", "in_use", "quarantined", "waste_ratio", "reserved_bytes",
                    ...} | null}

    TABLE = {"title": str, "header": [str, ...], "rows": [[str, ...], ...], "verdict": str,
             "wall_s": float, ...}
      steady: + "spread": {ROW-LABEL: {"ratio", "min", "max": float, "rounds": int,
                                       "better": str}},
                "replies_received": str
      flood:  + "runs": [{"config", "round", "clients", "body_bytes", "idle_s", "flood_s",
                          "served", "outcomes": {"HTTP 200" | "reset" | ...: int},
                          "uploads_per_s", "served_mib_per_s", "latency_ms",
                          "rss_before_bytes", "rss_peak_bytes", "rss_after_idle_bytes",
                          "rss_samples": [[seconds since the flood began, bytes], ...],
                          "pool_after_idle": {...} | null}, ...],
                "configs": {NAME: the runs combined}, "ratios": {ROW-LABEL: {...}}
      abuse:  + "runs": [{"config", "round", "duration_s", "legit": RUN-without-round,
                          "legit_ok", "legit_total": int, "legit_success_rate": float,
                          "attackers": {"total", "cut_off": int, "by_outcome", "by_kind",
                                        "cut_s": {"min","median","max"},
                                        "list": [{"kind","cut_s","how","sent"}, ...]},
                          "pool_samples": [[seconds, pinned bytes, reserved bytes], ...],
                          "pool_pinned_peak_bytes": int | null, "rss_peak_bytes": int,
                          "rss_samples": [[seconds, bytes], ...]}, ...],
                "configs": {NAME: the runs combined}, "ratios": {ROW-LABEL: {...}}

Ratios are candidate / baseline (``pool`` over ``no-pool``): above 1 means more of it with
the pool; each table row says which direction is better and the min-max of the rounds' own
ratios.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from ._metrics import LoadResult, ServerUsage
from ._run import BASELINE, CANDIDATE, Session
from ._summaries import Row, abuse_doc, flood_doc, human_bytes, steady_verdict, table_rows

__all__ = [
    "SCHEMA",
    "render_table",
    "session_json",
    "session_markdown",
    "write_json",
    "write_markdown",
]

SCHEMA: Final = "bufpool-loadtest/2"
_MIB: Final = 1024 * 1024

# (key in the run dict, label, formatter); keys with dots reach into nested dicts.
_ROWS: Final = (
    ("rps", "requests/s", "{:,.0f}"),
    ("latency_ms.p50", "p50 ms", "{:.2f}"),
    ("latency_ms.p90", "p90 ms", "{:.2f}"),
    ("latency_ms.p99", "p99 ms", "{:.2f}"),
    ("latency_ms.p99_9", "p99.9 ms", "{:.2f}"),
    ("latency_ms.max", "max ms", "{:.2f}"),
    ("requests", "responses", "{:,}"),
    ("error_total", "errors", "{:,}"),
    ("mb_sent", "MB sent", "{:,.1f}"),
    ("mb_received", "MB received", "{:,.1f}"),
    ("server.rss_peak_mib", "server peak RSS MiB", "{:.1f}"),
    ("server.minor_faults", "server minor faults", "{:,}"),
    ("server.cpu_seconds", "server CPU s", "{:.2f}"),
    ("server.cpu_us_per_request", "server CPU us/request", "{:.1f}"),
    ("pool.hit_rate", "pool hit rate", "{:.1%}"),
    ("pool.in_use", "pool in use (after)", "{}"),
    ("pool.quarantined", "pool quarantined (after)", "{}"),
    ("pool.waste_ratio", "pool waste ratio", "{:.1%}"),
    ("pool.reserved_mib", "pool reserved MiB", "{:.1f}"),
)
#: Metrics whose candidate/baseline ratio is reported.
RATIO_KEYS: Final = (
    "rps",
    "latency_ms.p50",
    "latency_ms.p90",
    "latency_ms.p99",
    "latency_ms.p99_9",
    "latency_ms.max",
    "server.rss_peak_mib",
    "server.minor_faults",
    "server.cpu_seconds",
    "server.cpu_us_per_request",
)


def run_dict(
    load: LoadResult, usage: ServerUsage | None, pool: dict[str, Any] | None, mode: str
) -> dict[str, Any]:
    """One run (or one configuration's combined rounds) as plain JSON-ready data."""
    lag = load.send_lag
    out: dict[str, Any] = {
        "mode": mode,
        "duration_s": round(load.duration_s, 3),
        "requests": load.requests,
        "late": load.late,
        "rps": round(load.rps, 1),
        "bytes_sent": load.bytes_sent,
        "bytes_received": load.bytes_received,
        "latency_ms": {k: round(v, 3) for k, v in load.latency_ms().items()},
        "send_lag_ms": {
            "p99": lag.get_value_at_percentile(99.0) / 1000 if lag.get_total_count() else 0.0,
            "max": lag.get_max_value() / 1000 if lag.get_total_count() else 0.0,
        },
        "errors": dict(sorted(load.errors.items())),
        "status": {str(k): v for k, v in sorted(load.status.items())},
        "reply_bytes": {str(k): v for k, v in sorted(load.replies.items())},
        "server": None,
        "pool": pool or None,
    }
    if usage is not None:
        server = usage.as_dict()
        server["cpu_us_per_request"] = (
            round(usage.cpu_seconds / load.requests * 1e6, 2) if load.requests else 0.0
        )
        out["server"] = server
    return out


def _get(d: dict[str, Any], key: str) -> Any:
    derived: dict[str, Callable[[dict[str, Any]], Any]] = {
        "error_total": lambda r: (
            sum(r["errors"].values()) + sum(n for s, n in r["status"].items() if int(s) >= 400)
        ),
        "mb_sent": lambda r: r["bytes_sent"] / 1e6,
        "mb_received": lambda r: r["bytes_received"] / 1e6,
        "server.rss_peak_mib": lambda r: (
            r["server"]["rss_peak_bytes"] / _MIB if r["server"] else None
        ),
        "pool.reserved_mib": lambda r: (
            r["pool"]["reserved_bytes"] / _MIB
            if r["pool"] and r["pool"].get("reserved_bytes") is not None
            else None
        ),
    }
    if key in derived:
        return derived[key](d)
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return None
        cur = cur[part]
    return cur


def _steady_rows() -> list[Row]:
    ratio_keys = set(RATIO_KEYS)
    lower = {k for k in RATIO_KEYS if k != "rps"}
    out = []
    for key, label, fmt in _ROWS:
        better = "" if key not in ratio_keys else ("lower" if key in lower else "higher")
        out.append(Row(label, functools.partial(_get, key=key), fmt, better))
    return out


def _steady(session: Session, runs: list[dict[str, Any]]) -> dict[str, Any]:
    mode = session.settings.mode
    configs = {
        name: run_dict(load, usage, pool, mode)
        for name, (load, usage, pool) in session.by_config().items()
    }
    ratios: dict[str, Any] = {}
    if BASELINE in configs and CANDIDATE in configs:
        ratios = {"baseline": BASELINE, "candidate": CANDIDATE}
        for key in RATIO_KEYS:
            ratios[key.split(".")[-1].replace("_mib", "")] = _ratio(
                _get(configs[CANDIDATE], key), _get(configs[BASELINE], key)
            )
    header, rows, spread = table_rows(_steady_rows(), configs, runs, BASELINE, CANDIDATE)
    replies = _replies_received(configs)
    return {
        "configs": configs,
        "ratios": ratios,
        "title": _title(session.settings.as_dict(), replies),
        "header": header,
        "rows": rows,
        "spread": spread,
        "replies_received": replies,
        "verdict": steady_verdict(configs, spread, BASELINE, CANDIDATE) if configs else "",
    }


def _replies_received(configs: dict[str, Any]) -> str:
    """Reply body sizes that came back, over every configuration: ``16k:1`` or a range."""
    sizes: dict[int, int] = {}
    for cfg in configs.values():
        for k, n in cfg.get("reply_bytes", {}).items():
            sizes[int(k)] = sizes.get(int(k), 0) + n
    known = {k: n for k, n in sizes.items() if k >= 0}
    if not known:
        return "none"
    if len(known) <= 4 and -1 not in sizes:
        return ",".join(f"{_size_text(k)}:{n}" for k, n in sorted(known.items()))
    total = sum(known.values())
    mean = sum(k * n for k, n in known.items()) / total
    return f"{_size_text(min(known))}..{_size_text(max(known))} (mean {human_bytes(mean)})"


def _size_text(n: int) -> str:
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def session_json(session: Session) -> dict[str, Any]:
    """The whole session as the documented JSON object."""
    mode = session.settings.mode
    runs = []
    for r in session.runs:
        d = {"config": r.config, "round": r.round, **run_dict(r.load, r.server, r.pool, mode)}
        runs.append(d)
    scenarios: dict[str, Any] = {}
    summary: dict[str, Any] = {"configs": {}, "ratios": {}}
    st = session.settings
    for name in st.scenarios:
        if name == "steady":
            steady = _steady(session, runs)
            summary = {"configs": steady.pop("configs"), "ratios": steady.pop("ratios")}
            scenarios["steady"] = steady
        elif name == "flood":
            scenarios["flood"] = flood_doc(
                [(f.config, f.round, f.result) for f in session.flood], BASELINE, CANDIDATE
            )
        elif name == "abuse":
            scenarios["abuse"] = abuse_doc(
                [(a.config, a.round, a.result) for a in session.abuse],
                BASELINE,
                CANDIDATE,
                lambda load: run_dict(load, None, None, mode),
                st.attackers,
                st.abuse_connections,
            )
        if name in scenarios:
            scenarios[name]["wall_s"] = session.wall_s.get(name)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.fromtimestamp(session.started, datetime.UTC).isoformat(),
        "host": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "argv": sys.argv[1:],
        },
        "settings": st.as_dict(),
        "runs": runs,
        "summary": summary,
        "scenarios": scenarios,
        "wall_s": round(sum(session.wall_s.values()), 1),
    }


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return round(a / b, 3)


def _title(s: dict[str, Any], replies: str) -> str:
    load = f"open loop {s['rate']:,.0f} req/s" if s["mode"] == "open" else "closed loop"
    asked = s["url"] is None or s.get("reply_given")
    reply_words = f"replies received {replies}" + (f" (asked {s['reply']})" if asked else "")
    return (
        f"steady: {load}, {s['connections']} connections, {s['rounds']} x {s['duration_s']:g} s "
        f"per config, bodies {s['mix']}, {reply_words}, {s['method']}"
        + (", TLS via SNI proxy" if s["tls"] else "")
        + (f", {s['workers']} load processes" if s["workers"] > 1 else "")
        + (f", gunicorn x{s['server_workers']}" if s["server_workers"] else "")
    )


def _problems(doc: dict[str, Any]) -> list[str]:
    out = []
    for name, cfg in doc["summary"]["configs"].items():
        bad = {
            **cfg["errors"],
            **{f"HTTP {k}": v for k, v in cfg["status"].items() if int(k) >= 400},
        }
        if bad:
            detail = ", ".join(f"{k}: {v:,}" for k, v in bad.items())
            out.append(f"steady {name} errors: {detail}")
        if cfg["send_lag_ms"]["p99"] > 5.0 and doc["settings"]["mode"] == "open":
            out.append(
                f"{name}: the load generator itself ran late (send lag p99 "
                f"{cfg['send_lag_ms']['p99']:.1f} ms); use --workers or a lower --rate"
            )
    return out


def render_table(doc: dict[str, Any], console: Console) -> None:
    """One table per scenario (with ratio, spread over rounds and better direction), the
    problems seen, then one verdict line per scenario."""
    problems = _problems(doc)
    for name, sc in doc["scenarios"].items():
        # steady: the load shape on top, what was sent and received in the footer.
        title, _, footer = sc["title"].partition(" per config, ")
        table = Table(title=title + (" per config" if footer else ""), title_justify="left")
        for i, h in enumerate(sc["header"]):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for row in sc["rows"]:
            table.add_row(*row)
        console.print(table)
        if footer:
            console.print(footer, highlight=False)
        if name == "steady":
            for line in problems:
                console.print(f"[yellow]{line}[/]")
    for sc in doc["scenarios"].values():
        console.print(f"[bold]{sc['verdict']}[/]", highlight=False)
    if doc.get("wall_s"):
        console.print(f"[dim]ran {doc['wall_s']:.0f} s[/]")


def session_markdown(doc: dict[str, Any]) -> str:
    """Every scenario's table as markdown, each under its title and above its verdict."""
    lines: list[str] = []
    for sc in doc["scenarios"].values():
        header = sc["header"]
        lines += [f"**{sc['title']}**", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        lines.extend("| " + " | ".join(r) + " |" for r in sc["rows"])
        lines += ["", sc["verdict"], ""]
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    path.write_text(session_markdown(doc))
