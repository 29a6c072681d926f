"""``python -m bufpool loadtest``: command-line parsing and the top-level flow.

Exit status: 0 done, 1 a server or load process failed (everything started is stopped
first), 2 bad arguments, 130 interrupted by Ctrl-C (everything started is stopped first).
Progress and status go to stderr; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ._schedule import Mix
from ._server import ServerError
from ._workers import WorkerError, make_loop

__all__ = ["DEFAULT_PLOT", "build_parser", "main"]

#: The chart written when neither --plot nor --no-plot is given (current directory).
DEFAULT_PLOT = "bufpool-loadtest.png"

_EPILOG = """\
examples:
  python -m bufpool loadtest                       # steady, flood, abuse: pool off vs on
  python -m bufpool loadtest --scenario flood --flood-idle 15
  python -m bufpool loadtest --rate 2000 --plot out.png
  python -m bufpool loadtest --duration 20 --rounds 3 --json out.json --markdown out.md
  python -m bufpool loadtest --url http://127.0.0.1:8080/upload --mix 4k --connections 32
  python -m bufpool loadtest --tls                 # through the SNI passthrough proxy
"""


def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or "\0" in text or not name.replace("_", "a").isalnum():
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with NAME made of letters, digits and '_', got {text!r}"
        )
    return name, value


def _sizes(text: str) -> Mix:
    try:
        return Mix.parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _methods(text: str) -> Mix:
    try:
        return Mix.parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    from ._schedule import parse_size

    try:
        n = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 bytes, got {text}")
    return n


def _non_negative_float(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def add_loadtest_arguments(p: argparse.ArgumentParser) -> None:
    from ._run import SCENARIOS

    sc = p.add_argument_group("scenarios")
    sc.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        default=None,
        metavar="NAME",
        help="run only this scenario (repeatable): steady (the closed-loop mix), flood (many "
        "large uploads at once, then idle), abuse (legitimate traffic among stalling, "
        "trickling and non-reading attackers). Default: all three; with --url: steady",
    )
    sc.add_argument(
        "--flood-clients",
        type=_positive_int,
        default=96,
        metavar="N",
        help="flood: uploads sent at once (default 96)",
    )
    sc.add_argument(
        "--flood-body",
        type=_size,
        default=8 * 1024 * 1024,
        metavar="BYTES",
        help="flood: body of each upload, e.g. 8m (default 8 MiB)",
    )
    sc.add_argument(
        "--flood-idle",
        type=_non_negative_float,
        default=8.0,
        metavar="SECONDS",
        help="flood: idle tail after the last reply, RSS still sampled (default 8: past the "
        "pooled server's 5 s idle trim)",
    )
    sc.add_argument(
        "--abuse-duration",
        type=_positive_float,
        default=3.0,
        metavar="SECONDS",
        help="abuse: measured seconds of legitimate load per run (default 3)",
    )
    sc.add_argument(
        "--attackers",
        type=int,
        default=16,
        metavar="N",
        help="abuse: attacker connections of each kind: stall, trickle, no-read (default 16)",
    )
    sc.add_argument(
        "--abuse-connections",
        type=_positive_int,
        default=16,
        metavar="N",
        help="abuse: legitimate keep-alive connections, closed loop (default 16)",
    )
    sc.add_argument(
        "--attack-body",
        type=_size,
        default=8 * 1024 * 1024,
        metavar="BYTES",
        help="abuse: body size the stalling and trickling heads declare (default 8 MiB); "
        "also the reply size the non-readers ask for",
    )
    g = p.add_argument_group("load")
    g.add_argument(
        "--duration",
        type=_positive_float,
        default=4.0,
        metavar="SECONDS",
        help="steady: measured seconds per run (default 4)",
    )
    g.add_argument(
        "--rounds",
        type=_positive_int,
        default=2,
        help="A/B rounds, interleaved A B A B ... (default 2)",
    )
    g.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="unmeasured load per configuration before round 1 (default 1)",
    )
    g.add_argument(
        "--rate",
        type=_positive_float,
        metavar="REQ_PER_S",
        help="open loop at this constant rate; latency from each request's "
        "scheduled send time (coordinated-omission corrected). Default: "
        "closed loop",
    )
    g.add_argument(
        "--connections", type=_positive_int, default=64, help="keep-alive connections (default 64)"
    )
    g.add_argument(
        "--mix",
        type=_sizes,
        default=None,
        metavar="SIZE:W,...",
        help="request body sizes and weights (default 1k:1,16k:1,256k:1)",
    )
    g.add_argument(
        "--reply",
        type=_sizes,
        default=None,
        metavar="BYTES[:W,...]",
        help="response sizes asked of the server (default 4k)",
    )
    g.add_argument(
        "--method",
        type=_methods,
        default=None,
        metavar="METHOD[:W,...]",
        help="HTTP methods and weights (default POST); GET/HEAD send no body",
    )
    g.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="per-request timeout (default 10)",
    )
    g.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="load processes; histograms are merged (default 1: in process)",
    )
    g.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="load generator: the bufpool/uvloop one (default) or aiohttp's client",
    )
    g.add_argument("--seed", type=int, default=1, help="seed of the request order")
    t = p.add_argument_group("target")
    t.add_argument("--url", metavar="URL", help="load this server instead of the embedded A/B pair")
    t.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="with --url: sample this process tree's RSS, faults and CPU",
    )
    t.add_argument(
        "--stats-url", metavar="URL", help="with --url: a bufpool stats endpoint to scrape"
    )
    t.add_argument(
        "--server-workers",
        type=int,
        default=0,
        metavar="N",
        help="run the embedded app under gunicorn with N aiohttp uvloop workers",
    )
    t.add_argument("--server-loop", choices=("uvloop", "asyncio"), default="uvloop")
    t.add_argument(
        "--server-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable in both embedded servers (repeatable), e.g. "
        "MALLOC_TOP_PAD_=67108864",
    )
    t.add_argument(
        "--tls",
        action="store_true",
        help="embedded servers over TLS behind the SNI passthrough proxy",
    )
    t.add_argument(
        "--app",
        type=Path,
        metavar="PATH",
        help="the example app to start (default: examples/aiohttp_app.py)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, metavar="FILE", help="write every run and a summary")
    o.add_argument("--markdown", type=Path, metavar="FILE", help="write the table as markdown")
    o.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="the chart: per scenario latency percentiles, server RSS over time, legitimate "
        f"success under abuse (default ./{DEFAULT_PLOT})",
    )
    o.add_argument("--no-plot", action="store_true", help="write no chart")
    o.add_argument("--quiet", action="store_true", help="no progress bar or status lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bufpool",
        description="bufpool command-line tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    lt = sub.add_parser(
        "loadtest",
        help="load an HTTP server; by default compare the example app with the pool off/on",
        description="Load-test an HTTP server. Without --url: start the example aiohttp app "
        "with the pool off and on and run three scenarios (steady, flood, abuse) against "
        "both in interleaved rounds; print a table per scenario with pool/no-pool ratios, "
        "their min-max over rounds and which direction is better, one verdict line per "
        "scenario, and write a chart (about 60 s on 2 cores).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loadtest_arguments(lt)
    return parser


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from ._run import Settings

    if args.url is None and (args.server_pid or args.stats_url):
        parser.error("--server-pid and --stats-url go with --url")
    if args.url is not None and (args.tls or args.server_workers or args.server_env):
        parser.error(
            "--tls, --server-workers and --server-env apply to the embedded servers, not --url"
        )
    s = Settings(
        duration=args.duration,
        rounds=args.rounds,
        warmup=max(0.0, args.warmup),
        rate=args.rate,
        connections=args.connections,
        url=args.url,
        server_pid=args.server_pid,
        stats_url=args.stats_url,
        workers=args.workers,
        server_workers=max(0, args.server_workers),
        server_loop=args.server_loop,
        tls=args.tls,
        client=args.client,
        timeout=args.timeout,
        seed=args.seed,
        app=args.app,
        server_env=dict(args.server_env),
        quiet=args.quiet,
    )
    if args.mix is not None:
        s.mix = args.mix
    if args.reply is not None:
        s.reply = args.reply
        s.reply_given = True
    if args.method is not None:
        s.method = args.method
    if s.tls and s.client != "raw":
        parser.error("--tls needs the raw client (it dials the proxy with SNI)")
    if args.plot is not None and args.no_plot:
        parser.error("--plot FILE and --no-plot contradict each other")
    if args.attackers < 0:
        parser.error(f"--attackers must be >= 0, got {args.attackers}")
    if args.scenario:
        s.scenarios = tuple(dict.fromkeys(args.scenario))
    elif args.url is not None or args.tls:
        s.scenarios = ("steady",)
    if s.tls and set(s.scenarios) - {"steady"}:
        parser.error("flood and abuse do not run through the TLS proxy; use --scenario steady")
    s.flood_clients = args.flood_clients
    s.flood_body = args.flood_body
    s.flood_idle = args.flood_idle
    s.abuse_duration = args.abuse_duration
    s.attackers = args.attackers
    s.abuse_connections = args.abuse_connections
    s.attack_declared = s.attack_reply = args.attack_body
    return s


class _LiveProgress:
    """Rich progress bar per run, advanced by time, showing responses so far."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(
        self, label: str, seconds: float, counter: Callable[[], int]
    ) -> Callable[[], None]:
        task_id = self.progress.add_task(label, total=max(seconds, 0.01), count="")
        t0 = time.monotonic()

        async def tick() -> None:
            while True:
                n = counter()
                self.progress.update(
                    task_id,
                    completed=min(seconds, time.monotonic() - t0),
                    count=f"{n:,} responses" if n >= 0 else "",
                )
                await asyncio.sleep(0.2)

        runner = asyncio.ensure_future(tick())
        self.tasks.add(runner)

        def done() -> None:
            runner.cancel()
            self.tasks.discard(runner)
            self.progress.remove_task(task_id)

        return done


async def _main_async(settings: Any, err: Console) -> Any:
    from ._scenarios import run_session

    if settings.quiet:
        return await run_session(settings)
    live = _LiveProgress(err)
    with live.progress:
        return await run_session(
            settings, progress=live, on_status=lambda m: err.print(f"[dim]{m}[/]")
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bufpool`` and the ``bufpool`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    settings = settings_from(args, parser)
    # Tables are about 100 columns wide: do not wrap them to 80 when stdout is not a terminal.
    out = Console(width=None if Console().is_terminal else 120)
    err = Console(stderr=True)
    try:
        with asyncio.Runner(loop_factory=make_loop) as runner:
            session = runner.run(_main_async(settings, err))
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: servers and load processes stopped")
        return 130
    except (ServerError, WorkerError, OSError, ValueError) as exc:
        err.print(f"[red]error[/]: {exc}")
        return 1
    from ._report import render_table, session_json, write_json, write_markdown

    doc = session_json(session)
    render_table(doc, out)
    if args.json is not None:
        write_json(doc, args.json)
        err.print(f"wrote {args.json}")
    if args.markdown is not None:
        write_markdown(doc, args.markdown)
        err.print(f"wrote {args.markdown}")
    if not args.no_plot:
        from ._plot import write_plot

        chart = args.plot or Path(DEFAULT_PLOT)
        try:
            write_plot(session, chart)
        except OSError as exc:
            err.print(f"[red]error[/]: cannot write the chart to {chart}: {exc}")
            return 1
        out.print(f"chart: {chart.resolve()}")
    return 0
