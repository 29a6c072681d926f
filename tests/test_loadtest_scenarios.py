"""The three scenarios of the main job (steady, flood, abuse) at a tiny scale, end to end.

One CLI invocation runs all three against the embedded A/B pair (real servers in
subprocesses, real sockets on 127.0.0.1) and is checked for its table rows, verdicts, JSON,
markdown and chart.  The flood client and the attackers are also driven in-process, on both
loops, against small asyncio servers written here whose behaviour is known, to pin down how
outcomes and cut-offs are counted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import median
from typing import Any

import pytest

from bufpool.loadtest._abuse import AttackCrew
from bufpool.loadtest._flood import run_flood
from bufpool.loadtest._report import SCHEMA
from bufpool.loadtest._summaries import ratio_spread, steady_verdict

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MIB = 1024 * 1024

TINY = (
    "--duration", "0.5", "--rounds", "2", "--warmup", "0", "--connections", "4",
    "--flood-clients", "6", "--flood-body", "2m", "--flood-idle", "0.6",
    "--abuse-duration", "0.8", "--attackers", "2", "--abuse-connections", "2",
    "--attack-body", "1m",
)  # fmt: skip


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All three scenarios, tiny, from a directory that is not the repository: the chart goes
    to the default path there."""
    tmp = tmp_path_factory.mktemp("scenarios")
    proc = subprocess.run(
        [PY, "-m", "bufpool", "loadtest", "--quiet", *TINY,
         "--json", str(tmp / "out.json"), "--markdown", str(tmp / "out.md")],
        cwd=tmp, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads((tmp / "out.json").read_text())
    return {"proc": proc, "doc": doc, "dir": tmp}


@pytest.mark.timeout(120)
def test_default_runs_all_three_scenarios_with_tables_and_verdicts(
    tiny_run: dict[str, Any],
) -> None:
    doc, out = tiny_run["doc"], tiny_run["proc"].stdout
    assert doc["schema"] == SCHEMA
    assert list(doc["scenarios"]) == ["steady", "flood", "abuse"]
    assert doc["settings"]["scenarios"] == ["steady", "flood", "abuse"]
    for name, sc in doc["scenarios"].items():
        assert sc["header"] == ["", "no-pool", "pool", "pool/no-pool", "rounds min-max", "better"]
        assert sc["rows"] and all(len(r) == 6 for r in sc["rows"])
        assert sc["verdict"].startswith(f"{name}: ")
        assert sc["verdict"].split("\n")[0][:30] in " ".join(out.split()), name
        assert sc["wall_s"] > 0
        label = {"steady": "requests/s", "flood": "peak RSS MiB", "abuse": "legit success"}[name]
        assert any(r[0] == label for r in sc["rows"]), (name, label)
    # Every ratio row names its better direction and shows the min-max of the two rounds.
    for sc in doc["scenarios"].values():
        for row in sc["rows"]:
            if row[5] and row[4] != "-":
                assert row[5] in ("higher", "lower")
                lo, _, hi = row[4].partition("-")
                assert float(lo) <= float(hi)
    spread = doc["scenarios"]["steady"]["spread"]["requests/s"]
    runs = doc["runs"]
    per_round = [
        next(r for r in runs if r["round"] == k and r["config"] == "pool")["rps"]
        / next(r for r in runs if r["round"] == k and r["config"] == "no-pool")["rps"]
        for k in (1, 2)
    ]
    assert spread["min"] == pytest.approx(min(per_round), abs=0.002)
    assert spread["max"] == pytest.approx(max(per_round), abs=0.002)


@pytest.mark.timeout(120)
def test_flood_json_counts_every_upload_and_samples_both_servers(
    tiny_run: dict[str, Any],
) -> None:
    flood = tiny_run["doc"]["scenarios"]["flood"]
    order = [(r["config"], r["round"]) for r in flood["runs"]]
    assert order == [("no-pool", 1), ("pool", 1), ("no-pool", 2), ("pool", 2)]
    series = {}
    for run in flood["runs"]:
        assert sum(run["outcomes"].values()) == run["clients"] == 6
        assert run["outcomes"] == {"HTTP 200": 6}  # 6 x 2 MiB fit the defaults
        assert run["served"] == 6 and run["body_bytes"] == 2 * MIB
        samples = run["rss_samples"]
        times = [t for t, _ in samples]
        # From before the start signal to the end of the idle tail, every 100 ms or finer.
        assert times[0] < 0 and times[-1] >= run["flood_s"] + 0.5
        assert median(b - a for a, b in itertools.pairwise(times)) <= 0.1
        assert all(v > 10 * MIB for _, v in samples)
        assert run["rss_peak_bytes"] == max(v for _, v in samples)
        assert run["rss_after_idle_bytes"] == samples[-1][1]
        series.setdefault(run["config"], []).append(samples)
    assert set(series) == {"no-pool", "pool"}
    assert series["no-pool"][0] != series["pool"][0]
    pool_run = next(r for r in flood["runs"] if r["config"] == "pool")
    assert pool_run["pool_after_idle"]["in_use"] == 0  # every upload's lease came back
    assert all(r["pool_after_idle"] is None for r in flood["runs"] if r["config"] == "no-pool")


@pytest.mark.timeout(120)
def test_abuse_counts_legitimate_and_attacker_requests_apart(tiny_run: dict[str, Any]) -> None:
    abuse = tiny_run["doc"]["scenarios"]["abuse"]
    assert len(abuse["runs"]) == 4
    for run in abuse["runs"]:
        legit = run["legit"]
        # Legitimate side: only the legitimate generator's requests, all answered here.
        assert run["legit_total"] == sum(legit["status"].values()) + sum(legit["errors"].values())
        assert run["legit_ok"] == legit["status"].get("200", 0) > 0
        assert run["legit_success_rate"] == pytest.approx(run["legit_ok"] / run["legit_total"])
        # Attacker side: 2 of each kind, each with one outcome.
        att = run["attackers"]
        assert att["total"] == 6 and len(att["list"]) == 6
        kinds = Counter(a["kind"] for a in att["list"])
        assert kinds == {"stall": 2, "trickle": 2, "no-read": 2}
        assert sum(att["by_outcome"].values()) == 6
        assert att["cut_off"] == sum(1 for a in att["list"] if a["how"] != "open")
        trickled = [a["sent"] for a in att["list"] if a["kind"] == "trickle"]
        stalled = [a["sent"] for a in att["list"] if a["kind"] == "stall"]
        assert stalled == [0, 0] and all(n >= 1 for n in trickled)
        if run["config"] == "pool":
            assert run["pool_samples"] and run["pool_pinned_peak_bytes"] is not None
        else:
            assert run["pool_samples"] == [] and run["pool_pinned_peak_bytes"] is None


@pytest.mark.timeout(120)
def test_markdown_holds_all_three_tables(tiny_run: dict[str, Any]) -> None:
    text = (tiny_run["dir"] / "out.md").read_text()
    headers = [ln for ln in text.splitlines() if ln.startswith("|  | no-pool | pool |")]
    assert len(headers) == 3
    for name in ("steady", "flood", "abuse"):
        assert f"**{name}: " in text
        assert any(ln.startswith(f"{name}: ") for ln in text.splitlines())  # the verdict


@pytest.mark.timeout(120)
def test_chart_written_by_default_with_a_row_per_scenario(tiny_run: dict[str, Any]) -> None:
    chart = tiny_run["dir"] / "bufpool-loadtest.png"
    assert f"chart: {chart}" in tiny_run["proc"].stdout.replace("\n", "")
    width, height = png_size(chart)
    assert width > 1000 and height == 3 * 420  # three rows of panels


@pytest.mark.timeout(120)
def test_no_plot_writes_no_chart_and_scenario_picks_one(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PY, "-m", "bufpool", "loadtest", "--quiet", "--no-plot", "--scenario", "flood",
         "--rounds", "1", "--flood-clients", "2", "--flood-body", "64k", "--flood-idle", "0",
         "--json", str(tmp_path / "f.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("*.png")) and "chart:" not in proc.stdout
    doc = json.loads((tmp_path / "f.json").read_text())
    assert list(doc["scenarios"]) == ["flood"] and doc["runs"] == []


@pytest.mark.timeout(60)
def test_url_footer_reports_the_reply_sizes_received(tmp_path: Path) -> None:
    app = subprocess.Popen(
        [PY, str(ROOT / "examples" / "aiohttp_app.py"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert app.stdout is not None
        url = app.stdout.readline().split()[-1]
        proc = subprocess.run(
            [PY, "-m", "bufpool", "loadtest", "--quiet", "--no-plot", "--url", url + "/echo",
             "--mix", "16k", "--duration", "0.5", "--rounds", "1", "--warmup", "0",
             "--connections", "2", "--json", str(tmp_path / "u.json")],
            capture_output=True, text=True, timeout=50,
        )  # fmt: skip
    finally:
        app.terminate()
        app.wait(10)
    assert proc.returncode == 0, proc.stderr
    title = " ".join(proc.stdout.split())
    doc = json.loads((tmp_path / "u.json").read_text())
    (run,) = doc["runs"]
    n = run["requests"] + run["late"]
    assert run["reply_bytes"] == {"16384": n}  # /echo sends the 16 KiB body back
    assert f"replies received 16k:{n}," in title
    assert "4k" not in title  # nothing was asked of the server, and 4k is not what came back


# ----------------------------------------------------------------------------- in-process


class _UploadServer:
    """Asyncio HTTP server for uploads; the k-th connection (0-based) by k % 3:
    0 -> reads the body, 200; 1 -> 413 right after the head, then drains the body;
    2 -> aborts the connection after the head."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        k = self.accepted
        self.accepted += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if k % 3 == 2:
                writer.transport.abort()
                return
            if k % 3 == 1:
                writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
            while length:
                chunk = await reader.read(min(length, 65536))
                if not chunk:
                    return
                length -= len(chunk)
            if k % 3 == 0:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_flood_outcomes_are_statuses_or_error_kinds() -> None:
    async with _UploadServer() as (host, port):
        res = await run_flood(
            host, port, "/up", clients=6, body=512 * 1024, idle=0.2, timeout=10.0,
            server_pid=os.getpid(),
        )  # fmt: skip
    out = res.outcomes()
    assert out["HTTP 200"] == 2 and out["HTTP 413"] == 2  # the early 413 is a reply, not an error
    assert out["reset"] + out["closed"] == 2 and sum(out.values()) == 6
    assert res.served == 2 and res.load.requests == 4
    assert res.load.latency.get_total_count() == 4
    # This process sampled itself: a series from before the start to the end of the idle tail.
    assert res.rss[0][0] < 0 <= res.flood_s < res.rss[-1][0]
    assert res.rss_peak == max(v for _, v in res.rss) > 0


class _DeadlineServer:
    """Asyncio HTTP server that cuts attackers off its own way, by request kind:
    a POST whose body has not come within 0.3 s -> ``408`` then close (stall and trickle);
    a GET -> writes 16 MiB (more than the kernel's socket buffers take), then aborts the
    connection if it was not all taken 0.3 s later."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.heads = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads += 1
            if head.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 16777216\r\n\r\n")
                writer.write(b"z" * 16777216)
                try:
                    await asyncio.wait_for(writer.drain(), 0.3)
                except TimeoutError:
                    writer.transport.abort()
                    return
            else:
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                try:
                    await asyncio.wait_for(reader.readexactly(length), 0.3)
                except TimeoutError:
                    writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_attackers_record_how_and_when_they_were_cut_off() -> None:
    server = _DeadlineServer()
    async with server as (host, port):
        crew = AttackCrew(
            host, port, 2, declared=1000, post_path="/up", read_path="/big",
            server_pid=os.getpid(),  # the server is this process
        )  # fmt: skip
        await crew.start()
        try:
            deadline = time.monotonic() + 10.0
            while any(a.how == "open" for a in crew.attackers) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await crew.stop()
    assert server.heads == 6
    how = {(a.kind, a.how) for a in crew.attackers}
    assert how == {("stall", "HTTP 408"), ("trickle", "HTTP 408"), ("no-read", "closed")}
    for a in crew.attackers:
        assert a.cut_s is not None and 0.25 <= a.cut_s < 10.0, a
    assert all(a.sent >= 1 for a in crew.attackers if a.kind == "trickle")
    assert all(a.sock is None for a in crew.attackers)  # stop() closed every socket


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_attackers_still_open_at_the_end_are_reported_open() -> None:
    server = _DeadlineServer()
    async with server as (host, port):
        crew = AttackCrew(host, port, 1, declared=1000, post_path="/up", read_path="/big")
        await crew.start()
        await crew.stop()  # before the server's 0.3 s deadlines
    assert [a.how for a in crew.attackers] == ["open", "open", "open"]
    assert all(a.cut_s is None for a in crew.attackers)


# ----------------------------------------------------------------------------- locust


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scenario", ["flood", "abuse"])
def test_locustfile_runs_flood_and_abuse(tmp_path: Path, scenario: str) -> None:
    """bench/locustfile.py's flood and abuse against the example app, in a subprocess (locust
    is never imported here: gevent would monkey-patch this xdist worker)."""
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (the loadtest-distributed extra)")
    app = subprocess.Popen(
        [PY, str(ROOT / "examples" / "aiohttp_app.py"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "BUFPOOL_SCENARIO": scenario,
        "BUFPOOL_FLOOD_BODY": "1m",
        "BUFPOOL_ATTACKERS": "1",
        "BUFPOOL_ATTACK_BODY": "1m",
    }
    try:
        assert app.stdout is not None
        url = app.stdout.readline().split()[-1]
        proc = subprocess.run(
            [PY, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
             "-u", "5", "-r", "5", "-t", "3s", "--host", url, "--csv", str(tmp_path / "l"),
             "--only-summary"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        app.terminate()
        app.wait(10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r.split(",") for r in (tmp_path / "l_stats.csv").read_text().splitlines()[1:]]
    by_name = {(r[0], r[1]): r for r in rows}
    if scenario == "flood":
        row = by_name[("POST", "flood /process body=1048576")]
        assert int(row[2]) == 5 and int(row[3]) == 0  # each user uploaded once, all served
    else:
        # "still open" is reported as the test stops, after Locust's last CSV write: read the
        # printed summary.
        text = proc.stdout + proc.stderr
        attacks = [ln.split()[1] for ln in text.splitlines() if ln.startswith("ATTACK ")]
        assert {"stall", "trickle", "no-read"} <= set(attacks), text[-3000:]
        legit = [r for (kind, name), r in by_name.items() if name.startswith("/process body=")]
        assert legit and all(int(r[2]) > 0 and int(r[3]) == 0 for r in legit)


# ----------------------------------------------------------------------------- verdicts


def _steady_cfg(rps: float) -> dict[str, Any]:
    return {"rps": rps, "errors": {}, "status": {"200": 1}, "latency_ms": {"p99": 1.0}}


@pytest.mark.parametrize(
    ("rounds", "words"),
    [
        ([(0.96, 1.0), (1.10, 1.0)], "no throughput difference beyond the run-to-run spread"),
        ([(1.2, 1.0), (1.3, 1.0)], "pool faster in every round"),
        ([(0.8, 1.0), (0.9, 1.0)], "pool slower in every round"),
        ([(0.97, 1.0), (0.99, 1.0)], "no throughput difference beyond the run-to-run spread"),
    ],
)
def test_steady_verdict_weighs_the_ratio_against_the_rounds_spread(
    rounds: list[tuple[float, float]], words: str
) -> None:
    spread = {"requests/s": ratio_spread(sum(c for c, _ in rounds), len(rounds), rounds)}
    configs = {"no-pool": _steady_cfg(1.0), "pool": _steady_cfg(1.0)}
    verdict = steady_verdict(configs, spread, "no-pool", "pool")
    lo, hi = min(c for c, _ in rounds), max(c for c, _ in rounds)
    assert verdict.endswith(words)
    assert f"(rounds {lo:.2f}-{hi:.2f})" in verdict


def test_ratio_spread_is_the_min_and_max_of_the_rounds_own_ratios() -> None:
    sp = ratio_spread(30, 20, [(10, 10), (20, 10), (0, 0)])  # a round without a baseline
    assert sp == {"ratio": 1.5, "min": 1.0, "max": 2.0, "rounds": 2}
    assert ratio_spread(1, 0, []) == {"ratio": None, "min": None, "max": None, "rounds": 0}


def test_steady_verdict_with_one_round_claims_nothing() -> None:
    spread = {"requests/s": ratio_spread(1.3, 1.0, [(1.3, 1.0)])}
    configs = {"no-pool": _steady_cfg(1.0), "pool": _steady_cfg(1.3)}
    verdict = steady_verdict(configs, spread, "no-pool", "pool")
    assert verdict.endswith(
        "one round only: run --rounds 2 or more to tell a difference from noise"
    )


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_non_reader_waiting_in_the_listen_backlog_is_not_counted_closed() -> None:
    # A server that listens but never accepts: the connections complete in the kernel's
    # backlog, so this process holds no socket for them -- that is not a cut-off.
    import socket

    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        host, port = lsock.getsockname()[:2]
        crew = AttackCrew(host, port, 2, declared=10, read_path="/big", server_pid=os.getpid())
        await crew.start()
        try:
            for _ in range(12):  # 12 looks (the socket listing runs on every 4th)
                await asyncio.sleep(0.05)
                crew.check()
        finally:
            await crew.stop()
    no_read = [a for a in crew.attackers if a.kind == "no-read"]
    assert [a.how for a in no_read] == ["open", "open"]
    assert not any(a.held for a in no_read)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--plot", "x.png", "--no-plot"], "--plot FILE and --no-plot contradict each other"),
        (["--attackers", "-1"], "--attackers must be >= 0"),
        (["--scenario", "flood", "--tls"], "flood and abuse do not run through the TLS proxy"),
        (["--scenario", "storm"], "invalid choice: 'storm'"),
        (["--flood-body", "0"], "must be > 0 bytes"),
    ],
)
def test_bad_scenario_arguments_exit_2_naming_the_fault(
    tmp_path: Path, args: list[str], words: str
) -> None:
    proc = subprocess.run(
        [PY, "-m", "bufpool", "loadtest", *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing started, nothing written
