"""The ``--plot FILE.png`` chart: latency percentile curves and server RSS over time.

Left: latency (ms, log scale) against percentile on HdrHistogram's usual axis, where each
"nine" (90%, 99%, 99.9%, ...) takes the same width -- x = 1 / (1 - percentile).  One curve per
configuration, from the merged histogram of its rounds.  Right: the server's RSS (MiB) over
the measured runs of each configuration, run after run (rounds joined on one time axis; the
gaps between rounds are not shown).  Rendered with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

from pathlib import Path

from ._run import Session

__all__ = ["write_plot"]


def write_plot(session: Session, path: Path) -> None:
    """Render the chart for ``session`` into ``path`` (format from the suffix, e.g. .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, (ax_lat, ax_rss) = plt.subplots(1, 2, figsize=(12, 4.8))
    top = 1.0
    for name, (load, usage, _pool) in session.by_config().items():
        points = [(p, v) for p, v in load.percentile_curve() if p < 100.0]
        if points:
            xs = [1.0 / (1.0 - p / 100.0) for p, _ in points]
            ax_lat.plot(xs, [v for _, v in points], label=f"{name} ({load.rps:,.0f} req/s)")
            top = max(top, xs[-1])
        if usage is not None and usage.rss_samples:
            ax_rss.plot(
                [t for t, _ in usage.rss_samples],
                [v / (1024 * 1024) for _, v in usage.rss_samples],
                label=f"{name} (peak {usage.rss_peak / (1024 * 1024):.1f} MiB)",
            )
    ticks = [1.0, 2.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
    labels = ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
    keep = [i for i, t in enumerate(ticks) if t <= max(top, 100.0)]
    ax_lat.set_xscale("log")
    ax_lat.xaxis.set_major_locator(FixedLocator([ticks[i] for i in keep]))
    ax_lat.xaxis.set_minor_locator(NullLocator())
    ax_lat.set_xticklabels([labels[i] for i in keep])
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("percentile")
    ax_lat.set_ylabel("latency (ms)")
    mode = session.settings.mode
    ax_lat.set_title(
        "latency by percentile"
        + (" (from scheduled send time)" if mode == "open" else " (closed loop)")
    )
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend()
    ax_rss.set_xlabel("seconds of measured load")
    ax_rss.set_ylabel("server RSS (MiB)")
    ax_rss.set_title("server memory")
    ax_rss.grid(True, alpha=0.3)
    if ax_rss.lines:
        ax_rss.legend()
    else:
        ax_rss.text(
            0.5,
            0.5,
            "no server process to sample",
            ha="center",
            va="center",
            transform=ax_rss.transAxes,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
