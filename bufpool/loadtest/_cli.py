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

__all__ = ["build_parser", "main"]

_EPILOG = """\
examples:
  python -m bufpool loadtest                       # pool off vs on, embedded server, < 1 min
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


def add_loadtest_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument(
        "--duration",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="measured seconds per run (default 5)",
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
        metavar="FILE.png",
        help="latency percentile curves and server RSS over time",
    )
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
        "with the pool off and on, load both with the same requests in interleaved rounds, "
        "and print a side-by-side table with ratios.",
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
    from ._run import run_session

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
    out = Console()
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
    if args.plot is not None:
        from ._plot import write_plot

        write_plot(session, args.plot)
        err.print(f"wrote {args.plot}")
    return 0
