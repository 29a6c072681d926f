"""The load-test harness, end to end: real servers in subprocesses, real sockets on 127.0.0.1.

Each CLI test runs ``python -m bufpool loadtest`` as a subprocess for a second or two and
checks what it reports against what the server saw.  The generator itself is also driven
in-process (both loops) against small asyncio servers written here, to pin down latency
accounting (coordinated omission), connection counts and error classification.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import bufpool
from bufpool.loadtest import (
    ClosedLoop,
    LoadGenerator,
    LoadResult,
    Mix,
    OpenLoop,
    build_templates,
    parse_size,
)
from bufpool.loadtest._report import SCHEMA

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# A throwaway HTTP/1.1 server (asyncio streams) with behaviours the example app does not have.
#   /ok?reply=N    200 with N bytes
#   /flaky         request k (1-based, global): k % 4 == 1 -> 500, k % 4 == 3 -> connection
#                  dropped without a response, else 200
#   /slow?ms=N     200 after N ms
#   /chunked       200, 3 chunks, chunked transfer-encoding
#   /close         200 with no Content-Length, body ends when the server closes
#   /_stats        JSON {"requests": answered requests, "max_concurrent": connections}
THROWAWAY_SERVER = r"""
import asyncio, json, sys
from urllib.parse import urlsplit, parse_qs
state = {"requests": 0, "flaky": 0, "open": 0, "max_concurrent": 0}
async def handle(reader, writer):
    state["open"] += 1
    state["max_concurrent"] = max(state["max_concurrent"], state["open"])
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            length = 0
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if length:
                await reader.readexactly(length)
            url = urlsplit(target)
            q = parse_qs(url.query)
            status, body, extra = 200, b"", b""
            if url.path == "/_stats":
                body = json.dumps(state).encode()
            elif url.path == "/ok":
                body = b"o" * int(q.get("reply", ["0"])[0])
            elif url.path == "/flaky":
                state["flaky"] += 1
                k = state["flaky"]
                if k % 4 == 3:
                    writer.transport.abort()
                    return
                if k % 4 == 1:
                    status, body = 500, b"boom"
                else:
                    body = b"fine"
            elif url.path == "/slow":
                await asyncio.sleep(int(q.get("ms", ["10"])[0]) / 1000)
                body = b"late"
            elif url.path == "/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-T: 1\r\n\r\n")
                state["requests"] += 1
                await writer.drain()
                continue
            elif url.path == "/close":
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"c" * 3000)
                state["requests"] += 1
                await writer.drain()
                writer.close()
                return
            reason = b"OK" if status == 200 else b"Internal Server Error"
            if url.path != "/_stats":
                state["requests"] += 1
            head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n" % (status, reason, len(body))
            writer.write(head + body)
            await writer.drain()
    finally:
        state["open"] -= 1
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


# ----------------------------------------------------------------------------- helpers


class Spawned:
    """A server subprocess started by a test; ``url`` once it printed its listening line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), (
            line,
            self.proc.stderr.read() if self.proc.stderr else "",
        )
        self.url = line.split()[-1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawned]:
    script = tmp_path_factory.mktemp("srv") / "throwaway_server.py"
    script.write_text(THROWAWAY_SERVER)
    server = Spawned([PY, str(script)])
    yield server
    server.stop()


def server_stats(server: Spawned) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(server.url + "/_stats", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; without ``--plot`` in ``args`` it writes no chart."""
    plot = [] if "--plot" in args else ["--no-plot"]
    return subprocess.run(
        [PY, "-m", "bufpool", "loadtest", "--quiet", *plot, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "run.json"
    proc = run_cli(*args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_gone(procs: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    """Processes still running after ``timeout`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.1)
    return alive


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ----------------------------------------------------------------------------- schema


def check_run(run: dict[str, Any]) -> None:
    """A RUN object as documented in bufpool/loadtest/_report.py."""
    assert run["mode"] in ("open", "closed")
    for key in ("requests", "late", "bytes_sent", "bytes_received"):
        assert isinstance(run[key], int) and run[key] >= 0, key
    for key in ("duration_s", "rps"):
        assert isinstance(run[key], float | int), key
    assert set(run["latency_ms"]) == {"p50", "p90", "p99", "p99_9", "max", "mean"}
    lat = run["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert set(run["send_lag_ms"]) == {"p99", "max"}
    assert all(isinstance(v, int) for v in run["errors"].values())
    assert all(k.isdigit() and isinstance(v, int) for k, v in run["status"].items())
    if run["server"] is not None:
        s = run["server"]
        for key in ("rss_peak_bytes", "minor_faults", "major_faults"):
            assert isinstance(s[key], int), key
        assert isinstance(s["cpu_seconds"], float | int)
        assert isinstance(s["cpu_us_per_request"], float | int)
        assert all(len(pair) == 2 for pair in s["rss_samples"])
        assert s["rss_peak_bytes"] == max(v for _, v in s["rss_samples"])
    if run["pool"] is not None:
        for key in ("hit_rate", "in_use", "quarantined", "waste_ratio", "reserved_bytes"):
            assert key in run["pool"], key


def check_document(doc: dict[str, Any]) -> None:
    assert doc["schema"] == SCHEMA
    assert isinstance(doc["created"], str) and isinstance(doc["host"]["python"], str)
    assert isinstance(doc["settings"], dict)
    for run in doc["runs"]:
        assert isinstance(run["config"], str) and isinstance(run["round"], int)
        check_run(run)
    for cfg in doc["summary"]["configs"].values():
        check_run(cfg)


# ----------------------------------------------------------------------------- units


def test_parse_size_and_mix() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("16k") == 16384
    assert parse_size("1.5M") == 1536 * 1024
    assert parse_size("256KiB") == 262144
    with pytest.raises(ValueError, match="bad size"):
        parse_size("12q")
    mix = Mix.parse_sizes("1k:1,16k:2")
    assert mix.choices == ((1024, 1), (16384, 2))
    import random

    seq = mix.sequence(random.Random(0), length=300)
    assert seq.count(1) == 2 * seq.count(0)
    with pytest.raises(ValueError, match="weight"):
        Mix.parse_sizes("1k:0")
    assert Mix.parse_methods("post:3,get").choices == (("POST", 3), ("GET", 1))


def test_open_loop_slots_do_not_depend_on_completions() -> None:
    sched = OpenLoop(1000.0, start_ns=0, end_ns=10_000_000)
    # Asked late (at 5 ms) the schedule still hands out the slots that were due earlier.
    dues = [sched.next_due(5_000_000) for _ in range(12)]
    assert dues[:10] == [i * 1_000_000 for i in range(10)]
    assert dues[10:] == [None, None]
    closed = ClosedLoop(end_ns=100)
    assert closed.next_due(42) == 42 and closed.next_due(100) is None


def test_no_arguments_prints_help() -> None:
    proc = subprocess.run([PY, "-m", "bufpool"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "loadtest" in proc.stdout


def test_bad_arguments_exit_2_naming_the_fault() -> None:
    proc = run_cli("--mix", "1k:x")
    assert proc.returncode == 2
    assert "bad weight" in proc.stderr


def test_bad_server_env_exits_2_naming_the_fault() -> None:
    proc = run_cli("--server-env", "NOEQUALS")
    assert proc.returncode == 2
    assert "expected NAME=VALUE" in proc.stderr and "'NOEQUALS'" in proc.stderr
    proc = run_cli("--url", "http://127.0.0.1:9/", "--server-env", "A=1")
    assert proc.returncode == 2
    assert "--server-env apply to the embedded servers" in proc.stderr


def test_server_env_reaches_both_embedded_servers(tmp_path: Path) -> None:
    mark = tmp_path / "started"
    wrapper = tmp_path / "app.py"
    example = ROOT / "examples" / "aiohttp_app.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "with open(os.environ['BUFPOOL_TEST_MARK'], 'a') as f:\n"
        "    f.write(('no-pool' if '--no-pool' in sys.argv else 'pool')"
        " + ' ' + os.environ['BUFPOOL_TEST_VALUE'] + '\\n')\n"
        f"sys.argv[0] = {str(example)!r}\n"
        f"runpy.run_path({str(example)!r}, run_name='__main__')\n"
    )
    doc = run_json(
        tmp_path,
        "--scenario",
        "steady",
        "--app",
        str(wrapper),
        "--server-env",
        f"BUFPOOL_TEST_MARK={mark}",
        "--server-env",
        "BUFPOOL_TEST_VALUE=a=b",
        "--duration",
        "0.5",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--connections",
        "2",
        "--mix",
        "1k",
    )
    assert sorted(mark.read_text().split("\n")[:-1]) == ["no-pool a=b", "pool a=b"]
    assert doc["settings"]["server_env"]["BUFPOOL_TEST_VALUE"] == "a=b"
    assert all(run["requests"] > 0 for run in doc["runs"])


# ----------------------------------------------------------------------------- in-process


class _TinyServer:
    """In-loop HTTP server for generator tests: fixed reply, optional delay."""

    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.delay = delay
        self.status = status
        self.open = 0
        self.max_open = 0
        self.answered = 0
        self.arrivals: list[int] = []  # monotonic ns when each request head was read
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.arrivals.append(time.monotonic_ns())
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                if self.delay:
                    await asyncio.sleep(self.delay)
                self.answered += 1
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 3\r\n\r\nabc" % self.status)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def _drive(
    url: str, conns: int, rate: float | None, seconds: float, path: str = "/x", body: int = 100
) -> LoadResult:
    pool = bufpool.BufferPool()
    templates, owned = build_templates(pool, "t", [("POST", path, body)])
    gen = LoadGenerator(url, templates, [0], conns, pool=pool, timeout=5.0)
    await gen.connect()
    start = time.monotonic_ns() + 10_000_000
    end = start + int(seconds * 1e9)
    sched = ClosedLoop(end) if rate is None else OpenLoop(rate, start, end)
    try:
        res = await gen.run(sched, start, end)
    finally:
        await gen.close()
        del templates
        for lease in owned:
            lease.release()
    assert pool.stats().in_use == 0
    return res


@pytest.mark.asyncio
async def test_open_loop_latency_counts_from_the_scheduled_time() -> None:
    # One connection, 100 req/s wanted, the server needs 40 ms each (25 req/s possible):
    # requests queue behind each other, and their latency must include that wait.
    async with _TinyServer(delay=0.04) as url:
        res = await _drive(url, conns=1, rate=100.0, seconds=1.0)
    lat = res.latency_ms()
    served = res.requests + res.late
    assert 5 <= served <= 40
    # Service time alone is ~40 ms; the k-th request waited ~k*(40-10) ms more.  Measured
    # from the actual send (coordinated omission) every request would look like ~40 ms.
    assert lat["max"] > 200.0, lat
    assert lat["p50"] > 100.0, lat


@pytest.mark.asyncio
async def test_open_loop_never_sends_before_the_due_time() -> None:
    # uvloop's cached clock and millisecond timers can fire a timer early; a request sent
    # early would show a latency below its true one.  Sorted arrival times must each be at
    # or after the matching due time.
    server = _TinyServer()
    async with server as url:
        pool = bufpool.BufferPool()
        templates, owned = build_templates(pool, "t", [("POST", "/x", 100)])
        gen = LoadGenerator(url, templates, [0], 4, pool=pool)
        await gen.connect()
        start = time.monotonic_ns() + 20_000_000
        end = start + 300_000_000
        try:
            res = await gen.run(OpenLoop(1000.0, start, end), start, end)
        finally:
            await gen.close()
            del templates
            for lease in owned:
                lease.release()
    arrivals = sorted(server.arrivals)
    assert len(arrivals) == res.requests + res.late > 100
    dues = [start + k * 1_000_000 for k in range(len(arrivals))]
    early = [(a - d) for a, d in zip(arrivals, dues, strict=True) if a < d]
    assert early == []


@pytest.mark.asyncio
async def test_closed_loop_keeps_exactly_the_requested_connections_busy() -> None:
    server = _TinyServer()
    async with server as url:
        res = await _drive(url, conns=6, rate=None, seconds=0.5)
    assert server.max_open == 6
    assert res.requests > 0 and not res.errors
    assert res.status[200] == res.requests + res.late
    assert server.answered == res.requests + res.late
    assert res.latency.get_total_count() == res.requests + res.late


@pytest.mark.asyncio
async def test_responses_counted_by_status_code() -> None:
    async with _TinyServer(status=503) as url:
        res = await _drive(url, conns=2, rate=None, seconds=0.3)
    assert res.status[503] > 0 and set(res.status) == {503}
    assert res.error_count() == res.status[503]


@pytest.mark.asyncio
async def test_chunked_and_read_until_close_responses(throwaway: Spawned) -> None:
    res = await _drive(throwaway.url, conns=2, rate=None, seconds=0.3, path="/chunked")
    assert res.requests > 0 and not res.errors and set(res.status) == {200}
    res = await _drive(throwaway.url, conns=2, rate=None, seconds=0.3, path="/close")
    assert res.requests > 0 and set(res.status) == {200}
    # Every response came on its own connection: the generator reconnected each time.
    assert res.bytes_received >= res.requests * 3000


@pytest.mark.asyncio
async def test_request_timeout_is_counted_as_timeout(throwaway: Spawned) -> None:
    pool = bufpool.BufferPool()
    templates, owned = build_templates(pool, "t", [("GET", "/slow?ms=3000", 0)])
    gen = LoadGenerator(throwaway.url, templates, [0], 1, pool=pool, timeout=0.3)
    await gen.connect()
    start = time.monotonic_ns()
    end = start + 600_000_000
    try:
        res = await gen.run(ClosedLoop(end), start, end)
    finally:
        await gen.close()
        del templates
        for lease in owned:
            lease.release()
    assert res.errors["timeout"] >= 1
    assert res.requests == 0


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The embedded A/B run (short): JSON, markdown, plot and stdout of one invocation."""
    tmp = tmp_path_factory.mktemp("default")
    files = {"json": tmp / "out.json", "markdown": tmp / "out.md", "plot": tmp / "out.png"}
    proc = run_cli(
        "--scenario",
        "steady",
        "--duration",
        "1",
        "--rounds",
        "2",
        "--warmup",
        "0.2",
        "--connections",
        "8",
        "--json",
        str(files["json"]),
        "--markdown",
        str(files["markdown"]),
        "--plot",
        str(files["plot"]),
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return {"proc": proc, "doc": json.loads(files["json"].read_text()), **files}


def test_default_run_interleaves_pool_off_and_on(default_run: dict[str, Any]) -> None:
    doc = default_run["doc"]
    order = [(r["config"], r["round"]) for r in doc["runs"]]
    assert order == [("no-pool", 1), ("pool", 1), ("no-pool", 2), ("pool", 2)]
    for run in doc["runs"]:
        assert run["requests"] > 0
        assert run["errors"] == {} and set(run["status"]) == {"200"}
        assert run["server"]["rss_peak_bytes"] > 10 * 1024 * 1024
        # CPU time comes in clock ticks: a server starved by a busy machine may show none
        # for a 1 s run, but not for all four.
        assert run["server"]["cpu_seconds"] >= 0
    assert sum(run["server"]["cpu_seconds"] for run in doc["runs"]) > 0
    pool_runs = [r for r in doc["runs"] if r["config"] == "pool"]
    assert all(r["pool"]["hits"] > 0 for r in pool_runs)
    assert all(r["pool"]["in_use"] == 0 for r in pool_runs)
    assert all(r["pool"] is None for r in doc["runs"] if r["config"] == "no-pool")
    ratios = doc["summary"]["ratios"]
    summary = doc["summary"]["configs"]
    assert ratios["rps"] == pytest.approx(
        summary["pool"]["rps"] / summary["no-pool"]["rps"], rel=0.01
    )
    # Combined rows add up the rounds.
    assert summary["pool"]["requests"] == sum(r["requests"] for r in pool_runs)
    out = default_run["proc"].stdout
    assert "pool/no-pool" in out and "requests/s" in out and "p99.9 ms" in out
    assert "rounds min-max" in out and "steady: pool " in out


def test_json_document_follows_the_schema(default_run: dict[str, Any]) -> None:
    check_document(default_run["doc"])
    assert default_run["doc"]["settings"]["mode"] == "closed"
    assert default_run["doc"]["settings"]["connections"] == 8


def test_markdown_table_written(default_run: dict[str, Any]) -> None:
    text = default_run["markdown"].read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert lines[0] == "|  | no-pool | pool | pool/no-pool | rounds min-max | better |"
    assert any(ln.startswith("| requests/s |") and ln.endswith("| higher |") for ln in lines)
    assert any(ln.startswith("| p99 ms |") and ln.endswith("| lower |") for ln in lines)
    assert all(ln.count("|") == 7 for ln in lines)


def test_plot_written_as_png(default_run: dict[str, Any]) -> None:
    data = default_run["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_url_mode_against_a_server_started_here(tmp_path: Path) -> None:
    app = Spawned([PY, str(ROOT / "examples" / "aiohttp_app.py"), "--port", "0"])
    try:
        doc = run_json(
            tmp_path,
            "--url",
            app.url + "/process",
            "--reply",
            "1000",
            "--mix",
            "2k",
            "--duration",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--connections",
            "4",
            "--server-pid",
            str(app.proc.pid),
            "--stats-url",
            app.url + "/bufpool/stats",
        )
    finally:
        app.stop()
    check_document(doc)
    (run,) = doc["runs"]
    assert run["config"] == "target" and run["requests"] > 0 and set(run["status"]) == {"200"}
    n = run["requests"] + run["late"]
    # 1000-byte replies plus a header block each; 2 KiB bodies plus a header block each.
    assert 1000 * n < run["bytes_received"] < 1400 * n
    assert 2048 * n < run["bytes_sent"] < 2300 * n
    assert run["server"]["rss_peak_bytes"] > 0
    assert run["pool"]["hits"] >= n  # the server's pool served every body


def test_open_loop_rate_mode_sends_at_the_rate(tmp_path: Path, throwaway: Spawned) -> None:
    before = server_stats(throwaway)["requests"]
    doc = run_json(
        tmp_path,
        "--url",
        throwaway.url + "/ok?reply=10",
        "--rate",
        "200",
        "--duration",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--connections",
        "4",
    )
    check_document(doc)
    (run,) = doc["runs"]
    assert run["mode"] == "open"
    sent = server_stats(throwaway)["requests"] - before
    # 200 slots were due within the second; none are invented, few may be lost to a slow box.
    assert 100 <= sent <= 200
    assert run["requests"] + run["late"] == sent


def test_closed_loop_connections_mode(tmp_path: Path, throwaway: Spawned) -> None:
    script = tmp_path / "s.py"
    script.write_text(THROWAWAY_SERVER)
    server = Spawned([PY, str(script)])
    try:
        doc = run_json(
            tmp_path,
            "--url",
            server.url + "/ok?reply=100",
            "--connections",
            "5",
            "--duration",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
        )
        stats = server_stats(server)
    finally:
        server.stop()
    (run,) = doc["runs"]
    assert run["mode"] == "closed"
    assert stats["max_concurrent"] == 5
    assert run["requests"] + run["late"] == stats["requests"]


def test_workers_merge_their_histograms(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(THROWAWAY_SERVER)
    server = Spawned([PY, str(script)])
    try:
        doc = run_json(
            tmp_path,
            "--url",
            server.url + "/ok?reply=100",
            "--connections",
            "4",
            "--workers",
            "2",
            "--duration",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
        )
        stats = server_stats(server)
    finally:
        server.stop()
    (run,) = doc["runs"]
    assert stats["max_concurrent"] == 4
    # Every request any worker completed is in the merged totals.
    assert run["requests"] + run["late"] == stats["requests"] > 0
    assert doc["settings"]["workers"] == 2


def test_errors_counted_by_kind_and_status(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(THROWAWAY_SERVER)
    server = Spawned([PY, str(script)])
    try:
        doc = run_json(
            tmp_path,
            "--url",
            server.url + "/flaky",
            "--connections",
            "2",
            "--method",
            "GET",
            "--duration",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
        )
        stats = server_stats(server)
    finally:
        server.stop()
    (run,) = doc["runs"]
    flaky = stats["flaky"]
    assert flaky > 20
    status = {int(k): v for k, v in run["status"].items()}
    assert set(status) == {200, 500}
    drops = run["errors"]["disconnect"]
    # Every 4th request is a 500, every 4th is dropped (the last few may fall past the end).
    assert abs(status[500] - flaky / 4) <= 3
    assert abs(drops - flaky / 4) <= 3
    assert abs(status[200] - flaky / 2) <= 4
    assert "HTTP 500" not in run  # errors by status live under "status"
    proc = run_cli(
        "--url", server.url + "/flaky", "--duration", "0.3", "--rounds", "1", "--warmup", "0"
    )  # server stopped: every connection is refused
    assert proc.returncode == 1 and "error" in proc.stderr
    # The message names what could not be reached.
    said = " ".join(proc.stderr.split())
    assert f"{server.url}/flaky: cannot connect to 127.0.0.1:" in said, said
    assert "refused" in said


def _start_harness(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-m", "bufpool", "loadtest", "--quiet", "--no-plot", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_children(pid: int, want: int, timeout: float = 60.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = descendants(pid)
        apps = [p for p in kids if _cmd_has(p, "aiohttp_app.py")]
        # Into the first measured run: the no-pool server (measured first) has the load
        # client's connections open (an event, not a second of sleep, which a busy machine
        # spent still starting up: the kill then came before the run, "Connection refused").
        first = [p for p in apps if _cmd_has(p, "--no-pool")]
        if len(apps) >= 2 and len(kids) >= want and first and _established(first[0]) >= 4:
            return descendants(pid)
        time.sleep(0.1)
    raise AssertionError(f"harness never started {want} children: {descendants(pid)}")


def _established(p: psutil.Process) -> int:
    """TCP connections of ``p`` in ESTABLISHED state (0 if it is gone)."""
    try:
        conns = getattr(p, "net_connections", None) or p.connections
        return sum(c.status == psutil.CONN_ESTABLISHED for c in conns(kind="tcp"))
    except psutil.Error:
        return 0


def _cmd_has(p: psutil.Process, text: str) -> bool:
    try:
        return any(text in part for part in p.cmdline())
    except psutil.Error:
        return False


def test_ctrl_c_stops_every_subprocess() -> None:
    harness = _start_harness(
        "--scenario",
        "steady",
        "--duration",
        "30",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--workers",
        "2",
        "--connections",
        "4",
    )
    try:
        kids = _wait_for_children(harness.pid, want=4)
        harness.send_signal(signal.SIGINT)
        _, err = harness.communicate(timeout=30)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.communicate()
    assert harness.returncode == 130, err
    assert "interrupted" in err
    assert len(kids) >= 4
    assert wait_gone(kids) == []


def test_failure_stops_every_subprocess() -> None:
    harness = _start_harness(
        "--scenario",
        "steady",
        "--duration",
        "30",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--connections",
        "4",
    )
    try:
        kids = _wait_for_children(harness.pid, want=2)
        # The no-pool server is measured first; kill it in the middle of its run.
        victim = next(p for p in kids if _cmd_has(p, "--no-pool"))
        os.kill(victim.pid, signal.SIGKILL)
        _, err = harness.communicate(timeout=30)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.communicate()
    assert harness.returncode == 1, err
    assert "exited during the run" in err
    assert wait_gone(kids) == []


def test_tls_through_the_sni_proxy(tmp_path: Path) -> None:
    doc = run_json(
        tmp_path,
        "--tls",
        "--duration",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--connections",
        "4",
        "--mix",
        "1k:1,64k:1",
    )
    check_document(doc)
    assert doc["settings"]["tls"] is True
    for run in doc["runs"]:
        assert run["requests"] > 0 and run["errors"] == {} and set(run["status"]) == {"200"}
    (pooled,) = [r for r in doc["runs"] if r["config"] == "pool"]
    assert pooled["pool"]["hits"] > 0  # stats scraped over TLS from the upstream


def test_server_workers_under_gunicorn(tmp_path: Path) -> None:
    doc = run_json(
        tmp_path,
        "--scenario",
        "steady",
        "--server-workers",
        "2",
        "--duration",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--connections",
        "8",
        "--mix",
        "4k",
    )
    for run in doc["runs"]:
        assert run["requests"] > 0 and run["errors"] == {}
        # master + 2 workers: the sampled tree holds well over one process's RSS.
        assert run["server"]["rss_peak_bytes"] > 60 * 1024 * 1024


def test_locust_smoke(tmp_path: Path) -> None:
    """Optional extra: Locust's master/worker mode on loopback with bench/locustfile.py."""
    # Only look for it: importing locust here would let gevent monkey-patch this worker.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (the loadtest-distributed extra)")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Spawned([PY, str(ROOT / "examples" / "aiohttp_app.py"), "--port", "0"])
    common = ["-f", str(ROOT / "bench" / "locustfile.py"), "--host", app.url]
    master = worker = None
    try:
        master = subprocess.Popen(
            [
                PY,
                "-m",
                "locust",
                *common,
                "--master",
                "--headless",
                "-u",
                "4",
                "-r",
                "4",
                "-t",
                "3s",
                "--expect-workers",
                "1",
                "--master-bind-host",
                "127.0.0.1",
                "--master-bind-port",
                str(port),
                "--csv",
                str(tmp_path / "locust"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        worker = subprocess.Popen(
            [
                PY,
                "-m",
                "locust",
                *common,
                "--worker",
                "--master-host",
                "127.0.0.1",
                "--master-port",
                str(port),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        out, _ = master.communicate(timeout=60)
        worker.wait(timeout=30)
    finally:
        for p in (master, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        app.stop()
    assert master.returncode == 0, out
    rows = (tmp_path / "locust_stats.csv").read_text().splitlines()
    process_rows = [r.split(",") for r in rows if "/process body=" in r]
    assert len(process_rows) == 3  # the three body sizes of the default mix
    assert all(int(r[2]) > 0 and int(r[3]) == 0 for r in process_rows)  # requests, failures


def test_aiohttp_client_variant_counts_what_the_server_answered(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(THROWAWAY_SERVER)
    server = Spawned([PY, str(script)])
    try:
        doc = run_json(
            tmp_path,
            "--url",
            server.url + "/ok?reply=500",
            "--client",
            "aiohttp",
            "--connections",
            "3",
            "--duration",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
        )
        stats = server_stats(server)
    finally:
        server.stop()
    check_document(doc)
    (run,) = doc["runs"]
    assert run["requests"] + run["late"] == stats["requests"] > 0
    assert stats["max_concurrent"] <= 3
    assert run["bytes_received"] == 500 * stats["requests"]  # aiohttp counts body bytes only
