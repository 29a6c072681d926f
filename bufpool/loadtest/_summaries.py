"""Per-scenario summaries: JSON parts, table rows with round-by-round spread, verdict lines.

Every ratio is candidate / baseline (``pool`` over ``no-pool``), once over the combined rounds
and once per round; a row shows the combined ratio, the min-max of the per-round ratios and
which direction is better.  A verdict is one sentence per scenario in plain words, built only
from figures that are in the table.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any, Final

from ._abuse import AbuseResult
from ._flood import FloodResult
from ._metrics import LoadResult

__all__ = [
    "Row",
    "abuse_doc",
    "flood_doc",
    "human_bytes",
    "ratio_spread",
    "table_rows",
]

_MIB: Final = 1024 * 1024


def human_bytes(n: float | None) -> str:
    """``1.39 GiB``, ``146 MiB``, ``12 KiB``, ``512 B``; ``-`` for None."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.2f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return round(a / b, 3)


def ratio_spread(
    candidate: Any, baseline: Any, rounds: Sequence[tuple[Any, Any]]
) -> dict[str, Any]:
    """{"ratio": combined, "min", "max": over the rounds' own ratios (None where undefined),
    "rounds": how many rounds had both sides}."""
    per = [r for r in (_ratio(c, b) for c, b in rounds) if r is not None]
    return {
        "ratio": _ratio(candidate, baseline),
        "min": min(per) if per else None,
        "max": max(per) if per else None,
        "rounds": len(per),
    }


@dataclass(frozen=True)
class Row:
    """A table row: ``get`` reads a value from a config (or run) dict; ``better`` is
    "higher", "lower" or "" (no ratio shown)."""

    label: str
    get: Callable[[dict[str, Any]], Any]
    fmt: str
    better: str = ""


def table_rows(
    rows: Sequence[Row],
    configs: dict[str, dict[str, Any]],
    runs: Sequence[dict[str, Any]],
    baseline: str,
    candidate: str,
) -> tuple[list[str], list[list[str]], dict[str, dict[str, Any]]]:
    """(header, rows of cells, ratios by label) for one scenario's table."""
    names = list(configs)
    paired = baseline in configs and candidate in configs
    header = ["", *names]
    if paired:
        header += [f"{candidate}/{baseline}", "rounds min-max", "better"]
    out: list[list[str]] = []
    ratios: dict[str, dict[str, Any]] = {}
    for row in rows:
        values = [row.get(configs[n]) for n in names]
        if all(v is None for v in values):
            continue
        cells = [row.label, *("-" if v is None else row.fmt.format(v) for v in values)]
        if paired:
            if row.better:
                per_round = []
                for rnd in sorted({r["round"] for r in runs}):
                    got = {r["config"]: r for r in runs if r["round"] == rnd}
                    if baseline in got and candidate in got:
                        per_round.append((row.get(got[candidate]), row.get(got[baseline])))
                sp = ratio_spread(
                    row.get(configs[candidate]), row.get(configs[baseline]), per_round
                )
                ratios[row.label] = {**sp, "better": row.better}
                cells.append("-" if sp["ratio"] is None else f"{sp['ratio']:.2f}x")
                cells.append("-" if sp["min"] is None else f"{sp['min']:.2f}-{sp['max']:.2f}")
                cells.append(row.better)
            else:
                cells += ["-", "-", ""]
        out.append(cells)
    return header, out, ratios


# ----------------------------------------------------------------------------- flood


def _latency(load: LoadResult) -> dict[str, float]:
    return {k: round(v, 3) for k, v in load.latency_ms().items()}


def flood_run(res: FloodResult) -> dict[str, Any]:
    """One flood run as JSON-ready data (sizes in bytes, times in seconds)."""
    served_bytes = res.served * res.body_bytes
    return {
        "clients": res.clients,
        "body_bytes": res.body_bytes,
        "idle_s": res.idle_s,
        "flood_s": round(res.flood_s, 3),
        "served": res.served,
        "outcomes": dict(sorted(res.outcomes().items())),
        "uploads_per_s": round(res.served / res.flood_s, 2) if res.flood_s else 0.0,
        "served_mib_per_s": round(served_bytes / _MIB / res.flood_s, 1) if res.flood_s else 0.0,
        "latency_ms": _latency(res.load),
        "rss_before_bytes": res.rss_before,
        "rss_peak_bytes": res.rss_peak,
        "rss_after_idle_bytes": res.rss_after_idle,
        "rss_samples": [[t, v] for t, v in res.rss],
        "pool_after_idle": _pool_gauges(res.pool_after_idle),
    }


def _pool_gauges(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    if not stats:
        return None
    return {k: stats.get(k) for k in ("reserved_bytes", "in_use", "quarantined", "max_bytes")}


def _outcome(d: dict[str, Any], key: str) -> int:
    return int(d["outcomes"].get(key, 0))


def _not_served(d: dict[str, Any]) -> int:
    return sum(n for k, n in d["outcomes"].items() if not k.startswith("HTTP 2"))


def _fate(d: dict[str, Any], key: str) -> int:
    return int(d["attackers"]["by_outcome"].get(key, 0))


def _flood_combined(results: list[FloodResult]) -> dict[str, Any]:
    load = LoadResult()
    outcomes: Counter[str] = Counter()
    flood_s = 0.0
    for r in results:
        load.append(r.load)
        outcomes.update(r.outcomes())
        flood_s += r.flood_s
    served = sum(r.served for r in results)
    body = results[0].body_bytes if results else 0
    return {
        "uploads": sum(r.clients for r in results),
        "served": served,
        "outcomes": dict(sorted(outcomes.items())),
        "flood_s": round(flood_s, 3),
        "uploads_per_s": round(served / flood_s, 2) if flood_s else 0.0,
        "served_mib_per_s": round(served * body / _MIB / flood_s, 1) if flood_s else 0.0,
        "latency_ms": _latency(load),
        "rss_before_bytes": min((r.rss_before for r in results), default=0),
        "rss_peak_bytes": max((r.rss_peak for r in results), default=0),
        "rss_after_idle_bytes": max((r.rss_after_idle for r in results), default=0),
    }


FLOOD_ROWS: Final = (
    Row("uploads served (2xx)", lambda d: d["served"], "{:,}", "higher"),
    Row("served MiB/s", lambda d: d["served_mib_per_s"], "{:,.1f}", "higher"),
    Row("flood seconds", lambda d: d["flood_s"], "{:.2f}", "lower"),
    Row("p50 ms", lambda d: d["latency_ms"]["p50"] or None, "{:,.0f}", "lower"),
    Row("p99 ms", lambda d: d["latency_ms"]["p99"] or None, "{:,.0f}", "lower"),
    Row("max ms", lambda d: d["latency_ms"]["max"] or None, "{:,.0f}", "lower"),
    Row("RSS before MiB", lambda d: d["rss_before_bytes"] / _MIB or None, "{:,.1f}", ""),
    Row("peak RSS MiB", lambda d: d["rss_peak_bytes"] / _MIB or None, "{:,.1f}", "lower"),
    Row(
        "RSS after idle MiB",
        lambda d: d["rss_after_idle_bytes"] / _MIB or None,
        "{:,.1f}",
        "lower",
    ),
)


def flood_doc(
    records: Sequence[tuple[str, int, FloodResult]], baseline: str, candidate: str
) -> dict[str, Any]:
    """The flood scenario: runs, combined configs, table and verdict."""
    runs = [{"config": c, "round": r, **flood_run(res)} for c, r, res in records]
    names = list(dict.fromkeys(c for c, _, _ in records))
    configs = {n: _flood_combined([res for c, _, res in records if c == n]) for n in names}
    failed = sorted(
        {k for cfg in configs.values() for k in cfg["outcomes"] if not k.startswith("HTTP 2")}
    )
    by_outcome = [Row(f"  {k}", functools.partial(_outcome, key=k), "{:,}", "") for k in failed]
    rows_spec = [FLOOD_ROWS[0], Row("not served", _not_served, "{:,}", ""), *by_outcome]
    header, rows, ratios = table_rows(
        [*rows_spec, *FLOOD_ROWS[1:]], configs, runs, baseline, candidate
    )
    for n in names:
        other = {k: v for k, v in configs[n]["outcomes"].items() if not k.startswith("HTTP 2")}
        configs[n]["failed"] = other
    first = records[0][2] if records else FloodResult()
    title = (
        f"flood: {first.clients} uploads x {human_bytes(first.body_bytes)} at once, then "
        f"{first.idle_s:g} s idle; {len({r for _, r, _ in records})} round(s) per config"
    )
    return {
        "title": title,
        "runs": runs,
        "configs": configs,
        "header": header,
        "rows": rows,
        "ratios": ratios,
        "verdict": _flood_verdict(configs, ratios, baseline, candidate, first.idle_s),
    }


def _outcome_words(cfg: dict[str, Any]) -> str:
    failed = cfg["failed"]
    if not failed:
        return f"all {cfg['uploads']:,} served"
    parts = ", ".join(f"{n:,} {k}" for k, n in failed.items())
    return f"{cfg['served']:,}/{cfg['uploads']:,} served ({parts})"


def _flood_verdict(
    configs: dict[str, Any], ratios: dict[str, Any], baseline: str, candidate: str, idle: float
) -> str:
    if baseline not in configs or candidate not in configs:
        if not configs:
            return "flood: nothing measured"
        cfg = next(iter(configs.values()))
        return (
            f"flood: {_outcome_words(cfg)}; peak RSS {human_bytes(cfg['rss_peak_bytes'] or None)}"
            f", {human_bytes(cfg['rss_after_idle_bytes'] or None)} after {idle:g} s idle"
        )
    b, c = configs[baseline], configs[candidate]
    peak = ratios.get("peak RSS MiB", {})
    spread = f" (rounds {peak['min']:.2f}-{peak['max']:.2f})" if peak.get("min") is not None else ""
    peak_words = f"{peak['ratio']:.2f}x peak RSS{spread}, " if peak.get("ratio") else ""
    return (
        f"flood: {candidate}: {peak_words}{_outcome_words(c)}, "
        f"peak {human_bytes(c['rss_peak_bytes'] or None)}, "
        f"{human_bytes(c['rss_after_idle_bytes'] or None)} after {idle:g} s idle; "
        f"{baseline}: {_outcome_words(b)}, peak {human_bytes(b['rss_peak_bytes'] or None)}, "
        f"{human_bytes(b['rss_after_idle_bytes'] or None)} after {idle:g} s idle"
    )


# ----------------------------------------------------------------------------- abuse


def _attack_summary(attackers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    cut = [a["cut_s"] for a in attackers if a["how"] != "open" and a["cut_s"] is not None]
    by_kind: dict[str, dict[str, int]] = {}
    for a in attackers:
        by_kind.setdefault(a["kind"], Counter())[a["how"]] += 1
    return {
        "total": len(attackers),
        "cut_off": len(cut),
        "by_outcome": dict(sorted(Counter(a["how"] for a in attackers).items())),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "cut_s": {
            "min": min(cut) if cut else None,
            "median": round(median(cut), 3) if cut else None,
            "max": max(cut) if cut else None,
        },
    }


def abuse_run(res: AbuseResult, run_dict: Callable[[LoadResult], dict[str, Any]]) -> dict[str, Any]:
    """One abuse run as JSON-ready data; ``run_dict`` renders the legitimate LoadResult."""
    attackers = [a.as_dict() for a in res.attackers]
    return {
        "duration_s": res.duration_s,
        "legit": run_dict(res.legit),
        "legit_ok": res.legit_ok,
        "legit_total": res.legit_total,
        "legit_success_rate": round(res.legit_success, 4),
        "attackers": {**_attack_summary(attackers), "list": attackers},
        "pool_samples": [[t, p, r] for t, p, r in res.pool],
        "pool_pinned_peak_bytes": res.pinned_peak,
        "rss_peak_bytes": res.rss_peak,
        "rss_samples": [[t, v] for t, v in res.rss],
    }


def _abuse_combined(
    results: list[AbuseResult], run_dict: Callable[[LoadResult], dict[str, Any]]
) -> dict[str, Any]:
    load = LoadResult()
    for r in results:
        load.append(r.legit)
    ok = sum(r.legit_ok for r in results)
    total = sum(r.legit_total for r in results)
    attackers = [a.as_dict() for r in results for a in r.attackers]
    pinned = [r.pinned_peak for r in results if r.pinned_peak is not None]
    return {
        "legit": run_dict(load),
        "legit_ok": ok,
        "legit_total": total,
        "legit_success_rate": round(ok / total, 4) if total else 0.0,
        "attackers": _attack_summary(attackers),
        "pool_pinned_peak_bytes": max(pinned) if pinned else None,
        "rss_peak_bytes": max((r.rss_peak for r in results), default=0),
    }


def _cut_rate(d: dict[str, Any]) -> float | None:
    total = d["attackers"]["total"]
    return d["attackers"]["cut_off"] / total if total else None


ABUSE_ROWS: Final = (
    Row("legit success", lambda d: d["legit_success_rate"], "{:.1%}", "higher"),
    Row("legit responses 2xx", lambda d: d["legit_ok"], "{:,}", "higher"),
    Row("legit failed", lambda d: d["legit_total"] - d["legit_ok"], "{:,}", ""),
    Row("legit requests/s", lambda d: d["legit"]["rps"], "{:,.0f}", "higher"),
    Row("legit p50 ms", lambda d: d["legit"]["latency_ms"]["p50"] or None, "{:.2f}", "lower"),
    Row("legit p99 ms", lambda d: d["legit"]["latency_ms"]["p99"] or None, "{:.2f}", "lower"),
    Row("legit p99.9 ms", lambda d: d["legit"]["latency_ms"]["p99_9"] or None, "{:.2f}", "lower"),
    Row("attackers", lambda d: d["attackers"]["total"], "{:,}", ""),
    Row("attackers cut off", _cut_rate, "{:.0%}", "higher"),
    Row(
        "cut-off median s",
        lambda d: d["attackers"]["cut_s"]["median"],
        "{:.2f}",
        "lower",
    ),
    Row(
        "pool pinned peak MiB",
        lambda d: (
            None if d["pool_pinned_peak_bytes"] is None else d["pool_pinned_peak_bytes"] / _MIB
        ),
        "{:,.1f}",
        "",
    ),
    Row("peak RSS MiB", lambda d: d["rss_peak_bytes"] / _MIB or None, "{:,.1f}", "lower"),
)


def abuse_doc(
    records: Sequence[tuple[str, int, AbuseResult]],
    baseline: str,
    candidate: str,
    run_dict: Callable[[LoadResult], dict[str, Any]],
    per_kind: int,
    connections: int,
) -> dict[str, Any]:
    """The abuse scenario: runs, combined configs, table and verdict."""
    runs = [{"config": c, "round": r, **abuse_run(res, run_dict)} for c, r, res in records]
    names = list(dict.fromkeys(c for c, _, _ in records))
    configs = {
        n: _abuse_combined([res for c, _, res in records if c == n], run_dict) for n in names
    }
    fates = sorted({k for cfg in configs.values() for k in cfg["attackers"]["by_outcome"]})
    by_fate = [Row(f"  attackers {k}", functools.partial(_fate, key=k), "{:,}", "") for k in fates]
    at = next(i for i, r in enumerate(ABUSE_ROWS) if r.label == "attackers") + 1
    header, rows, ratios = table_rows(
        [*ABUSE_ROWS[:at], *by_fate, *ABUSE_ROWS[at:]], configs, runs, baseline, candidate
    )
    duration = records[0][2].duration_s if records else 0.0
    title = (
        f"abuse: {connections} legitimate connections for {duration:g} s among {per_kind} "
        f"stalling + {per_kind} trickling (1 B/100 ms) + {per_kind} non-reading attackers; "
        f"{len({r for _, r, _ in records})} round(s) per config"
    )
    return {
        "title": title,
        "runs": runs,
        "configs": configs,
        "header": header,
        "rows": rows,
        "ratios": ratios,
        "verdict": _abuse_verdict(configs, ratios, baseline, candidate),
    }


def _abuse_words(name: str, d: dict[str, Any], rate: str = "") -> str:
    att = d["attackers"]
    lat = d["legit"]["latency_ms"]
    when = f" (median {att['cut_s']['median']:.1f} s)" if att["cut_s"]["median"] is not None else ""
    pinned = (
        f", pool pinned up to {human_bytes(d['pool_pinned_peak_bytes'])}"
        if d["pool_pinned_peak_bytes"] is not None
        else ""
    )
    return (
        f"{name}: {d['legit_success_rate']:.0%} of {d['legit_total']:,} legitimate requests "
        f"served ({rate}p99 {lat['p99']:.1f} ms, p99.9 {lat['p99_9']:.1f} ms), "
        f"{att['cut_off']}/{att['total']} attackers cut off{when}{pinned}"
    )


def _abuse_verdict(
    configs: dict[str, Any], ratios: dict[str, Any], baseline: str, candidate: str
) -> str:
    if not configs:
        return "abuse: nothing measured"
    if baseline not in configs or candidate not in configs:
        return "abuse: " + "; ".join(_abuse_words(n, d) for n, d in configs.items())
    rps = ratios.get("legit requests/s", {})
    rate = ""
    if rps.get("ratio") is not None:
        spread = f" in rounds {rps['min']:.2f}-{rps['max']:.2f}" if rps.get("min") else ""
        rate = f"{rps['ratio']:.2f}x {baseline}'s rate{spread}, "
    return (
        f"abuse: {_abuse_words(candidate, configs[candidate], rate)}; "
        f"{_abuse_words(baseline, configs[baseline])}"
    )


def steady_verdict(
    configs: dict[str, Any], ratios: dict[str, Any], baseline: str, candidate: str
) -> str:
    """Plain words for the steady table: is the difference bigger than the rounds' spread?"""
    if baseline not in configs or candidate not in configs:
        ((name, cfg),) = list(configs.items())[:1]
        errors = sum(cfg["errors"].values()) + sum(
            n for s, n in cfg["status"].items() if int(s) >= 400
        )
        return (
            f"steady: {name} {cfg['rps']:,.0f} req/s, p99 {cfg['latency_ms']['p99']:.2f} ms, "
            f"{errors:,} errors"
        )
    rps = ratios.get("requests/s", {})
    p99 = ratios.get("p99 ms", {})
    rss = ratios.get("server peak RSS MiB", {})
    parts = []
    for words, sp in (("req/s", rps), ("p99", p99), ("peak RSS", rss)):
        if sp.get("ratio") is None:
            continue
        lo, hi = sp.get("min"), sp.get("max")
        spread = f" (rounds {lo:.2f}-{hi:.2f})" if lo is not None else ""
        parts.append(f"{sp['ratio']:.2f}x {words}{spread}")
    lo, hi = rps.get("min"), rps.get("max")
    if lo is None or hi is None or rps.get("rounds", 0) < 2:
        call = "one round only: run --rounds 2 or more to tell a difference from noise"
    elif lo <= 1.0 <= hi or (lo >= 0.95 and hi <= 1.05):
        call = "no throughput difference beyond the run-to-run spread"
    elif lo > 1.0:
        call = f"{candidate} faster in every round"
    else:
        call = f"{candidate} slower in every round"
    return f"steady: {candidate} {', '.join(parts)}: {call}"
