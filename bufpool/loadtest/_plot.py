"""The chart (written by default; ``--plot FILE.png`` chooses where, ``--no-plot`` skips it).

One row per scenario that ran, two panels each:

* steady -- latency by percentile (both servers) | server RSS over the measured runs.
* flood  -- upload latency by percentile | server RSS over time through each flood and its idle
  tail (every round, t = 0 at the start signal; y-axis from 0, so growth reads true).
* abuse  -- legitimate latency by percentile | legitimate success rate per round (bars), with
  the attackers cut off written on each bar.

Percentile axes use HdrHistogram's convention: x = 1 / (1 - percentile), so each "nine" (90%,
99%, 99.9%) takes the same width.  Rendered with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._metrics import LoadResult
from ._run import BASELINE, CANDIDATE, Session

__all__ = ["write_plot"]

_MIB = 1024 * 1024
_COLORS = {BASELINE: "tab:blue", CANDIDATE: "tab:orange"}
_TICKS = (
    (1.0, "0%"),
    (2.0, "50%"),
    (10.0, "90%"),
    (100.0, "99%"),
    (1000.0, "99.9%"),
    (10000.0, "99.99%"),
    (100000.0, "99.999%"),
)


def _color(name: str) -> str:
    return _COLORS.get(name, "tab:green")


def _percentiles(ax: Any, curves: dict[str, LoadResult], title: str) -> None:
    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        LogLocator,
        NullFormatter,
        NullLocator,
    )

    top = 1.0
    for name, load in curves.items():
        points = [(p, v) for p, v in load.percentile_curve() if p < 100.0]
        if not points:
            continue
        xs = [1.0 / (1.0 - p / 100.0) for p, _ in points]
        p99 = load.latency_ms()["p99"]
        ax.plot(xs, [v for _, v in points], color=_color(name), label=f"{name} (p99 {p99:,.1f} ms)")
        top = max(top, xs[-1])
    right = max(top, 10.0)
    # 0% and 50% sit 0.3 decades apart: with more than 3 decades on the axis they collide.
    keep = [
        (t, label)
        for t, label in _TICKS
        if t <= right * 1.001 and not (t == 2.0 and right > 1000.0)
    ]
    ax.set_xscale("log")
    ax.set_xlim(1.0, right * 1.05)
    ax.xaxis.set_major_locator(FixedLocator([t for t, _ in keep]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([label for _, label in keep])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no responses")


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _steady_row(session: Session, ax_lat: Any, ax_rss: Any) -> None:
    combined = session.by_config()
    mode = "from scheduled send time" if session.settings.mode == "open" else "closed loop"
    _percentiles(
        ax_lat, {n: load for n, (load, _u, _p) in combined.items()}, f"steady: latency ({mode})"
    )
    for name, (_load, usage, _pool) in combined.items():
        if usage is not None and usage.rss_samples:
            ax_rss.plot(
                [t for t, _ in usage.rss_samples],
                [v / _MIB for _, v in usage.rss_samples],
                color=_color(name),
                label=f"{name} (peak {usage.rss_peak / _MIB:.0f} MiB)",
            )
    ax_rss.set_xlabel("seconds of measured load (rounds joined)")
    ax_rss.set_ylabel("server RSS (MiB)")
    ax_rss.set_title("steady: server memory", fontsize=10)
    ax_rss.set_ylim(bottom=0)
    ax_rss.grid(True, alpha=0.3)
    if ax_rss.lines:
        ax_rss.legend(fontsize=8, loc="lower right")
    else:
        _empty(ax_rss, "no server process to sample")


def _flood_row(session: Session, ax_lat: Any, ax_rss: Any) -> None:
    curves: dict[str, LoadResult] = {}
    for rec in session.flood:
        curves.setdefault(rec.config, LoadResult()).append(rec.result.load)
    first = session.flood[0].result
    _percentiles(
        ax_lat,
        curves,
        f"flood: upload latency ({first.clients} x {first.body_bytes / _MIB:g} MiB at once)",
    )
    labelled: set[str] = set()
    flood_end = 0.0
    for rec in session.flood:
        res = rec.result
        if not res.rss:
            continue
        peak = max(r.result.rss_peak for r in session.flood if r.config == rec.config)
        label = None if rec.config in labelled else f"{rec.config} (peak {peak / _MIB:,.0f} MiB)"
        labelled.add(rec.config)
        ax_rss.plot(
            [t for t, _ in res.rss],
            [v / _MIB for _, v in res.rss],
            color=_color(rec.config),
            alpha=1.0 if rec.round == 1 else 0.55,
            linestyle="-" if rec.round == 1 else "--",
            label=label,
        )
        flood_end = max(flood_end, res.flood_s)
    if ax_rss.lines:
        ax_rss.axvspan(0, flood_end, color="grey", alpha=0.12, lw=0)
        ax_rss.text(
            0.01, 0.97, "flood", transform=ax_rss.transAxes, va="top", fontsize=8, color="dimgrey"
        )
        ax_rss.legend(fontsize=8, loc="upper right")
    else:
        _empty(ax_rss, "no server process to sample")
    ax_rss.set_ylim(bottom=0)
    ax_rss.set_xlabel(
        f"seconds since the flood began (idle tail {first.idle_s:g} s; dashed: round 2+)"
    )
    ax_rss.set_ylabel("server RSS (MiB)")
    ax_rss.set_title("flood: server memory through the flood and the idle tail", fontsize=10)
    ax_rss.grid(True, alpha=0.3)


def _abuse_row(session: Session, ax_lat: Any, ax_ok: Any) -> None:
    curves: dict[str, LoadResult] = {}
    for rec in session.abuse:
        curves.setdefault(rec.config, LoadResult()).append(rec.result.legit)
    _percentiles(ax_lat, curves, "abuse: legitimate latency")
    names = list(dict.fromkeys(rec.config for rec in session.abuse))
    rounds = sorted({rec.round for rec in session.abuse})
    width = 0.8 / max(1, len(rounds))
    for i, name in enumerate(names):
        for j, rnd in enumerate(rounds):
            recs = [r for r in session.abuse if r.config == name and r.round == rnd]
            if not recs:
                continue
            res = recs[0].result
            x = i - 0.4 + width * (j + 0.5)
            ax_ok.bar(x, res.legit_success * 100, width * 0.9, color=_color(name))
            cut = sum(1 for a in res.attackers if a.how != "open")
            ax_ok.text(
                x,
                2,
                f"round {rnd}\n{res.legit_success:.0%} ok\n{res.legit.rps:,.0f} req/s\n"
                f"cut off {cut}/{len(res.attackers)}",
                ha="center",
                va="bottom",
                fontsize=7,
                color="black",
            )
    ax_ok.set_xticks(range(len(names)))
    ax_ok.set_xticklabels(names)
    ax_ok.set_ylim(0, 105)
    ax_ok.set_ylabel("legitimate requests served 2xx (%)")
    ax_ok.set_title(
        "abuse: legitimate success per round (legitimate req/s, attackers cut off)", fontsize=10
    )
    ax_ok.grid(True, axis="y", alpha=0.3)


def write_plot(session: Session, path: Path) -> None:
    """Render the chart for ``session`` into ``path`` (format from the suffix, e.g. .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        name
        for name in session.settings.scenarios
        if (name == "steady" and session.runs)
        or (name == "flood" and session.flood)
        or (name == "abuse" and session.abuse)
    ]
    fig, axes = plt.subplots(
        max(1, len(rows)), 2, figsize=(13, 4.2 * max(1, len(rows))), squeeze=False
    )
    for (ax_left, ax_right), name in zip(axes, rows, strict=False):
        if name == "steady":
            _steady_row(session, ax_left, ax_right)
        elif name == "flood":
            _flood_row(session, ax_left, ax_right)
        else:
            _abuse_row(session, ax_left, ax_right)
    if not rows:
        _empty(axes[0][0], "nothing measured")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
